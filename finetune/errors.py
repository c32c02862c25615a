"""The error for bad input: the message names the file, row or config key and what was expected."""


class InputError(ValueError):
    """Raised for anything the user can fix in their data or config; `finetune` prints just the message."""

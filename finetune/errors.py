"""Errors whose message tells the user what to fix; `finetune` prints the message, not a traceback."""


class InputError(ValueError):
    """Bad data or config: the message names the file, row or config key and what was expected."""


class NonFiniteLossError(ArithmeticError):
    """The loss became NaN or infinite: the message names the step and the batch's examples."""

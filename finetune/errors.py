"""Errors whose message tells the user what to fix; `finetune` prints the message, not a traceback."""


class InputError(ValueError):
    """Bad data or config: the message names the file, row or config key and what was expected."""


class NonFiniteLossError(ArithmeticError):
    """The loss became NaN or infinite: the message names the step and the batch's examples."""


class StoppedBySignal(Exception):
    """Training stopped on SIGTERM/SIGINT after saving `last.ckpt` (a clean stop: `finetune` exits 0).
    An exception rather than `trainer.should_stop`, which would run the epoch-end hooks and let
    ModelCheckpoint overwrite `last.ckpt` with an "epoch finished" state, skipping the epoch's rest."""


def with_article(noun: str) -> str:
    """`noun` after the article its first letter takes ("an InstructionTuning", "a Translation")."""
    return ("an " if noun[:1].lower() in ("a", "e", "i", "o", "u") else "a ") + noun

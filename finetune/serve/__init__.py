"""`finetune serve`: a checkpoint (or several LoRA adapters of one base model) behind an HTTP server on LitServe.

- command.py: the options and startup, and stopping every process of the server on SIGTERM / SIGINT;
- adapters.py: the checkpoints' options, read and checked in the main process;
- checks.py: the checks of a request before it is queued (the core's column checks, the task's own);
- hosting.py: the model loaded once with each adapter beside it, answering through `finetune.pipeline`;
- api.py: the LitServe API (one inference worker) and the routes /predict and /v1/chat/completions.
"""

from finetune.serve.command import main

__all__ = ["main"]

"""Benchmarks of `finetune` against what one would use instead, run by hand from the repository root:

    python -m benchmarks.<script> --help

Layout: `harness` (child processes, systems taking turns, quiet-machine waits, result lines), `results` (medians,
tables, the JSON files under benchmarks/results/), `meter` (the step meter: real tokens/s, wall time, peak memory;
the generation counter), `systems/` (each compared system written once: finetune, a hand loop, HF Trainer, TRL,
`model.generate`, transformers `pipeline`), `data` and `models` (inputs every script shares); the other modules
are the scripts.

Benchmarks run offline: the Hub's cached copies or finetune's packaged ones (set here, before any Hugging Face
library reads the environment).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

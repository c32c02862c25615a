"""The data of the task YAMLs in this directory, read from local JSON Lines files instead of the Hugging Face Hub.

lm-eval calls `load` (the tasks' `custom_dataset`) with the task's `dataset_kwargs` and the run's metadata; the
directory holding the files comes from the metadata key `data_dir`:

    lm_eval ... --include_path configs/lm_eval --metadata '{"data_dir": "../shared/data"}'
    finetune evaluate ... --include_path configs/lm_eval --data_dir ../shared/data
"""

from pathlib import Path

import datasets


def load(data_files: dict, data_dir: str = None, **metadata) -> datasets.DatasetDict:
    """The splits of `data_files` ({split: path relative to `data_dir`}) as a DatasetDict."""
    if data_dir is None:
        raise FileNotFoundError(f"these tasks read {', '.join(data_files.values())} from a data directory: name it "
                                "with --metadata '{\"data_dir\": DIR}' (lm_eval) or --data_dir DIR (finetune evaluate)")
    paths = {split: Path(data_dir).expanduser() / name for split, name in data_files.items()}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"data file {str(path)!r} does not exist (data_dir {data_dir!r})")
    return datasets.load_dataset("json", data_files={split: str(path) for split, path in paths.items()})

"""The README's "Write a task plugin" example is examples/text_regression.py, verbatim, and it passes
the conformance kit, as the guide tells a plugin author to check theirs."""

import re
import sys

import pytest

from conftest import KIT_PROCESSES, REPO, make_rows
from finetune.testing import check_task

sys.path.insert(0, str(REPO / "examples"))
from text_regression import TextRegression  # noqa: E402

TARGET = {"pos": 1.0, "neg": -1.0, "neu": 0.0}


def test_readme_shows_the_example_file_verbatim():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    guide = readme[readme.index("## Write a task plugin"):]
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    assert (REPO / "examples" / "text_regression.py").read_text(encoding="utf-8") in blocks


@pytest.mark.parametrize("processes", KIT_PROCESSES)
def test_example_task_passes_the_kit_and_learns(processes, tmp_path):
    rows = [{"text": r["text"], "target": TARGET[r["label"]]} for r in make_rows(30)]
    report = check_task(TextRegression(), rows, workdir=tmp_path, epochs=6, processes=processes,
                        extra_args=["--model.optimizer.lr=0.01", "--model.lora.target_modules=all-linear"])
    print(report.train_losses, report.metrics_by_processes)
    assert report.metrics_by_processes.keys() == {1, processes}
    assert report.train_losses[-1] < report.train_losses[0]
    assert report.metrics["val/mse"] < 0.667  # below predicting the mean (0) for targets -1/0/1 in thirds
    assert set(report.predictions[0]) == {"score"}

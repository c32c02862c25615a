import subprocess
import sys

import pytest

from finetune.registry import build_task, registered_tasks, task_class
from tasks.classification import TextClassification

PLUGIN = '''
from finetune.task import Task
from tasks.classification import TextClassification


class Shouting(TextClassification):
    """A third-party task: classification of upper-cased text."""
    name = "shouting"

    def preprocess(self, examples, tokenizer, with_targets):
        examples = {**examples, self.text_column: [t.upper() for t in examples[self.text_column]]}
        return super().preprocess(examples, tokenizer, with_targets)
'''


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    """An installed third-party distribution that registers a task through the entry-point group."""
    (tmp_path / "shout_plugin.py").write_text(PLUGIN)
    dist = tmp_path / "shout_plugin-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-plugin\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[finetune.tasks]\nshouting = shout_plugin:Shouting\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtin_classification_is_registered_through_its_entry_point():
    task = registered_tasks()["classification"]
    assert task.class_path == "tasks.classification.TextClassification"
    assert task.package.startswith("finetune ")
    assert task_class("classification") is TextClassification


def test_third_party_entry_point_is_discovered_and_buildable(plugin_dir):
    tasks = registered_tasks()
    assert tasks["shouting"].package == "shout-plugin 1.2.3"
    task = build_task("shouting")
    assert type(task).__name__ == "Shouting"
    # reachable by class_path too, with init args, as a checkpoint stores it
    again = build_task({"class_path": "shout_plugin.Shouting", "init_args": {"labels": ["a", "b"]}})
    assert again.labels == ["a", "b"]


def test_finetune_tasks_lists_third_party_tasks_with_their_package(plugin_dir):
    env_path = f"{plugin_dir}"
    out = subprocess.run(
        [sys.executable, "-m", "finetune", "tasks"], capture_output=True, text=True, check=True,
        env={**__import__("os").environ, "PYTHONPATH": env_path},
    ).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "shout-plugin 1.2.3" in lines["shouting"]
    assert "shout_plugin.Shouting" in lines["shouting"]
    assert "tasks.classification.TextClassification" in lines["classification"]


def test_unknown_task_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown task 'clasification'.*Registered tasks: .*classification"):
        build_task("clasification")


def test_task_config_round_trips_through_build_task():
    task = TextClassification(text_column="sentence", labels=["x", "y"], multi_label=True)
    rebuilt = build_task(task.config())
    assert rebuilt.config() == task.config()
    assert rebuilt.labels == ["x", "y"] and rebuilt.multi_label and rebuilt.text_column == "sentence"

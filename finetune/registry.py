"""Task registry: names -> task classes, discovered through the `finetune.tasks` entry-point group.

Built-in tasks register exactly like third-party ones (see pyproject.toml), so there is one
mechanism and `finetune tasks` can say which package each task comes from.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from finetune.errors import InputError

if TYPE_CHECKING:  # (imported where needed: `finetune tasks` reads entry points without torch)
    from finetune.task import Task

ENTRY_POINT_GROUP = "finetune.tasks"


@dataclass(frozen=True)
class RegisteredTask:
    name: str
    target: str  # "module:Class"
    package: str  # distribution that declares the entry point

    @property
    def class_path(self) -> str:
        return self.target.replace(":", ".")

    def load(self) -> type[Task]:
        from finetune.task import Task

        module_name, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module_name), attr)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise InputError(f"entry point {self.name!r} ({self.target}, from {self.package}) is not a finetune Task")
        return cls


def registered_tasks() -> dict[str, RegisteredTask]:
    tasks = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        package = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown package"
        tasks[ep.name] = RegisteredTask(ep.name, ep.value, package)
    return tasks


def task_class(name: str) -> type[Task]:
    tasks = registered_tasks()
    if name not in tasks:
        available = ", ".join(sorted(tasks)) or "none (is finetune installed with pip?)"
        raise InputError(
            f"model.task: unknown task {name!r}. Registered tasks: {available}. "
            "A task from your own package is reachable with `class_path: your_module.YourTask` "
            f"or by registering it in the {ENTRY_POINT_GROUP!r} entry-point group."
        )
    return tasks[name].load()


def import_registered_tasks() -> list[str]:
    """Import every registered task so configs can name a task class by its short class name.

    Returns a warning per task that failed to import, rather than letting one broken plugin
    break the whole command line.
    """
    problems = []
    for task in registered_tasks().values():
        try:
            task.load()
        except Exception as err:  # a broken third-party plugin must not take the CLI down
            problems.append(f"task {task.name!r} from {task.package} could not be loaded: {err}")
    return problems


def build_task(spec: Task | str | dict[str, Any]) -> Task:
    """A task from a registry name, a `{"class_path", "init_args"}` dict (checkpoints) or an instance."""
    from finetune.task import Task

    if isinstance(spec, Task):
        return spec
    if isinstance(spec, str):
        return task_class(spec)()
    if isinstance(spec, dict) and "class_path" in spec:
        path = spec["class_path"]
        if "." in path:
            module_name, _, attr = path.rpartition(".")
            cls = getattr(importlib.import_module(module_name), attr)
        else:
            cls = task_class(path)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise InputError(f"model.task: {path!r} is not a finetune Task")
        return cls.from_options(spec.get("init_args", {}))
    raise InputError(f"model.task: expected a task name, a Task or a class_path dict, got {spec!r}")


"""The registry of tasks and methods that run on the shared training loop: name -> "module:Class" (imported when
first asked for). raysvc's own are listed below; a plug-in (`raysvc/plugins.py`) adds its own with `register_task`,
so a new task is a module of its own and a job YAML whose `task:` names it."""

from __future__ import annotations

import importlib

from raysvc.plugins import load_plugins
from raysvc.train.tasks.base import Task, WorkerContext

TASKS: dict[str, str | type[Task]] = {
    "segmentation": "raysvc.train.tasks.segmentation:SegmentationTask",
    "panda": "raysvc.train.tasks.panda:PandaTask",
    "panda-cross": "raysvc.train.tasks.panda_cross:CrossPandaTask",
    "polarmae": "raysvc.train.tasks.polarmae:PolarMAETask",
    "panoptic": "raysvc.train.tasks.panoptic:PanopticTask",
    "rings": "raysvc.train.tasks.rings:RingsTask",
}


def register_task(cls: type[Task]) -> type[Task]:
    """Register a Task class under its `name` (usable as a class decorator); a name taken by another task is an
    error."""
    known = TASKS.get(cls.name)
    if known is not None and known is not cls and known != f"{cls.__module__}:{cls.__qualname__}":
        raise ValueError(f"task {cls.name!r} is registered already ({known})")
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    load_plugins()
    return sorted(TASKS)


def get_task(name: str) -> type[Task]:
    """The Task class registered as `name`; an unknown name is an error listing the known ones."""
    if name not in TASKS:
        load_plugins()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    entry = TASKS[name]
    if isinstance(entry, str):
        module, cls = entry.split(":")
        entry = getattr(importlib.import_module(module), cls)
    return entry


__all__ = ["TASKS", "Task", "WorkerContext", "get_task", "register_task", "task_names"]

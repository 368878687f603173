"""The registry of tasks and methods that run on the shared training loop, by name. raysvc's own are listed below;
a plug-in (`raysvc/plugins.py`) adds its own with `register_task`, so a new task is a module of its own and a job
YAML whose `task:` names it."""

from __future__ import annotations

from raysvc.plugins import Registry
from raysvc.train.tasks.base import Task, WorkerContext

TASKS = Registry(
    "task",
    {
        "segmentation": "raysvc.train.tasks.segmentation:SegmentationTask",
        "panda": "raysvc.train.tasks.panda:PandaTask",
        "panda-cross": "raysvc.train.tasks.panda_cross:CrossPandaTask",
        "polarmae": "raysvc.train.tasks.polarmae:PolarMAETask",
        "panoptic": "raysvc.train.tasks.panoptic:PanopticTask",
        "rings": "raysvc.train.tasks.rings:RingsTask",
    },
)


def register_task(cls: type[Task]) -> type[Task]:
    """Register a Task class under its `name` (usable as a class decorator)."""
    TASKS.register(cls.name, cls)
    return cls


def task_names() -> list[str]:
    return TASKS.names()


def get_task(name: str) -> type[Task]:
    """The Task class registered as `name`; an unknown name is an error listing the known ones."""
    return TASKS.get(name)


__all__ = ["TASKS", "Task", "WorkerContext", "get_task", "register_task", "task_names"]

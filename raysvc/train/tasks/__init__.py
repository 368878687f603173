"""The registry of tasks and methods that run on the shared training loop: name -> "module:Class". A new method or
task is a new module here plus one line below and a job YAML whose `task:` names it."""

from __future__ import annotations

import importlib

from raysvc.train.tasks.base import Task, WorkerContext

TASKS: dict[str, str] = {
    "segmentation": "raysvc.train.tasks.segmentation:SegmentationTask",
    "panda": "raysvc.train.tasks.panda:PandaTask",
    "panda-cross": "raysvc.train.tasks.panda_cross:CrossPandaTask",
    "polarmae": "raysvc.train.tasks.polarmae:PolarMAETask",
    "panoptic": "raysvc.train.tasks.panoptic:PanopticTask",
    "rings": "raysvc.train.tasks.rings:RingsTask",
}


def get_task(name: str) -> type[Task]:
    """The Task class registered as `name`; an unknown name is an error listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["TASKS", "Task", "WorkerContext", "get_task"]

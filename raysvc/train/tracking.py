"""wandb logging from rank 0 only: offline by default (no network needed, sync later with `wandb sync`), online
when WANDB_API_KEY is set or the config says so. The key is read by wandb from the environment, never logged."""

from __future__ import annotations

import os


class Tracker:
    def __init__(
        self,
        project: str,
        name: str,
        mode: str,
        config: dict,
        rank: int,
        local_dir: str | None,
        group: str | None = None,
    ):
        self.run = None
        if rank != 0 or mode == "disabled":
            return
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        import wandb

        wdir = os.environ.get("WANDB_DIR") or local_dir or os.path.join(os.path.expanduser("~"), ".cache", "raysvc")
        os.makedirs(wdir, exist_ok=True)
        self.run = wandb.init(
            project=project,
            name=name,
            id=name,
            group=group,
            resume="allow",
            mode=mode,
            dir=wdir,
            config=config,
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, data: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def finish(self, teardown: bool = False) -> None:
        """End the run; `teardown` also stops this process's wandb service now (short-lived Tune trial processes:
        left to atexit, it logs a "Connection lost" traceback when Ray ends the process)."""
        if self.run is not None:
            self.run.finish()
            self.run = None
            if teardown:
                import wandb

                wandb.teardown()

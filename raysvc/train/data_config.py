"""Ray Train dataset splitting that delivers every event.

Ray Train's default DataConfig splits with `streaming_split(equal=True)`, which silently drops up to
world_size - 1 rows per pass to make the splits equal. We never drop events silently: this config splits with
equal=False, and our training loops handle uneven ends themselves (every rank agrees on when to stop).
"""

from __future__ import annotations

import ray.train


class ExactSplitDataConfig(ray.train.DataConfig):
    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        to_split = set(datasets) if self._datasets_to_split == "all" else set(self._datasets_to_split)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in datasets.items():
            if ds.name is None:
                ds.set_name(name)
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(name)
            if name in to_split:
                for i, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[i][name] = split
            else:
                for i in range(world_size):
                    output[i][name] = ds.iterator()
        return output

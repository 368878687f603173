"""The `data` section of every job config: where the events are and how they are prepared (cuts, normalisation,
label subset, batching). Plain config: the readers (Ray tasks, Ray Data, the direct path) take it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from raysvc.data.contract.detectors import Detector
from raysvc.data.streaming.shards import load_manifest
from raysvc.data.streaming.transforms import PreprocessConfig
from raysvc.storage import Location, S3Options, resolve


class DataConfig(BaseModel):
    """Where the events are and how they are prepared; the `data` section of every job config."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(description="dataset root: file:///path, a path, or s3://bucket/prefix")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    subset_events: int | None = Field(None, gt=0, description="use only this many events (nested, seeded subset)")
    subset_fraction: float | None = Field(None, gt=0, le=1, description="or this fraction of events")
    subset_seed: int = Field(0, description="seed of the label subset; same seed, same events")
    batch_events: int = Field(8, gt=0, description="events per packed batch")
    loader: Literal["tasks", "ray_data"] = Field(
        "tasks",
        description="how training workers read their shards: one Ray task per shard ('tasks'), or a Ray Dataset "
        "per rank and epoch ('ray_data'); same events, same order, same resume (docs/benchmarks.md compares them)",
    )
    prefetch_shards: int = Field(2, ge=1, description="shards read ahead of the training step (both loaders)")
    block_mib: float = Field(
        4.0,
        gt=0,
        description="target Ray Data block size (MiB): small enough that streaming_split can balance workers on "
        "small datasets; for the ray_data loader 4 and 16 delivered alike, 1 was slower (docs/benchmarks.md)",
    )
    read_cpus: float = Field(1.0, gt=0, description="CPUs per read+preprocess task (leave room for Train workers)")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint; default AWS_ENDPOINT_URL")
    verify_checksums: bool = Field(True, description="check each shard's sha256 against the manifest as it is read")

    @model_validator(mode="after")
    def _one_subset(self) -> DataConfig:
        if self.subset_events is not None and self.subset_fraction is not None:
            raise ValueError("give subset_events or subset_fraction, not both")
        return self

    def location(self) -> Location:
        return resolve(self.uri, S3Options(endpoint_url=self.s3_endpoint_url))

    def resolve_preprocess(self, detector: Detector | None = None) -> Detector:
        """Fill the `preprocess` fields this config leaves unset with `detector`'s values, by default those of the
        dataset's detector (its manifest's), in place; returns that detector. `prepared.prepare` does it before any
        read, so code that takes the values from a job config after it (a task's workers, its export) sees the
        values the events are prepared with."""
        if detector is None:
            detector = load_manifest(self.location()).detector_spec
        self.preprocess = self.preprocess.resolved(detector)
        return detector

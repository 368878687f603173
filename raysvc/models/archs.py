"""The backbone architectures a segmenter can be built on, by name: what an export's record (`model.arch`) and a
fine-tuning job's `model.arch` refer to. A new encoder is a model file plus one entry here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from raysvc.models import polarmae, ptv3
from raysvc.models.heads import SegModel


@dataclass(frozen=True)
class Arch:
    presets: dict  # size name -> the config fields of that preset
    config: Callable  # (size, **overrides) -> the architecture's config
    segmenter: Callable[..., nn.Module]  # (config, num_classes, head) -> encoder + segmentation head


ARCHS: dict[str, Arch] = {
    "ptv3": Arch(ptv3.PRESETS, ptv3.preset, SegModel),
    "polarmae": Arch(polarmae.PRESETS, polarmae.preset, polarmae.PolarMAESegModel),
}


def check_size(arch: str, size: str) -> None:
    """An unknown architecture or preset is an error listing the known ones."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch!r}")
    if size not in ARCHS[arch].presets:
        raise ValueError(f"size of a {arch} model must be one of {sorted(ARCHS[arch].presets)}, got {size!r}")


def with_input_channels(arch: str, size: str, overrides: dict, channels: int) -> dict:
    """`overrides` with `in_channels` = `channels` (the data's: xyz + the detector's feature channels) where they
    leave it unset and the preset's differs, so that a job need not repeat its detector's channels and the records
    of jobs that matched the preset stay as they were. An `in_channels` the job sets stays."""
    if "in_channels" in overrides or ARCHS[arch].config(size, **overrides).in_channels == channels:
        return overrides
    return {**overrides, "in_channels": channels}

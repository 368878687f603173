"""Exported models: weights as safetensors + the config as JSON, in a directory (file:// or s3://) that `raysvc
predict`, the Serve endpoint and fine-tuning (`model.init`) load. No optimizer state, no secrets."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from raysvc.storage import Location, exists, read_bytes, write_bytes_atomic


def save_model(loc: Location, state: dict[str, torch.Tensor], config: dict, weights_name: str = "model.safetensors",
               ) -> None:  # fmt: skip
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    write_bytes_atomic(loc.join(weights_name), st_save(tensors, metadata={"format": "pt"}))
    write_bytes_atomic(loc.join("config.json"), json.dumps(config, indent=2).encode())


def load_model(loc: Location) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, config) from an exported directory; model.safetensors, else backbone.safetensors."""
    config = json.loads(read_bytes(loc.join("config.json")))
    for name in ("model.safetensors", "backbone.safetensors"):
        if exists(loc.join(name)):
            return st_load(read_bytes(loc.join(name))), config
    raise FileNotFoundError(f"{loc.uri}: no model.safetensors or backbone.safetensors")


def export_seeded_segmenter(loc: Location, seed: int, size: str = "tiny") -> None:
    """A freshly initialised (seeded) segmentation model exported exactly as `raysvc finetune` exports one: what the
    serving benchmark and tests load when latency, not accuracy, is the question."""
    from raysvc.data.schema import CLASS_NAMES
    from raysvc.data.transforms import PreprocessConfig
    from raysvc.models.heads import SegModel
    from raysvc.models.ptv3 import preset

    torch.manual_seed(seed)
    model = SegModel(preset(size), len(CLASS_NAMES), "dec")
    save_model(loc, model.state_dict(), {
        "model": {"size": size, "overrides": {}, "head": "dec", "mode": "scratch", "grid_voxels": 1.0,
                  "center_events": False}, "num_classes": len(CLASS_NAMES), "class_names": list(CLASS_NAMES),
        "preprocess": PreprocessConfig().model_dump(mode="json"), "step": 0})  # fmt: skip

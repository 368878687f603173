"""Models in and out of raysvc: `load(path)` reads a raysvc export, a Sonata / Pointcept checkpoint file or a pimm
export directory (never downloading: the files are the user's) into an eval-mode network that carries its record;
`encode(model, points)` runs its encoder stage by stage. `raysvc weights import | export` (hub/convert.py) write
the formats; docs/weights.md says what maps to what.

    import raysvc.hub as hub
    model = hub.load("Panda-Base/")          # a pimm export directory
    model.record.licence, model.record.unstated
    stages = hub.encode(model, points)
"""

from __future__ import annotations

from torch import nn

from raysvc.hub.answers import Answers, require_stated
from raysvc.hub.encode import encode
from raysvc.hub.formats import FORMATS, Source, detect, network, read
from raysvc.inference.record import ExportedModel
from raysvc.storage import Location, absolute_uri, resolve

__all__ = ["FORMATS", "Answers", "Source", "detect", "encode", "load", "read", "read_model"]


def load(path: str, **answers) -> nn.Module:
    """The model at `path` (a local path or URI, any of the three formats): the PTv3 (or PoLAr-MAE) encoder for a
    backbone, the segmenter for a fine-tuned export, freshly built, its weights loaded strictly, in eval mode, with
    the export record as `.record` (detector, preprocessing, class names, licence, source). `answers` (fields of
    `Answers`: detector, grid_voxels, center_events, licence, config, prefix, source) fill what a foreign source
    does not state; what is still open is listed in `.record.unstated`, its fields holding placeholders."""
    got = read(resolve(absolute_uri(path)), Answers(**answers))
    model = network(got.record)
    model.load_state_dict(got.state)
    model.eval()
    model.record = got.record
    return model


# what running a model needs stated (its licence, if unknown, stays unknown)
RUN_NEEDS = ("detector", "grid_voxels", "center_events", "class_names")


def read_model(loc: Location, needs: tuple[str, ...] = RUN_NEEDS, **answers) -> tuple[dict, ExportedModel]:
    """(weights, record) of a model in any format, for the commands that run one (predict, evaluate, serve,
    fine-tuning's init): its record must state `needs`, how its inputs are made and what its outputs are (a foreign
    source needs `raysvc weights import`, or the answers, first)."""
    got = read(loc, Answers(**answers))
    require_stated(got.record, loc.uri, needs)
    return got.state, got.record

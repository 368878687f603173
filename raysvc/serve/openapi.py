"""The endpoint's contract as OpenAPI: request bodies in all three encodings, responses, every error status and the
bearer scheme, so that a client can be generated from `/openapi.json`. The route handlers read raw bodies (for the
binary encodings and for parse errors in the endpoint's own words), so FastAPI cannot infer any of this from them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field, create_model

from raysvc.inference.outputs import all_outputs
from raysvc.serve.protocol import ACCEPTED_DTYPES, ARROW, JSON, NPZ

BEARER = "bearer"


class SegmentRequest(BaseModel):
    """One event. Numbers only: strings, booleans and nulls are refused (422), as are duplicate keys."""

    points: list[Annotated[list[float], Field(min_length=3, max_length=3)]] = Field(
        description="coordinates in the detector's units, one [x, y, z] per point (lartpc: voxels; wch: cm)"
    )
    energies: list[float] = Field(description="each point's amplitude (>= 0): lartpc MeV deposited, wch PE")
    times: list[float] | None = Field(None, description="each point's hit time in ns (a detector with times: wch)")
    detector: str | None = Field(
        None, description="the detector the event comes from (lartpc, wch); default: the model's own"
    )
    probabilities: bool = Field(False, description="also return each point's class probabilities")

    model_config = {"extra": "forbid"}


class Timing(BaseModel):
    receive: float
    parse: float
    infer: float
    total: float


class SegmentResponseBase(BaseModel):
    model: str = Field(description="the model that answered")
    num_points: int
    classes: list[int] = Field(description="class id per point; -1 below the model's energy threshold")
    class_names: list[str]
    probabilities: list[list[float] | None] | None = Field(
        None, description="per point (null below the energy threshold), when asked for"
    )


def segment_response() -> type[BaseModel]:
    """The answer's schema: the fields every model gives, then one optional field per registered output adapter
    (plug-ins included), each with its own schema, then the timings."""
    extra = {
        o.field: (
            (o.response_model if o.response_model is not None else Any) | None,
            Field(None, description=o.description),
        )
        for o in all_outputs()
    }
    return create_model("SegmentResponse", __base__=SegmentResponseBase, **extra, timing_ms=(Timing, ...))


# What the route declares when the app is imported: the fields every model gives. The output adapters' fields join
# it when the schema is first asked for (`add_outputs`), so that importing the endpoint loads no plug-in.
SegmentResponse = create_model("SegmentResponse", __base__=SegmentResponseBase, timing_ms=(Timing, ...))


class ModelInfo(BaseModel):
    id: str
    uri: str
    classes: list[str]
    detector: str = Field(description="the detector whose events the model takes (lartpc, wch)")
    outputs: list[str] = Field(description="its output adapters: what its answers carry beyond a class per point")
    event_heads: bool = Field(False, description="whether answers carry `event` (ring count and PID)")
    size: str
    mode: str


class ModelList(BaseModel):
    default: str
    models: list[ModelInfo]


class Health(BaseModel):
    status: str
    models: int


class ErrorResponse(BaseModel):
    error: str = Field(description="what was wrong, naming the field, array or column")
    status: int


def _error(text: str) -> dict:
    return {"description": text, "model": ErrorResponse}


AUTH_ERRORS = {401: _error("missing or wrong bearer token")}
SEGMENT_ERRORS = {
    **AUTH_ERRORS,
    400: _error("a body its encoding cannot parse (malformed JSON, not an .npz, a broken Arrow stream)"),
    404: _error("unknown model id in X-Model-Id"),
    408: _error("the body did not arrive within the endpoint's body timeout"),
    413: _error("too many points, or a body over the byte limit (also before decompression)"),
    415: _error("a Content-Type other than the three accepted"),
    422: _error(
        "a body that parses but breaks the contract: missing / unknown / duplicate fields, wrong types "
        "or shapes, NaN, negative energy, outside the detector volume, no points; an event of another detector "
        "than the model's (`detector mismatch`), times for a detector without them, a wch event without times"
    ),
    500: _error("an error inside the endpoint (a bug: please report it with the request)"),
    503: _error(
        "overloaded (more requests queued than the endpoint takes) or no replica ready; retry after the "
        "Retry-After header's seconds"
    ),
}

SEGMENT_BODY = {
    "required": True,
    "content": {
        JSON: {"schema": SegmentRequest.model_json_schema()},
        NPZ: {
            "schema": {"type": "string", "format": "binary"},
            "description": f"np.savez(f, points=(n, 3), energies=(n,)[, times=(n,)]) with dtypes "
            f"{ACCEPTED_DTYPES}; the probabilities and detector query parameters as for any encoding",
        },
        ARROW: {
            "schema": {"type": "string", "format": "binary"},
            "description": "an Arrow IPC stream of one table with exactly the columns x, y, z, energy and, "
            f"for a detector with hit times, time ({ACCEPTED_DTYPES}, no nulls); compression (lz4 / zstd) allowed",
        },
    },
}


def add_outputs(schema: dict) -> dict:
    """The generated schema with the answer's full model (`segment_response`: every registered output's field, the
    plug-ins' loaded now) in place of the one the route declared, generated by FastAPI as for any route."""
    from fastapi.openapi.utils import get_openapi
    from fastapi.routing import APIRoute

    answer = APIRoute("/", lambda: None, response_model=segment_response())
    full = get_openapi(title="", version="", routes=[answer])["components"]["schemas"]
    schema["components"]["schemas"] = dict(sorted((schema["components"]["schemas"] | full).items()))
    return schema


def add_security(schema: dict) -> dict:
    """The bearer scheme, in the generated schema's components."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[BEARER] = {"type": "http", "scheme": "bearer", "description": "RAYSVC_SERVE_TOKEN of the server"}
    return schema

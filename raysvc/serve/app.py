"""The Ray Serve segmentation endpoint: a FastAPI ingress over fine-tuned models exported by `raysvc finetune`.

- `POST /v1/segment`: one event (JSON, .npz or Arrow IPC; see protocol.py) -> per-point class ids (-1 below the
  energy threshold), optional softmax probabilities, the model id and timings, and a field per output adapter of
  the model (inference/outputs: a panoptic model's `instances`, event heads' `event`, a plug-in's own). The model
  is the one named by the `X-Model-Id` header (several fine-tuned heads behind one endpoint), else the default.
- `GET /v1/models`: the loaded models; `GET /healthz`: liveness (no auth); `/docs`: OpenAPI.
- `GET /viewer` (and its `/viewer/plotly.js`): a browser page that sends one event file to /v1/segment with the
  token typed into it and draws the answer in 3D. No auth: it is static and holds no data; its requests need the token.
- Auth: `Authorization: Bearer <token>` on every /v1 route, compared in constant time. The token is read by each
  replica from RAYSVC_SERVE_TOKEN or the file RAYSVC_SERVE_TOKEN_FILE, never passed as an argument (arguments land
  in Serve's config and logs).
- Preprocessing and inference are `raysvc.inference.segmenter.Segmenter`, the code `raysvc predict` runs: the
  events pass the data contract's checks (finite, energy >= 0, inside the volume, non-empty) and get its messages
  back as 422s.
- Dynamic batching (`@serve.batch`) bounded by the total points per batch (`batch_size_fn`), so one huge event
  never rides with many others; requests for different models in one batch are run model by model.
- Resources are bounded per request: the body is streamed with a byte limit (chunked bodies too) and a time limit
  (a stalled sender gets 408 and frees its slot), parsing never inflates past the point limit (protocol.py), each
  replica takes `max_ongoing_requests` at once and each proxy queues `max_queued_requests` more before answering
  503 with Retry-After. Every error, FastAPI's own included, is one JSON shape: {"error": ..., "status": ...}.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at import time.
import asyncio
import hmac
import json
import math
import os
import time
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve
from starlette.exceptions import HTTPException

from raysvc.data.contract.schema import EventDataError, WrongDetector
from raysvc.serve import openapi
from raysvc.serve.binding import bind_replica_grpc_to_node_ip
from raysvc.serve.protocol import CONTENT_TYPES, Event, Limits, RequestError, parse

REQUEST_FIELD = {
    "coord": "points",
    "energy": "energies",
    "num_points": "points",
    "time": "times",
}  # contract field -> request
# Ray Serve's request path without two thread hops (user code and router on the replica's / proxy's own event loop)
# and with gRPC from proxy to replica: three of the switches RAY_SERVE_THROUGHPUT_OPTIMIZED bundles. Measured by
# `raysvc bench serve`: ~2.5 ms less per request on 2 cores. Read by every Serve process at start, so `raysvc serve`
# sets them for the Ray it starts; on a cluster they belong in the nodes' environment (cluster/kuberay).
FAST_PATH_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
}
TOKEN_ENV, TOKEN_FILE_ENV = "RAYSVC_SERVE_TOKEN", "RAYSVC_SERVE_TOKEN_FILE"
HOW_TO_SET_TOKEN = (
    f"set {TOKEN_ENV} to a secret (e.g. `export {TOKEN_ENV}=$(openssl rand -hex 32)`) or "
    f"{TOKEN_FILE_ENV} to a file holding it; clients send `Authorization: Bearer <token>`"
)


class ServeConfig(BaseModel):
    """Arguments of the Serve application (`raysvc serve` flags, or `args` of a `serve deploy` config)."""

    model_config = ConfigDict(extra="forbid")
    models: dict[str, str] = Field(description="model id -> exported model directory (file:// or s3://)")
    default_model: str | None = Field(None, description="used without an X-Model-Id header (default: the first)")
    auth: bool = Field(True, description="require the bearer token (off only for a trusted loopback test)")
    batching: bool = True
    max_batch_size: int = Field(200_000, gt=0, description="total points per batch")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="how long a batch waits to fill; 0: it takes what "
        "queued during the previous forward, and a lone request never waits",
    )
    max_body_bytes: int = Field(
        16 * 2**20,
        gt=0,
        description="bytes per request body (a 200,000-point event is about 8 MB of JSON, 3 MB of float32 .npz)",
    )
    max_points: int = Field(200_000, gt=0, description="points per event")
    body_timeout_s: float = Field(
        10.0, gt=0, description="time to receive a body; slower or stalled senders get 408 and their slot back"
    )
    # In flight per replica, counting requests still sending their bodies: enough that a handful of stalled senders
    # leave room for everyone else (Serve's default, 5, let 6 stalled connections block the endpoint) and that
    # batches can fill; small enough that the bodies it holds stay bounded (32 x max_body_bytes = 512 MiB).
    max_ongoing_requests: int = Field(32, gt=0, description="requests in flight per replica")
    max_queued_requests: int = Field(
        64, ge=-1, description="requests each proxy queues beyond those; more get 503 with Retry-After (-1: no limit)"
    )
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After of a 503")
    replicas: int = Field(1, gt=0)
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0, description="> 0: the replica runs its models on CUDA")
    torch_threads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if not self.models:
            raise ValueError("give at least one model (id -> exported model directory)")
        if self.default_model is None:
            self.default_model = next(iter(self.models))
        if self.default_model not in self.models:
            raise ValueError(f"default_model {self.default_model!r} is not one of {sorted(self.models)}")
        if self.max_batch_size < self.max_points:
            raise ValueError(
                f"max_batch_size ({self.max_batch_size} points) must hold the largest event "
                f"(max_points {self.max_points})"
            )
        return self


def read_token() -> str | None:
    """The serving token from the environment or its file; None when neither is set."""
    token = os.environ.get(TOKEN_ENV)
    if not token and os.environ.get(TOKEN_FILE_ENV):
        path = Path(os.environ[TOKEN_FILE_ENV]).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as e:
            raise RuntimeError(f"{TOKEN_FILE_ENV}={path}: cannot read the serving token ({e})") from e
    return token or None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


# The viewer runs plotly.js (which compiles WebGL shaders at run time, hence 'unsafe-eval') and talks to this origin
# only, so a token typed into it cannot be sent anywhere else.
VIEWER_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@cache
def _viewer_file(name: str) -> bytes:
    if name == "plotly.js":  # the bundle of the plotly package installed here, no CDN
        from plotly.offline import get_plotlyjs

        return get_plotlyjs().encode()
    if name == "plotly.js.gz":
        import gzip

        return gzip.compress(_viewer_file("plotly.js"), mtime=0)
    return files("raysvc.serve").joinpath(name).read_bytes()


def _json_probs(p: np.ndarray) -> list:
    return [None if math.isnan(row[0]) else [round(float(v), 6) for v in row] for row in p]


api = FastAPI(
    title="raysvc segmentation",
    version="1",
    description="Per-point semantic segmentation of LArTPC events with fine-tuned PTv3 models. Every /v1 "
    "route needs `Authorization: Bearer <token>`; every error is {error, status}.",
)


def _openapi() -> dict:
    if api.openapi_schema is None:
        schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        api.openapi_schema = openapi.add_security(openapi.add_outputs(schema))
    return api.openapi_schema


api.openapi = _openapi


@api.exception_handler(RequestValidationError)
async def _invalid_parameter(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own checks (the query string) in the endpoint's error shape, naming the parameter."""
    what = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return _error(422, what)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths (404) and methods (405) in the endpoint's error shape."""
    return _error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")


@serve.deployment(name="segment")
@serve.ingress(api)
class SegmentService:
    def __init__(self, config: dict):
        import torch

        from raysvc.inference.segmenter import Segmenter
        from raysvc.storage import resolve

        self.cfg = ServeConfig.model_validate(config)
        if self.cfg.torch_threads:
            torch.set_num_threads(self.cfg.torch_threads)
        self.bound = bind_replica_grpc_to_node_ip()  # before Serve starts that server, just after this __init__
        self.token = read_token() if self.cfg.auth else None
        if self.cfg.auth and not self.token:
            raise RuntimeError(f"the endpoint requires a bearer token: {HOW_TO_SET_TOKEN}")
        device = "cuda" if self.cfg.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        self.models = {mid: Segmenter(resolve(uri), device) for mid, uri in self.cfg.models.items()}
        self.uris = dict(self.cfg.models)
        self.limits = Limits(self.cfg.max_body_bytes, self.cfg.max_points)
        self._infer_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._infer_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)

    def _authorised(self, request: Request) -> JSONResponse | None:
        if not self.cfg.auth:
            return None
        header = request.headers.get("authorization", "")
        if not header:
            return _error(401, f"missing Authorization header: send `Authorization: Bearer <token>` ({TOKEN_ENV})")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return _error(401, "wrong bearer token")
        return None

    @api.get("/healthz", response_model=openapi.Health)
    def healthz(self) -> dict:
        return {"status": "ok", "models": len(self.models)}

    @api.get("/viewer", include_in_schema=False)
    def viewer(self) -> Response:
        return Response(_viewer_file("viewer.html"), media_type="text/html; charset=utf-8", headers=VIEWER_HEADERS)

    @api.get("/viewer/plotly.js", include_in_schema=False)
    def viewer_plotly(self, request: Request) -> Response:
        # 4.8 MB, over the 4 MiB a gRPC message from replica to proxy may hold: gzipped (1.4 MB) for every browser,
        # in 1 MiB chunks for a client that takes no gzip
        headers = VIEWER_HEADERS | {"Cache-Control": "public, max-age=86400", "Vary": "Accept-Encoding"}
        media = "text/javascript; charset=utf-8"
        if "gzip" in request.headers.get("accept-encoding", ""):
            headers["Content-Encoding"] = "gzip"
            return Response(_viewer_file("plotly.js.gz"), media_type=media, headers=headers)
        js = _viewer_file("plotly.js")
        chunks = (js[i : i + 2**20] for i in range(0, len(js), 2**20))
        return StreamingResponse(chunks, media_type=media, headers=headers)

    @api.get(
        "/v1/models",
        response_model=openapi.ModelList,
        responses=openapi.AUTH_ERRORS,
        openapi_extra={"security": [{openapi.BEARER: []}]},
    )
    def list_models(self, request: Request):
        if (denied := self._authorised(request)) is not None:
            return denied
        return {
            "default": self.cfg.default_model,
            "models": [
                {
                    "id": mid,
                    "uri": self.uris[mid],
                    "classes": list(seg.class_names),
                    "detector": seg.detector.name,
                    "outputs": [o.name for o in seg.outputs],
                    "size": seg.record.model.size,
                    "mode": seg.record.model.mode,
                }
                | {k: v for o in seg.outputs for k, v in o.model_info().items()}
                for mid, seg in self.models.items()
            ],
        }

    @api.post(
        "/v1/segment",
        response_model=openapi.SegmentResponse,
        responses=openapi.SEGMENT_ERRORS,
        openapi_extra={"requestBody": openapi.SEGMENT_BODY, "security": [{openapi.BEARER: []}]},
    )
    async def segment(self, request: Request, probabilities: bool = False, detector: str | None = None):
        t0 = time.perf_counter()
        if (denied := self._authorised(request)) is not None:
            return denied
        model_id = request.headers.get("x-model-id") or self.cfg.default_model
        if model_id not in self.models:
            return _error(404, f"unknown model id {model_id!r} (X-Model-Id); loaded: {sorted(self.models)}")
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.limits.max_body_bytes:
            return _error(413, f"body of {length} bytes: the limit is {self.limits.max_body_bytes}")
        if (request.headers.get("content-type") or "").split(";")[0].strip().lower() not in CONTENT_TYPES:
            return _error(
                415,
                f"content type {request.headers.get('content-type')!r} is not accepted: use one of "
                f"{', '.join(CONTENT_TYPES)}",
            )
        try:
            body = await self._read_body(request)
        except RequestError as e:  # the connection is left mid-body: close it rather than read the rest
            return JSONResponse({"error": str(e), "status": e.status}, e.status, headers={"Connection": "close"})
        t_body = time.perf_counter()
        try:
            event = parse(body, request.headers.get("content-type"), self.limits, probabilities, detector)
            seg = self.models[model_id]
            seg.check_detector(event.detector, event.times is not None)
            # the data contract, before the event joins a batch
            seg.check_event(event.points, event.energies, times=event.times)
        except RequestError as e:
            return _error(e.status, str(e))
        except EventDataError as e:  # the contract's own message, with its field named as the request names it
            return _error(422, f"{REQUEST_FIELD.get(e.field, e.field)}: {e.detail}")
        except WrongDetector as e:  # the event is another detector's, or brings times this one has none of
            return _error(422, str(e))
        t1 = time.perf_counter()
        if self.cfg.batching:
            classes, probs, extra = await self._infer_batch((model_id, event))
        else:
            classes, probs, extra = await asyncio.to_thread(self._infer_one, model_id, event)
        t2 = time.perf_counter()
        out = {
            "model": model_id,
            "num_points": len(classes),
            "classes": classes.tolist(),
            "class_names": list(seg.class_names),
        }
        if event.probabilities:
            out["probabilities"] = _json_probs(probs)
        out |= extra  # the outputs' fields (a panoptic model's `instances`, event heads' `event`, ...)
        out["timing_ms"] = {
            "receive": 1e3 * (t_body - t0),
            "parse": 1e3 * (t1 - t_body),
            "infer": 1e3 * (t2 - t1),
            "total": 1e3 * (time.perf_counter() - t0),
        }
        # Encoded here: FastAPI's jsonable_encoder would walk every per-point value first (~1 ms for 2,000 points)
        return Response(json.dumps(out), media_type="application/json")

    async def _read_body(self, request: Request) -> bytes:
        """The body, streamed: refused past max_body_bytes (a chunked body declares no length to check first) and
        past body_timeout_s (in Serve the replica pulls the body from the proxy, so a stalled sender would hold one
        of the replica's request slots for as long as it likes)."""
        chunks: list[bytes] = []
        size, limit = 0, self.limits.max_body_bytes

        async def receive() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"body of more than {limit} bytes: the limit is {limit}")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(receive(), self.cfg.body_timeout_s)
        except TimeoutError as e:
            declared = request.headers.get("content-length", "unknown")
            raise RequestError(
                408,
                f"the body did not arrive within {self.cfg.body_timeout_s:g} s ({size} of {declared} bytes received)",
            ) from e
        return b"".join(chunks)

    def _infer_one(self, model_id: str, event: Event) -> tuple:
        return self._run(model_id, [event])[0]

    def _run(self, model_id: str, events: list[Event]) -> list[tuple]:
        """(classes, probabilities or None, {response field: value} of the model's outputs) per event."""
        seg = self.models[model_id]
        want = any(e.probabilities for e in events)
        res = seg.predict_events_full([(e.points, e.energies, e.times) for e in events], probabilities=want)
        answers = []
        for r, e in zip(res, events, strict=True):
            extra = {o.field: o.to_json(r[o.name]) for o in seg.outputs}
            extra = {k: v for k, v in extra.items() if v is not None}
            answers.append((r["pred"], r["prob"] if e.probabilities else None, extra))
        return answers

    # ServeConfig's defaults here; each replica sets its config's values in __init__
    @serve.batch(
        max_batch_size=ServeConfig.model_fields["max_batch_size"].default,
        batch_wait_timeout_s=ServeConfig.model_fields["batch_wait_timeout_s"].default,
        batch_size_fn=lambda items: sum(len(e.points) for _, e in items),
    )
    async def _infer_batch(self, items: list[tuple[str, Event]]) -> list[tuple]:
        results: list = [None] * len(items)
        for model_id in dict.fromkeys(mid for mid, _ in items):
            idx = [i for i, (mid, _) in enumerate(items) if mid == model_id]
            outs = await asyncio.to_thread(self._run, model_id, [items[i][1] for i in idx])
            for i, o in zip(idx, outs, strict=True):
                results[i] = o
        return results


def build_app(args: dict) -> serve.Application:
    """The application for `serve run` / `serve deploy` configs (import path raysvc.serve.app:build_app) and for
    `raysvc serve`; `args` are ServeConfig fields."""
    cfg = ServeConfig.model_validate(args)
    opts = {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica}
    return SegmentService.options(
        num_replicas=cfg.replicas,
        ray_actor_options=opts,
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": cfg.retry_after_s},
    ).bind(cfg.model_dump())

"""`raysvc predict | serve`: batch predictions of an exported model, and the Ray Serve endpoint over such models."""

from __future__ import annotations

import argparse
import json
import os
import sys

from raysvc.cli.common import add_batch_args, batch_kwargs, batch_ray, resolved


def cmd_predict(a: argparse.Namespace) -> None:
    from raysvc.inference.batch import predict_dataset

    batch_ray(a.actors)
    info = predict_dataset(
        resolved(a.model), resolved(a.data), resolved(a.out), a.batch_events, a.device, **batch_kwargs(a)
    )
    print(json.dumps({k: v for k, v in info.items() if k != "shards"}, indent=2))


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_serve(a: argparse.Namespace) -> None:
    import signal
    import time

    from raysvc.hub import read_model
    from raysvc.ray_init import init_ray
    from raysvc.serve.app import FAST_PATH_ENV, HOW_TO_SET_TOKEN, ServeConfig, build_app, read_token
    from raysvc.storage import absolute_uri, resolve

    models, licences = {}, {}
    for item in ([a.checkpoint] if a.checkpoint else []) + (a.model or []):
        mid, _, uri = item.partition("=") if "=" in item else (None, "", item)  # ids have no "="; URIs may
        uri = absolute_uri(uri)
        mid = mid or uri.rstrip("/").rsplit("/", 1)[-1]
        if mid in models:
            raise ValueError(f"model id {mid!r} given twice; name them: --model ID=URI")
        _, record = read_model(resolve(uri))  # fails here, naming the directory, rather than in a replica
        models[mid] = uri
        if record.licence:
            print(f"[raysvc] model {mid}: licence {record.licence}", file=sys.stderr, flush=True)
        licences[mid] = record.licence
    batching = {
        k: v
        for k, v in (
            ("max_batch_size", a.max_batch_points),
            ("batch_wait_timeout_s", None if a.batch_wait_ms is None else a.batch_wait_ms / 1e3),
            ("body_timeout_s", a.body_timeout_s),
            ("max_body_bytes", a.max_body_bytes),
            ("max_ongoing_requests", a.max_ongoing_requests),
            ("max_queued_requests", a.max_queued_requests),
        )
        if v is not None
    }
    cfg = ServeConfig(
        models=models,
        auth=not a.no_auth,
        batching=not a.no_batching,
        replicas=a.replicas,
        cpus_per_replica=a.cpus_per_replica,
        torch_threads=a.torch_threads,
        **batching,
    )
    if cfg.auth and not read_token():
        raise ValueError(
            f"raysvc serve requires a bearer token: {HOW_TO_SET_TOKEN} (or --no-auth, for a trusted loopback-only test)"
        )
    if a.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"raysvc: warning: binding {a.host}, beyond loopback (auth {'on' if cfg.auth else 'OFF'})", file=sys.stderr
        )
    from ray import serve

    for key, value in FAST_PATH_ENV.items():  # for the Ray started here; one already running keeps its own
        os.environ.setdefault(key, value)
    init_ray(logging_level="WARNING", include_dashboard=False)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: Serve and Ray shut down cleanly
    try:
        serve.start(http_options={"host": a.host, "port": a.port, "request_timeout_s": a.request_timeout_s})
        serve.run(build_app(cfg.model_dump()), name="raysvc", route_prefix="/")
        print(
            json.dumps(
                {
                    "url": f"http://{a.host}:{a.port}",
                    "models": models,
                    "default": cfg.default_model,
                    "auth": cfg.auth,
                    "batching": cfg.batching,
                    "licences": licences,
                }
            ),
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


def add_parser(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser("predict", help="per-point predictions of an exported model on a dataset")
    pr.add_argument("--model", required=True, help="exported model directory (model.safetensors + config.json)")
    pr.add_argument("--data", required=True, help="dataset URI (shards + manifest)")
    pr.add_argument(
        "--out", required=True, help="output URI: preds-NNNNN.parquet (event_id, num_points, pred) + manifest.json"
    )
    pr.add_argument("--batch-events", type=int, default=8)
    pr.add_argument("--device", default="cpu", help="torch device, e.g. cuda or cuda:1")
    add_batch_args(pr)
    pr.set_defaults(fn=cmd_predict)

    sv = sub.add_parser(
        "serve",
        help="the segmentation endpoint (Ray Serve, FastAPI) over exported fine-tuned "
        "models; bearer token from RAYSVC_SERVE_TOKEN or RAYSVC_SERVE_TOKEN_FILE",
    )
    sv.add_argument("--checkpoint", help="exported model directory (file:// or s3://); its id is its last path part")
    sv.add_argument(
        "--model",
        action="append",
        metavar="ID=URI",
        help="another model behind the endpoint (chosen with the X-Model-Id header)",
    )
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--replicas", type=int, default=1)
    sv.add_argument("--cpus-per-replica", type=float, default=1.0)
    sv.add_argument("--torch-threads", type=int, default=None)
    sv.add_argument("--no-batching", action="store_true", help="one forward per request")
    sv.add_argument(
        "--max-batch-points",
        type=int,
        help="points per batch (default 200,000; at least the largest event the endpoint takes)",
    )
    sv.add_argument(
        "--batch-wait-ms",
        type=float,
        help="how long a batch waits to fill (default 0: batches form "
        "from the requests queued during the previous forward)",
    )
    sv.add_argument("--no-auth", action="store_true", help="no bearer token (trusted loopback tests only)")
    sv.add_argument("--max-body-bytes", type=int, help="bytes per request body (default 16 MiB)")
    sv.add_argument("--body-timeout-s", type=float, help="time to receive a body before 408 (default 10)")
    sv.add_argument("--max-ongoing-requests", type=int, help="requests in flight per replica (default 32)")
    sv.add_argument("--max-queued-requests", type=int, help="requests queued at the proxy before 503 (default 64)")
    sv.add_argument(
        "--request-timeout-s", type=float, default=60.0, help="end-to-end limit at the proxy, 408 after it (default 60)"
    )
    sv.set_defaults(fn=cmd_serve)

"""The two browser views, driven in a real headless chromium (Debian's, through Playwright): the HTML file of
`raysvc display` and the /viewer page of a real `raysvc serve`. What the pages drew is read back from plotly's
figure data in the page and counted against the shard (or the seeded subsample) and against /v1/segment's answer.

RAYSVC_SCREENSHOTS=docs python -m pytest tests/test_viewer_browser.py -p no:cacheprovider
also writes the screenshots in docs/ (viewer-display.png, viewer-display-wch.png, viewer-endpoint.png)."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from raysvc.cli import main as raysvc_main
from raysvc.data.contract.schema import flat_values
from raysvc.data.streaming.shards import load_manifest, read_shard
from raysvc.storage import resolve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SHOTS = os.environ.get("RAYSVC_SCREENSHOTS")
TOKEN = "viewer-token-0123456789abcdef"
# headless chromium has no GPU: WebGL (plotly's 3D) through SwiftShader
ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
TRACE_COUNTS = "id => Object.fromEntries(document.getElementById(id).data.map(t => [t.meta.value, t.x.length]))"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (`make test` installs Debian's: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.requests = []
    page.on("request", lambda r: page.requests.append(r.url))
    return page


def _counts(page, div: str = "view3d") -> dict[int, int]:
    return {int(k): v for k, v in page.evaluate(TRACE_COUNTS, div).items()}


def _shot(page, name: str) -> None:
    if SHOTS:
        page.screenshot(path=str(Path(SHOTS) / name))


def _shard_events(root) -> list[dict]:
    out = []
    for rec in load_manifest(root).shards:
        t = read_shard(root, rec)
        for r in range(t.num_rows):
            row = t.slice(r, 1)
            out.append({k: flat_values(row, k) for k in ("semantic", "energy")} | {"id": row["event_id"][0].as_py()})
    return out


def _subsample(events: list[dict], cap: int, seed: int = 0) -> list[np.ndarray]:
    """The points the display keeps per event: all, or a seeded sample drawn event after event (display_html)."""
    rng = np.random.default_rng(seed)
    n = [len(e["semantic"]) for e in events]
    return [np.sort(rng.choice(k, cap, replace=False)) if k > cap else np.arange(k) for k in n]


def _write_predictions(root, out: Path) -> None:
    """A `raysvc predict` output by hand: the truth with every 7th point wrong and every 11th below threshold."""
    out.mkdir()
    names = []
    for i, rec in enumerate(load_manifest(root).shards):
        t = read_shard(root, rec)
        rows = []
        for r in range(t.num_rows):
            sem = flat_values(t.slice(r, 1), "semantic").astype(np.int8)
            pred = sem.copy()
            pred[::7] = (pred[::7] + 1) % 5
            pred[::11] = -1
            rows.append({"event_id": t["event_id"][r].as_py(), "num_points": len(sem), "pred": pred.tolist()})
        names.append(f"preds-{i:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), out / names[-1])
    (out / "manifest.json").write_text(json.dumps({"files": names}))


def test_display_html_draws_every_class_of_every_event_offline(browser, tmp_path):
    from raysvc.data.sources.synthetic import generate_dataset
    from raysvc.data.sources.wch_generator import WChGeneratorConfig

    lar, wch = resolve(str(tmp_path / "lar")), resolve(str(tmp_path / "wch"))
    generate_dataset(lar, 4, seed=1, shard_events=2, show_progress=False)
    cfg = WChGeneratorConfig(particles={1: 1.0, 2: 1.0}, kinetic_mev=(200.0, 600.0))
    generate_dataset(wch, 3, seed=5, shard_events=2, cfg=cfg, show_progress=False, detector="wch")
    _write_predictions(lar, tmp_path / "preds")
    cap = 3000  # below the generated LArTPC events' sizes (some of them), above the tanks'
    html = tmp_path / "lar.html"
    args = ["--data", lar.path, "--out", str(html), "--events", "3", "--max-points", str(cap)]
    raysvc_main(["display", *args, "--predictions", str(tmp_path / "preds")])
    raysvc_main(["display", "--data", wch.path, "--out", str(tmp_path / "wch.html"), "--max-points", str(cap)])
    assert b"<script src=" not in html.read_bytes()  # plotly.js is inline, nothing loaded from elsewhere

    events = _shard_events(lar)[:3]
    keep = _subsample(events, cap)
    assert any(len(k) < len(e["semantic"]) for k, e in zip(keep, events, strict=True)), "no event was capped"
    page = _page(browser)
    page.goto(html.as_uri())
    page.wait_for_function("document.getElementById('view3d').data !== undefined")
    assert page.locator("#event option").count() == 3
    for i, (ev, k) in enumerate(zip(events, keep, strict=True)):
        page.select_option("#event", str(i))
        page.click("#modes button[value=truth]")
        assert page.inner_text("#title") and f"event {ev['id']}" in page.inner_text("#note")
        assert _counts(page) == dict(Counter(ev["semantic"][k].tolist())), f"event {ev['id']}"
        if len(k) < len(ev["semantic"]):  # the page says it shows a sample, of how many, and the cap
            note = page.inner_text("#note")
            assert f"random subsample of {cap} of {len(ev['semantic'])} points" in note and "seed 0" in note
        else:
            assert sum(_counts(page).values()) == len(ev["semantic"])
        sem = ev["semantic"][k].astype(np.int64)
        pred = sem.copy()
        idx = np.arange(len(ev["semantic"]))[k]
        pred[idx % 7 == 0] = (pred[idx % 7 == 0] + 1) % 5
        pred[idx % 11 == 0] = -1
        page.click("#modes button[value=pred]")
        assert _counts(page) == dict(Counter(pred.tolist()))
        page.click("#modes button[value=error]")
        err = np.where(pred < 0, -1, (pred != sem).astype(int))
        assert _counts(page) == dict(Counter(err.tolist()))
        if i == 0:
            page.click("#modes button[value=truth]")
            _shot(page, "viewer-display.png")
    page.click("#modes button[value=energy]")
    assert len(page.evaluate("document.getElementById('view3d').data")) == 1
    assert not page.errors and all(u.startswith(("file:", "data:", "blob:")) for u in page.requests), page.requests

    tank = _shard_events(wch)
    page = _page(browser)
    page.goto((tmp_path / "wch.html").as_uri())
    page.wait_for_function("document.getElementById('unrolled').data !== undefined")
    for i, ev in enumerate(tank):
        page.select_option("#event", str(i))
        assert _counts(page) == dict(Counter(ev["semantic"].tolist()))
        unrolled = page.evaluate("document.getElementById('unrolled').data[0]")
        assert len(unrolled["x"]) == len(ev["semantic"]) and unrolled["meta"]["kind"] == "tank-charge"
    page.click("#tank-modes button[value=time]")
    assert page.evaluate("document.getElementById('unrolled').data[0].meta.kind") == "tank-time"
    page.select_option("#event", "0")
    _shot(page, "viewer-display-wch.png")
    assert not page.errors


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from raysvc.inference.record import export_seeded_segmenter
    from raysvc.seaweed import free_port
    from raysvc.serve.process import ServeProcess

    root = tmp_path_factory.mktemp("viewer")
    export_seeded_segmenter(resolve(str(root / "model")), 1)
    args = ["--model", f"a={root / 'model'}", "--torch-threads", "1"]
    with ServeProcess(args, free_port(), TOKEN, root / "serve.log") as srv:
        yield srv


def _event_files(tmp_path: Path) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    from raysvc.data.sources.lartpc_generator import GeneratorConfig, generate_event

    ev = generate_event(GeneratorConfig(), 21, 0)
    points, energies = ev["coord"].astype(np.float32), ev["energy"].astype(np.float32)
    npz = tmp_path / "event.npz"
    np.savez(npz, points=points, energies=energies)
    arrow = tmp_path / "event.arrow"
    table = pa.table({"x": points[:, 0], "y": points[:, 1], "z": points[:, 2], "energy": energies})
    with pa.ipc.new_stream(str(arrow), table.schema) as w:
        w.write_table(table, max_chunksize=len(points) // 2 + 1)  # two record batches
    return npz, arrow, points, energies


@pytest.mark.slow
def test_viewer_segments_an_uploaded_event_and_shows_a_401(browser, server, tmp_path):
    npz, arrow, points, energies = _event_files(tmp_path)
    page_http = requests.get(f"{server.url}/viewer", timeout=10)  # no auth for the page itself
    assert page_http.status_code == 200 and "connect-src 'self'" in page_http.headers["content-security-policy"]
    for encoding in ("gzip", "identity"):  # gzipped, or streamed in chunks: each under gRPC's 4 MiB per message
        js = requests.get(f"{server.url}/viewer/plotly.js", headers={"Accept-Encoding": encoding}, timeout=30)
        assert js.status_code == 200 and len(js.content) > 4 * 2**20 and js.content.rstrip().endswith(b";")
    buf = io.BytesIO()
    np.savez(buf, points=points, energies=energies)
    want = requests.post(
        f"{server.url}/v1/segment",
        data=buf.getvalue(),
        headers={"Content-Type": "application/x-npz", "Authorization": f"Bearer {TOKEN}"},
        timeout=60,
    ).json()
    want_counts = dict(Counter(want["classes"]))
    assert len(want_counts) > 1

    page = _page(browser)
    page.goto(f"{server.url}/viewer")
    page.fill("#token", TOKEN)
    for f in (npz, arrow):  # the page reads the points from each encoding itself
        page.evaluate("Plotly.purge('view3d')")
        page.set_input_files("#file", str(f))
        page.click("#send")
        page.wait_for_function("(document.getElementById('view3d').data || []).length > 0", timeout=60_000)
        assert _counts(page) == want_counts, f.name
        drawn = page.evaluate("document.getElementById('view3d').data.flatMap(t => Array.from(t.x))")
        assert sorted(drawn) == sorted(points[:, 0].tolist())
    assert "model a" in page.inner_text("#status")
    page.set_input_files("#file", str(npz))
    page.click("#send")
    page.wait_for_function("document.getElementById('status').textContent.includes('segmented')")
    _shot(page, "viewer-endpoint.png")

    page.fill("#token", "not-the-token")
    page.click("#send")
    page.wait_for_selector("#status.error")
    assert page.inner_text("#status") == "HTTP 401: wrong bearer token"
    assert not page.errors
    assert all(u.startswith(server.url) for u in page.requests), page.requests  # same origin only
    assert not any(TOKEN in u for u in page.requests)  # the token never rides in a URL

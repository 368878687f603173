"""A model directory written whole or not at all: its files go to a staging folder, which becomes the output only
when everything in it is written. A failure at any point leaves nothing at the output."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

from raysvc.storage import (
    Location,
    StorageError,
    exists,
    explained,
    list_files,
    read_bytes,
    resolve,
    write_bytes_atomic,
)


def check_free(out: Location) -> None:
    """The output must not exist yet (or be an empty local directory): an export is never written over another."""
    if not exists(out):
        return
    if not out.is_s3 and os.path.isdir(out.path) and not os.listdir(out.path):
        return
    raise ValueError(f"{out.uri}: already exists; choose a new --out (an export is never written over another)")


@contextlib.contextmanager
def staged(out: Location, last: str = "config.json") -> Iterator[str]:
    """Yields a local folder to write the directory's files into; on leaving without an error it becomes `out`
    (local: one rename; S3: every object uploaded, `last` at the end, as readers go by it), on an error it is
    removed. An upload that fails half-way removes the objects it had written."""
    check_free(out)
    if out.is_s3:
        folder = tempfile.mkdtemp(prefix="raysvc-weights-")
    else:
        parent = os.path.dirname(out.path.rstrip("/"))
        os.makedirs(parent, exist_ok=True)
        folder = os.path.join(parent, f".{os.path.basename(out.path.rstrip('/'))}.{uuid.uuid4().hex}.tmp")
        os.mkdir(folder)
    try:
        yield folder
        if out.is_s3:
            _upload(folder, out, last)
        else:
            check_free(out)
            with explained(out, "writing"):
                if os.path.isdir(out.path):
                    os.rmdir(out.path)  # an empty directory the user made for it
                os.rename(folder, out.path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _upload(folder: str, out: Location, last: str) -> None:
    names = sorted(os.listdir(folder), key=lambda n: (n == last, n))
    try:
        for name in names:
            write_bytes_atomic(out.join(name), read_bytes(resolve(os.path.join(folder, name))))
    except StorageError:
        with contextlib.suppress(Exception):
            for name in list_files(out):
                out.fs.delete_file(out.join(name).path)
        raise

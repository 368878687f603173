"""Storage URIs, atomic writes, and S3 against a real SeaweedFS (auth errors included)."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from raysvc.storage import (
    S3Options,
    StorageAuthError,
    StorageError,
    exists,
    list_files,
    read_bytes,
    resolve,
    write_bytes_atomic,
)
from tests.conftest import s3_location


def test_resolve_local_forms(tmp_path):
    for uri in (str(tmp_path), tmp_path.as_uri()):
        loc = resolve(uri)
        assert isinstance(loc.fs, pafs.LocalFileSystem)
        assert loc.path == str(tmp_path)
    assert resolve("rel/dir").path == os.path.abspath("rel/dir")
    assert resolve(tmp_path.as_uri()).join("a", "b.parquet").path == str(tmp_path / "a" / "b.parquet")


@pytest.mark.parametrize(
    "uri, words",
    [
        ("", "empty"),
        ("gs://bucket/x", "unsupported scheme"),
        ("s3://", "s3://bucket"),
        ("file://host/x", "no host"),
    ],
)
def test_resolve_rejects_bad_uris(uri, words):
    with pytest.raises(StorageError, match=words):
        resolve(uri)


def test_bad_endpoint_is_named():
    with pytest.raises(StorageError, match="endpoint"):
        resolve("s3://b/x", S3Options(endpoint_url="localhost:9000"))


def test_atomic_write_replaces_whole_and_failed_write_leaves_nothing(tmp_path, monkeypatch):
    loc = resolve(str(tmp_path / "d" / "shard.parquet"))
    write_bytes_atomic(loc, b"first version")
    assert read_bytes(loc) == b"first version"

    # a writer that dies after writing part of the data: no half file, old version intact, no visible temporary
    real_fsync = os.fsync

    def crash(fd):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(StorageError, match="disk gone"):
        write_bytes_atomic(loc, b"second version, never completed")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert read_bytes(loc) == b"first version"
    assert os.listdir(tmp_path / "d") == ["shard.parquet"]
    assert list_files(resolve(str(tmp_path / "d"))) == ["shard.parquet"]


def test_s3_roundtrip_from_environment(s3_env):
    loc = resolve("s3://storage-test/dir/obj.bin")  # endpoint and keys from AWS_* variables only
    write_bytes_atomic(loc, b"payload")
    assert exists(loc)
    assert read_bytes(loc) == b"payload"
    assert list_files(resolve("s3://storage-test/dir")) == ["obj.bin"]


def test_s3_wrong_credentials_give_auth_error(seaweed):
    good = s3_location(seaweed, "s3://auth-test/x.bin")
    write_bytes_atomic(good, b"secret data")
    for key, secret in (("not-a-key", "nope"), (seaweed.access_key, "wrong-secret")):
        bad = resolve(
            "s3://auth-test/x.bin", S3Options(endpoint_url=seaweed.endpoint, access_key=key, secret_key=secret)
        )
        with pytest.raises(StorageAuthError, match="rejected the credentials.*AWS_ACCESS_KEY_ID") as e:
            read_bytes(bad)
        assert "s3://auth-test/x.bin" in str(e.value)
        assert secret not in str(e.value)  # secrets never in messages
        with pytest.raises(StorageAuthError):
            write_bytes_atomic(bad, b"overwrite attempt")
    assert read_bytes(good) == b"secret data"


def test_s3_missing_object_named(seaweed):
    loc = s3_location(seaweed, "s3://auth-test/absent.bin")
    with pytest.raises(StorageError, match="absent.bin"):
        read_bytes(loc)


def test_only_real_auth_failures_are_called_auth_errors(tmp_path):
    from raysvc.storage import explained

    loc = resolve(str(tmp_path / "events-00403.parquet"))
    with pytest.raises(StorageError) as e:
        with explained(loc, "reading"):
            raise OSError("When reading events-00403.parquet: AWS Error NETWORK_CONNECTION: connection reset")
    assert not isinstance(e.value, StorageAuthError)
    with pytest.raises(StorageAuthError):
        with explained(loc, "reading"):
            raise OSError("AWS Error UNKNOWN (HTTP status 403) during GetObject operation")


@pytest.mark.s3
def test_seaweed_dies_with_the_process_that_started_it(tmp_path):
    """A demo or test killed before it can stop its server leaves no server behind."""
    import subprocess
    import sys
    import time

    script = (
        "import os, sys\nfrom raysvc.seaweed import SeaweedS3\n"
        f"s = SeaweedS3(data_dir={str(tmp_path)!r}).start()\n"
        "print(s.proc.pid, flush=True)\nos._exit(0)  # no stop(), no cleanup\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    pid = int(p.stdout.split()[-1])

    def alive() -> bool:  # a zombie (state Z) has exited; its reaper, init, collects it later
        try:
            return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    if still := alive():
        os.kill(pid, 9)
    assert not still, "weed outlived the process that started it"

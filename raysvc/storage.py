"""Storage URIs: `file://`, bare paths and `s3://bucket/prefix`, resolved to a pyarrow filesystem.

pyarrow's filesystems are what Ray Data and Parquet read natively (its C++ S3 client, no Python in the byte path),
and they pickle, so the same object travels into Ray tasks. Endpoint and credentials for S3 come from the standard
AWS environment variables (AWS_ENDPOINT_URL[_S3], AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) or
from an explicit `S3Options`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import pyarrow.fs as pafs


class StorageError(OSError):
    """A storage operation failed; the message names the URI."""


class StorageAuthError(StorageError):
    """The object store rejected our credentials."""


# What pyarrow's S3 client puts in the message when the store refuses the credentials (never match a bare number:
# shard names contain digits).
_AUTH_MARKERS = (
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "HTTP status 403",
)


# An object store that stops answering (restarted, overloaded, a network blip) gets retried with exponential
# backoff for this many seconds in all (pyarrow's own client retries only ~3 times within a second); then the
# operation fails naming the URI. The environment variable reaches Ray's workers, which inherit the driver's.
RETRY_BUDGET_ENV = "RAYSVC_STORAGE_RETRY_S"
DEFAULT_RETRY_BUDGET_S = 120.0
# What pyarrow's S3 client says when the store cannot be reached or is unavailable (not: not found, forbidden).
_TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION",
    "curlCode",
    "Couldn't connect",
    "Connection refused",
    "timed out",
    "Timeout",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "INTERNAL_FAILURE",
    "HTTP status 500",
    "HTTP status 502",
    "HTTP status 503",
    "HTTP status 504",
    "Connection reset",
)


class StorageUnavailable(StorageError):
    """The object store did not answer within the retry budget."""


def retry_budget_s() -> float:
    raw = os.environ.get(RETRY_BUDGET_ENV)
    try:
        return float(raw) if raw else DEFAULT_RETRY_BUDGET_S
    except ValueError:
        raise StorageError(f"{RETRY_BUDGET_ENV}={raw!r}: expected a number of seconds") from None


def is_transient(e: BaseException) -> bool:
    """An error worth retrying: the store was unreachable or unavailable, not a missing object or refused keys."""
    if not isinstance(e, OSError) or isinstance(e, FileNotFoundError):
        return False
    text = str(e)
    return not any(m in text for m in _AUTH_MARKERS) and any(m in text for m in _TRANSIENT_MARKERS)


def retried(loc: Location, action: str, fn: Callable[[], object], budget_s: float | None = None):
    """`fn()`, retried while it fails with a transient S3 error: waits 0.5, 1, 2, ... (at most 16) s, until
    `budget_s` (RAYSVC_STORAGE_RETRY_S, default 120) has passed; then StorageUnavailable naming the URI. Every
    retry is said on stderr (a worker's reaches the driver's console). Local paths are not retried."""
    if not loc.is_s3:
        return fn()
    budget = retry_budget_s() if budget_s is None else budget_s
    t0, delay, attempt = time.monotonic(), 0.5, 1
    while True:
        try:
            return fn()
        except OSError as e:
            spent = time.monotonic() - t0
            if not is_transient(e):
                raise
            if spent + delay > budget:
                raise StorageUnavailable(
                    f"{action} {loc.uri}: the object store did not answer in {attempt} "
                    f"attempts over {spent:.0f} s ({RETRY_BUDGET_ENV}={budget:g}); last "
                    f"error: {_short(e)}"
                ) from e
            print(
                f"[raysvc] warning: {action} {loc.uri}: {_short(e)}; retry {attempt} in {delay:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(delay)
            delay, attempt = min(delay * 2, 16.0), attempt + 1


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


@dataclass(frozen=True)
class S3Options:
    """Explicit S3 settings; any field left None falls back to the standard AWS environment variable."""

    endpoint_url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str | None = None

    def resolved(self) -> S3Options:
        env = os.environ
        return S3Options(
            endpoint_url=self.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            access_key=self.access_key or env.get("AWS_ACCESS_KEY_ID"),
            secret_key=self.secret_key or env.get("AWS_SECRET_ACCESS_KEY"),
            region=self.region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1",
        )


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem, the path inside it, and the URI as the user wrote it (for messages)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *[p.strip("/") for p in parts]])
        uri = "/".join([self.uri.rstrip("/"), *[p.strip("/") for p in parts]])
        return Location(self.fs, path, uri)

    @property
    def is_s3(self) -> bool:
        return isinstance(self.fs, pafs.S3FileSystem)


def s3_filesystem(opts: S3Options | None = None) -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem for the configured endpoint (path-style, http allowed for local servers)."""
    o = (opts or S3Options()).resolved()
    kwargs: dict = {
        "region": o.region,
        "allow_bucket_creation": True,
        "connect_timeout": 5,
        "request_timeout": 60,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    }
    if o.access_key and o.secret_key:
        kwargs.update(access_key=o.access_key, secret_key=o.secret_key)
    if o.endpoint_url:
        parsed = urlparse(o.endpoint_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise StorageError(f"S3 endpoint {o.endpoint_url!r} must look like http(s)://host:port")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme, force_virtual_addressing=False)
    return pafs.S3FileSystem(**kwargs)


def absolute_uri(uri: str | None) -> str | None:
    """A relative path made absolute against this process's directory (Ray workers run elsewhere); URIs with a
    scheme unchanged."""
    if uri and urlparse(uri).scheme == "":
        return os.path.abspath(uri)
    return uri


def resolve(uri: str, s3: S3Options | None = None) -> Location:
    """Turn `file:///x`, `/x`, `rel/x` or `s3://bucket/prefix` into a Location."""
    if not uri:
        raise StorageError("empty storage URI: expected file:///path, a path, or s3://bucket/prefix")
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme == "file" else uri
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise StorageError(f"{uri!r}: file:// URIs take no host; write file:///absolute/path")
        return Location(pafs.LocalFileSystem(), os.path.abspath(path), uri)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"{uri!r}: expected s3://bucket/prefix")
        return Location(s3_filesystem(s3), f"{parsed.netloc}{parsed.path}".rstrip("/"), uri)
    raise StorageError(f"{uri!r}: unsupported scheme {parsed.scheme!r}; expected file://, a path, or s3://")


@contextlib.contextmanager
def explained(loc: Location, action: str) -> Iterator[None]:
    """Re-raise low-level storage errors with the URI, the action and, for auth failures, what to check."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(f"{action} {loc.uri}: not found ({e})") from e
    except OSError as e:
        text = str(e)
        if any(m in text for m in _AUTH_MARKERS):
            raise StorageAuthError(
                f"{action} {loc.uri}: the object store rejected the credentials ({text.split(':')[-1].strip()}). "
                "Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the config's s3 section) and the endpoint "
                "AWS_ENDPOINT_URL."
            ) from e
        raise StorageError(f"{action} {loc.uri}: {text}") from e


def ensure_dir(loc: Location) -> None:
    """Create the directory (or S3 bucket/prefix) if needed."""
    with explained(loc, "creating"):
        retried(loc, "creating", lambda: loc.fs.create_dir(loc.path, recursive=True))


def exists(loc: Location) -> bool:
    with explained(loc, "checking"):
        return retried(loc, "checking", lambda: loc.fs.get_file_info(loc.path)).type != pafs.FileType.NotFound


def read_bytes(loc: Location) -> bytes:
    """The whole object. (A random-access file reads it in one request: measured 8x faster on S3 than pyarrow's
    input stream, which fetches in small chunks.)"""

    def read() -> bytes:
        with loc.fs.open_input_file(loc.path) as f:
            return f.read()

    with explained(loc, "reading"):
        return retried(loc, "reading", read)


def write_bytes_atomic(loc: Location, data: bytes) -> None:
    """Write so that readers see either nothing or the whole object.

    Local: write a hidden temporary file beside the target, fsync, then rename over it (atomic on POSIX).
    S3: a PUT becomes visible only when the upload completes; a crashed writer leaves no object behind. (An error
    raised mid-upload may still close the stream; readers are protected anyway because they read only what the
    manifest, written last, lists, and check each shard's size and sha256.)
    """
    with explained(loc, "writing"):
        if loc.is_s3:

            def put() -> None:
                with loc.fs.open_output_stream(loc.path) as f:
                    f.write(data)

            retried(loc, "writing", put)
            return
        parent = os.path.dirname(loc.path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, loc.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def list_files(loc: Location, suffix: str = "") -> list[str]:
    """Names (relative to loc) of the files directly under loc, sorted; hidden temporaries excluded."""
    with explained(loc, "listing"):
        infos = retried(loc, "listing", lambda: loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True)))
    names = [i.base_name for i in infos if i.type == pafs.FileType.File]
    return sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))

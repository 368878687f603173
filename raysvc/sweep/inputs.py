"""Every input a sweep reads, checked before its first trial: a missing dataset or model is an error naming the
spec field and the URI within seconds, not a failed trial (or a failed second stage) after minutes of work."""

from __future__ import annotations

from raysvc.config import ConfigError
from raysvc.data.streaming.shards import load_manifest
from raysvc.storage import absolute_uri, resolve


def check_datasets(named: dict[str, str]) -> None:
    """{spec field: dataset URI}: each must hold a raysvc dataset (its manifest.json readable)."""
    for field, uri in named.items():
        try:
            load_manifest(resolve(absolute_uri(uri)))
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"{field}={uri}: no readable dataset there ({e}); generate or convert one (raysvc data ...), or "
                f"point {field} at one"
            ) from e

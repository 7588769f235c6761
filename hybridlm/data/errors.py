"""The one error type of the data pipeline."""

from __future__ import annotations

from hybridlm.config import ConfigError


class DataError(ConfigError):
    """Input data that cannot be used (missing file, bad bytes, wrong field, stale prepared dir).

    A subclass of ``ConfigError`` so the CLI reports it the same way: one line naming the file,
    key or value, raised before any training work starts.
    """

"""Data pipeline: sources -> tokenizer -> packed memory-mapped shards -> a resumable rank-sharded loader.

``prepare`` and ``run_prepare`` live in ``hybridlm.data.prepare`` (not re-exported here, so that the
name ``hybridlm.data.prepare`` stays the module).
"""

from hybridlm.data.errors import DataError
from hybridlm.data.loader import PackedLoader, read_manifest
from hybridlm.data.tokenizer import load_tokenizer

__all__ = ["DataError", "PackedLoader", "load_tokenizer", "read_manifest"]

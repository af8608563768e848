"""Global KV-cache index: SGLang-compatible block hashing, the wire formats, and the prefix index. Pure."""

from kvindex.index import GlobalIndex, MatchResult
from kvindex.index_core import IndexStats
from kvindex.mirror import BlockMirror, MirrorStats

__all__ = ["BlockMirror", "GlobalIndex", "IndexStats", "MatchResult", "MirrorStats"]

"""Decoding API: draft trees, tree attention over a KV cache, verification, KV compaction."""

__all__: list[str] = []

# ---- tree attention ----
from specx.decode.attention import tree_attention  # noqa: E402

__all__ += ["tree_attention"]
# ---- end tree attention ----

"""Decoding API: draft trees, tree attention over a KV cache, verification, KV compaction."""

__all__: list[str] = []

# ---- tree attention ----
from specx.decode.attention import tree_attention  # noqa: E402

__all__ += ["tree_attention"]
# ---- end tree attention ----

# ---- draft trees, verification, KV compaction ----
from specx.decode.tree import Tree, build_tree, compact_kv  # noqa: E402
from specx.decode.verify import Verification, verify_greedy, verify_sample  # noqa: E402

__all__ += ["Tree", "build_tree", "compact_kv", "Verification", "verify_greedy", "verify_sample"]
# ---- end draft trees, verification, KV compaction ----

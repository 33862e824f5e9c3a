"""Decoding API: draft trees, tree attention, verification and KV compaction kernels."""

# -- draft trees, verification, KV compaction --
from specx.decode.tree import Tree, build_tree, compact_kv
from specx.decode.verify import Verification, verify_greedy, verify_sample
# -- end draft trees, verification, KV compaction --

__all__ = [
    "Tree", "build_tree", "compact_kv", "Verification", "verify_greedy", "verify_sample",
]

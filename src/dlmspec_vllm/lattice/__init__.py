"""Token lattice from a diffusion drafter's block: pruning, causal scorers, path search (CPS).

The proposer calls ``select_paths``; the rest is public for tests, benchmarks and tools.
Everything here is torch; CUDA tensors are routed to the Triton kernels in ``kernels/``.
"""

from dlmspec_vllm.lattice.prune import prune, prune_reference
from dlmspec_vllm.lattice.scorers import (
    ArpaNgramScorer,
    CausalScorer,
    OnlineNgramScorer,
    parse_arpa,
)
from dlmspec_vllm.lattice.search import (
    MAX_DP_TRANSITIONS,
    beam_search,
    build_edge_scores,
    dp_is_tractable,
    select_paths,
    viterbi,
    viterbi_reference,
)
from dlmspec_vllm.lattice.types import PAD_ID, Lattice

__all__ = [
    "MAX_DP_TRANSITIONS",
    "PAD_ID",
    "ArpaNgramScorer",
    "CausalScorer",
    "Lattice",
    "OnlineNgramScorer",
    "beam_search",
    "build_edge_scores",
    "dp_is_tractable",
    "parse_arpa",
    "prune",
    "prune_reference",
    "select_paths",
    "viterbi",
    "viterbi_reference",
]

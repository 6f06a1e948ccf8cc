"""Speculative decoding over any Hugging Face causal LM: ``generate`` with a ``Drafter`` proposing token trees,
verified in one target forward on the package's tree attention, verification and KV-compaction ops.

    from efficient_ops.pipelines.speculative import generate, PromptLookupDrafter
    out = generate(model, input_ids, attention_mask=mask, drafter=PromptLookupDrafter(), max_new_tokens=256)
    out.sequences, out.stats.mean_accepted_length, out.stats.target_forwards
"""

from .drafters import DraftModelDrafter, PromptLookupDrafter, TokenRecyclingDrafter, self_drafter
from .generate import GenerateOutput, GenerateStats, generate
from .protocol import Drafter, DraftTree, Sampling, warp
from .trees import DynamicTree, StaticTree, chain, ranked_tree, static_tree

__all__ = ["generate", "GenerateOutput", "GenerateStats", "DraftTree", "Drafter", "Sampling", "warp",
           "PromptLookupDrafter", "TokenRecyclingDrafter", "DraftModelDrafter", "self_drafter",
           "StaticTree", "DynamicTree", "chain", "static_tree", "ranked_tree"]

"""The target model's forward over a draft tree, on the package's ``tree_attention`` and a static KV cache.

Design: the model stays the user's Hugging Face module (its embeddings, rotary embeddings, q/k norms,
MLPs, and any ``quantize_model`` / ``rsparsify_model`` linears run unchanged); only the attention kernel is
swapped, through transformers' attention-function registry (``AttentionInterface``). Our attention
function receives each layer's rotated queries, keys and values, writes the keys and values into one
static cache ``[L, B, Hkv, S, D]`` at the tree slots ``prefix_len + node`` and calls ``tree_attention``.
The model itself is called with ``use_cache=False``: no transformers ``Cache`` object is involved, because
the cache rows are ragged (each row its own prefix length, which HF's caches do not express) and
``compact_kv`` must see all layers as one tensor. An own runner over the modules' weights would have to
re-implement every architecture; this way any model whose attention goes through the registry works.

The prefill runs through the same function: every row's prompt is packed to the left (no padding inside
the cache, so position = cache slot, as HF's ``cumsum(attention_mask) - 1`` positions) and attends causally
with PyTorch SDPA, since that is a plain causal prefix, not a tree.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

import efficient_ops

ATTENTION_NAME = "efficient_ops_tree"
_STATE_KWARG = "efficient_ops_tree_state"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query ``[B, Hq, T, D]``, key / value ``[B, Hkv, T, D]``; returns
    ``([B, T, Hq, D], None)`` as the registry expects."""
    state = kwargs.get(_STATE_KWARG)
    if state is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside efficient_ops' speculative "
                           "generate (it needs the tree cache)")
    return state.attend(module, query, key, value, scaling, kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _attention)


class TreeRunner:
    """A static KV cache ``k, v: [L, B, Hkv, S, D]`` with ragged ``prefix_lens`` ``[B]``, and the target's
    forward over a prompt (:meth:`prefill`) or a draft tree (:meth:`forward_tree`).

    Raises ValueError when the model cannot run here, naming what it needs: a decoder-only HF model whose
    attention modules dispatch through ``config._attn_implementation`` (transformers' AttentionInterface),
    full causal attention (no sliding window shorter than the cache, no logit soft-capping, no sinks).
    """

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, cuda_graphs: bool = False):
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "set_attn_implementation"):
            raise ValueError("model: expected a Hugging Face PreTrainedModel (a causal LM such as "
                             "AutoModelForCausalLM gives)")
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"model: {type(model).__name__} is an encoder-decoder; the speculative pipeline needs "
                             "a decoder-only causal LM")
        if not type(model)._can_set_attn_implementation():
            raise ValueError(f"model: {type(model).__name__} does not dispatch attention through transformers' "
                             "AttentionInterface (config._attn_implementation); the speculative pipeline swaps in "
                             "tree attention there, so it needs a model that does (Llama, Qwen2/3, Mistral, ...)")
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.model = model
        self.n_layers = text.num_hidden_layers
        n_heads = text.num_attention_heads
        self.n_kv = getattr(text, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        param = next(model.parameters())
        self.device, self.dtype = param.device, self._cache_dtype(model, param)
        self.batch, self.max_len = batch, max_len
        shape = (self.n_layers, batch, self.n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.prefix_lens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._parents: Optional[torch.Tensor] = None  # None: prefill (causal), else the tree's parents
        self._slots: Optional[torch.Tensor] = None  # [B, T] cache slots written by this forward
        self._calls = 0
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs: needs the model on a CUDA device, it is on {self.device}")
        self.cuda_graphs = cuda_graphs
        self._graphs = {}  # tree size T -> (graph, tokens, parents, positions, logits) static buffers

    @staticmethod
    def _cache_dtype(model, param) -> torch.dtype:
        # quantize_model keeps the activations' dtype on the model; packed weights are integer tensors
        floats = [p.dtype for p in model.parameters() if p.is_floating_point()]
        return floats[0] if floats else param.dtype

    # ------------------------------------------------------------------ attention (called by every layer)

    def attend(self, module, query, key, value, scaling, kwargs):
        for name in ("softcap", "s_aux", "sinks"):
            if kwargs.get(name) is not None:
                raise ValueError(f"model: its attention uses {name}; tree_attention computes plain softmax "
                                 "attention, so this model cannot run in the speculative pipeline")
        window = kwargs.get("sliding_window")
        if window is not None and window < self.max_len:
            raise ValueError(f"model: layer {module.layer_idx} uses a sliding window of {window} tokens, shorter "
                             f"than the cache ({self.max_len}); tree_attention needs full causal attention")
        layer = module.layer_idx
        b, hkv, t, d = key.shape
        if query.dtype != self.dtype:
            raise ValueError(f"model: attention runs in {query.dtype} but the cache is {self.dtype}")
        index = self._slots[:, None, :, None].expand(b, hkv, t, d)
        self.k[layer].scatter_(2, index, key)
        self.v[layer].scatter_(2, index, value)
        self._calls += 1
        if self._parents is None:  # prefill from an empty cache: plain causal attention over the packed prompt
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                 enable_gqa=query.shape[1] != hkv)
        else:
            out = efficient_ops.tree_attention(query, self.k[layer], self.v[layer], self.prefix_lens, self._parents,
                                               scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def _run(self, tokens, positions):
        self._calls = 0
        out = self.model(input_ids=tokens, position_ids=positions, use_cache=False, **{_STATE_KWARG: self})
        if self._calls != self.n_layers:
            raise ValueError(f"model: {type(self.model).__name__} called the tree attention {self._calls} times for "
                             f"{self.n_layers} layers; the pipeline needs every layer's attention to go through "
                             "transformers' AttentionInterface")
        return out.logits

    # ------------------------------------------------------------------ forwards

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Left-padded prompts ``[B, P]`` and mask: pack every row to the left of the cache, run the target,
        set ``prefix_lens`` to the prompt lengths and return each row's last logits ``[B, V]``."""
        b, p = input_ids.shape
        lengths = attention_mask.sum(1)
        # stable sort puts the real tokens first, in order: the row left-aligned, padding after it
        order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)
        packed = input_ids.gather(1, order)
        positions = torch.arange(p, device=self.device).expand(b, p)
        self.prefix_lens.zero_()
        self._parents, self._slots = None, positions
        logits = self._run(packed, positions)
        self.prefix_lens.copy_(lengths)
        return logits[torch.arange(b, device=self.device), lengths - 1]

    @torch.no_grad()
    def forward_tree(self, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
        """The target's logits ``[B, T, V]`` over the draft trees (node i's row predicts node i's child);
        writes the tree's keys and values at ``prefix_len + node`` in every layer. With ``cuda_graphs`` the
        forward is captured once per tree size T and replayed."""
        positions = efficient_ops.tree_positions(parents, self.prefix_lens)  # validates parents (synchronises)
        if self.cuda_graphs:
            return self._replay(tokens, parents.expand(tokens.shape[0], -1), positions)
        return self._forward_tree(tokens, parents, positions)

    def _forward_tree(self, tokens, parents, positions):
        self._parents = parents
        # computed from prefix_lens on the device, so a captured graph reads each step's lengths
        self._slots = self.prefix_lens[:, None] + torch.arange(tokens.shape[1], device=self.device)
        try:
            return self._run(tokens, positions)
        finally:
            self._parents = None

    def _replay(self, tokens, parents, positions):
        t = tokens.shape[1]
        if t not in self._graphs:
            static = (tokens.clone(), parents.clone(), positions.clone())
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):  # warm-up (the same inputs: it writes the same cache slots)
                self._forward_tree(*static)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self._forward_tree(*static)
            self._graphs[t] = (graph, *static, logits)
        graph, s_tokens, s_parents, s_positions, logits = self._graphs[t]
        s_tokens.copy_(tokens)
        s_parents.copy_(parents)
        s_positions.copy_(positions)
        graph.replay()
        return logits.clone()

    def compact(self, accepted_nodes: torch.Tensor, accept_len: torch.Tensor, frozen: torch.Tensor) -> None:
        """Move the accepted paths next to the prefix in all layers at once (``compact_kv``); rows in
        ``frozen`` (finished) keep their prefix length."""
        new = efficient_ops.compact_kv(self.k, self.v, self.prefix_lens, accepted_nodes, accept_len)
        self.prefix_lens.copy_(torch.where(frozen, self.prefix_lens, new))


class attention_swapped:
    """Context manager: the model's attention implementation is the tree attention inside, restored after."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        _register()
        self.previous = self.model.config._attn_implementation
        self.model.set_attn_implementation(ATTENTION_NAME)
        if self.model.config._attn_implementation != ATTENTION_NAME:
            raise ValueError(f"model: {type(self.model).__name__} refused the attention implementation "
                             f"{ATTENTION_NAME!r}; the pipeline needs one settable through set_attn_implementation")
        return self.model

    def __exit__(self, *exc):
        self.model.set_attn_implementation(self.previous)
        return False

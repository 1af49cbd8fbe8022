"""A minimal decoder-only Transformer (GPT), written out from scratch.

Token + learned position embeddings, pre-LayerNorm blocks, causal multi-head self-attention with
separate ``q_proj k_proj v_proj o_proj``, an MLP ``fc_in -> GELU -> fc_out``, and an untied output
``head`` (untied so that quantising or adapting the body never touches the read-out; the price is
``vocab_size * d_model`` extra parameters, 5,248 for the toy model).

Attention is written out (scores, causal mask, softmax, weighted sum) so the notebooks can show every
step; ``GPTConfig.fused_attention=True`` switches to PyTorch's fused kernel for speed on a GPU.

The PEFT methods build on two generic extension points, as real model libraries have them:
``inputs_embeds`` (vectors instead of token ids: prompt tuning prepends its soft prompt this way) and
``past_kv``, a :class:`KVCache` of keys and values of earlier positions that every query may attend to
(prefix tuning pre-fills it; ``generate()`` decodes fast with it). ``position_ids`` says which learned
position each input gets. ``model.gradient_checkpointing = True`` keeps only each block's input for the
backward pass and recomputes the block's inside there (``torch.utils.checkpoint``; Chen et al. 2016,
arXiv 1604.06174): less memory, one more forward pass of the blocks. Papers: Vaswani et al. 2017
(arXiv 1706.03762), Radford et al. 2019 (GPT-2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .common import positive_int


@dataclass
class GPTConfig:
    vocab_size: int = 41      # the character vocabulary of minipeft.tasks (pad + 40 characters)
    block_size: int = 64      # the longest sequence, virtual tokens and prefixes included
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 512           # hidden width of the MLP (4 * d_model)
    dropout: float = 0.0
    fused_attention: bool = False  # use F.scaled_dot_product_attention instead of the written-out maths

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "d_model", "n_layer", "n_head", "d_ff"):
            positive_int(f"GPTConfig.{name}", getattr(self, name))
        if self.d_model % self.n_head != 0:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")


class KVCache:
    """Keys and values of earlier positions, one ``(k, v)`` pair per layer, each ``(B, n_head, T_past, head_dim)``.

    ``update(i, k, v)`` appends layer ``i``'s new keys/values and returns all so far. ``n_virtual`` counts
    cached positions that are not text (a prefix, a soft prompt), so the next text token goes to
    ``next_position = len(cache) - n_virtual``: the one place this is decided.
    """

    def __init__(self, n_layer: int, layers=None, n_virtual: int = 0):
        self.layers = list(layers) if layers is not None else [None] * n_layer
        self.n_virtual = n_virtual
        if len(self.layers) != n_layer:
            raise ValueError(f"KVCache has {len(self.layers)} layers, the model has {n_layer}")

    def __len__(self) -> int:  # number of cached positions
        return 0 if self.layers[0] is None else self.layers[0][0].shape[2]

    @property
    def next_position(self) -> int:
        return len(self) - self.n_virtual

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self.layers[i] is not None:
            k = torch.cat([self.layers[i][0], k], dim=2)
            v = torch.cat([self.layers[i][1], v], dim=2)
        self.layers[i] = (k, v)
        return k, v

    def __repr__(self) -> str:
        return f"KVCache(n_layer={len(self.layers)}, cached_positions={len(self)})"


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.head_dim = config.d_model // config.n_head
        self.fused = config.fused_attention
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.k_proj = nn.Linear(config.d_model, config.d_model)
        self.v_proj = nn.Linear(config.d_model, config.d_model)
        self.o_proj = nn.Linear(config.d_model, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.keep_attn = False   # set True to keep the last attention weights in self.attn_weights
        self.attn_weights = None

    def forward(self, x: torch.Tensor, past_kv: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, C) -> (B, nh, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        if past_kv is not None:
            k, v = past_kv.update(self.layer_idx, k, v)  # (B, nh, P + T, hs)
        P = k.shape[2] - T  # earlier positions every query may see
        # query t (absolute position P + t) sees keys 0 .. P + t
        mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
        if self.fused and not self.keep_attn:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.dropout.p if self.training else 0.0)
        else:
            # att = softmax(q k^T / sqrt(hs) + causal mask)
            att = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, nh, T, P + T)
            att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1)
            if self.keep_attn:
                self.attn_weights = att.detach()
            y = self.dropout(att) @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_ff)
        self.fc_out = nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.fc_out(F.gelu(self.fc_in(x))))


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x, past_kv=None):
        x = x + self.attn(self.ln_1(x), past_kv)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # True: recompute each block in backward (training only)
        self.apply(self._init_weights)
        # GPT-2: scale the residual projections by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "fc_out.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx=None, *, inputs_embeds=None, position_ids=None, past_kv: KVCache | None = None):
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` (B, T) or vectors ``inputs_embeds`` (B, T, C).
        ``position_ids`` (T,) or (B, T): default ``P .. P+T-1`` with P = ``past_kv.next_position`` (0 without
        a cache). ``past_kv`` is updated in place with this call's keys and values."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx (token ids) or inputs_embeds (vectors)")
        if inputs_embeds is None:
            inputs_embeds = self.embed(idx)  # (B, T, C)
        B, T, C = inputs_embeds.shape
        P = 0 if past_kv is None else len(past_kv)
        if P + T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens after {P} cached positions exceeds the context "
                             f"(block_size={self.config.block_size})")
        if position_ids is None:
            start = 0 if past_kv is None else past_kv.next_position
            position_ids = torch.arange(start, start + T, device=inputs_embeds.device)
        x = self.drop(inputs_embeds + self.pos_emb(position_ids))
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if recompute and past_kv is not None:  # the cache grows in place: a recomputed block would grow it twice
            raise ValueError("gradient checkpointing cannot recompute blocks that update a past_kv cache "
                             "(prefix tuning): set model.gradient_checkpointing = False")
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if recompute else block(x, past_kv)
        return self.head(self.ln_f(x))  # (B, T, vocab_size)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> their embeddings (B, T, C), after checking the ids."""
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.is_floating_point():
            raise ValueError(f"idx must be an integer tensor of shape (batch, time), got {idx!r:.60}")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), "
                             f"got values in [{int(idx.min())}, {int(idx.max())}]")
        return self.tok_emb(idx)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, stop_token: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Greedy decoding: append ``max_new_tokens`` argmax tokens to ``idx`` (B, T), stopping early once
        every row has produced ``stop_token``. ``use_cache=False`` recomputes the whole sequence at every
        step (same result, slower)."""
        was_training = self.training
        self.eval()
        cache = KVCache(self.config.n_layer) if use_cache else None
        out, step_input = idx, idx
        for _ in range(max_new_tokens):
            logits = self(step_input, past_kv=cache) if use_cache else self(out)
            next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            out = torch.cat([out, next_token], dim=1)
            step_input = next_token
            if stop_token is not None and (out[:, idx.shape[1]:] == stop_token).any(dim=1).all():
                break
        self.train(was_training)
        return out

    def extra_repr(self) -> str:
        n = sum(p.numel() for p in self.parameters())
        return f"params={n:,}"

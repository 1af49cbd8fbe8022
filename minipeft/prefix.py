"""Prefix tuning: trainable keys and values that every attention layer reads before the text.

Each layer ``l`` gets ``n_prefix`` extra keys and values, which the text's queries attend to as if
they belonged to earlier tokens::

    attn_l(x) = softmax(q [P_k^l ; K]^T / sqrt(d_head) + mask) [P_v^l ; V],   P_k^l, P_v^l in R^{n_prefix x d_model}

Only the prefixes train: ``n_layer * 2 * n_prefix * d_model`` numbers (4 x 2 x 10 x 128 = 10,240 for
the toy model, 1.3 % of it). Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", arXiv 2101.00190.

Reparameterisation (the paper's section 4.3: optimising P directly was unstable for them):
``P = MLP(P')`` with ``P'`` a smaller embedding (``n_prefix x reparam_dim``) and
``MLP = Linear -> tanh -> Linear`` up to ``n_layer * 2 * d_model``. Once trained, the MLP is not needed
any more: :func:`fold_prefix` stores its output as plain prefixes, with identical outputs.

How it hooks in, without editing the model: through the key/value cache (``past_kv``), where
generation keeps the keys and values of earlier tokens. A forward pre-hook fills the call's cache with
the prefixes (a fresh one, or ``generate()``'s empty one; a non-empty cache already holds them) and
counts them as ``n_virtual`` positions that are not text, so the text keeps positions ``0 .. T-1``; the
context counts the prefix: ``n_prefix + T <= block_size``. Named prefixes (one per task) are chosen
with ``mp.set_adapter`` and friends; ``mp.adapter_per_row`` simply puts a different prefix in each row
of the cache (all with the same ``n_prefix``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn

from .common import Method, adapter_name, boolean, integer, module, non_negative_float, positive_int
from .full import freeze
from .model import GPT, KVCache


@dataclass
class PrefixTuningConfig:
    n_prefix: int = 10
    reparam: bool = True
    reparam_dim: int = 32      # width of the small embedding P' that the MLP expands
    reparam_hidden: int = 64   # hidden width of the reparameterisation MLP
    init_std: float = 0.1      # plain prefixes start as N(0, init_std^2): small next to the base's keys
    seed: int = 0

    def __post_init__(self):
        for name in ("n_prefix", "reparam_dim", "reparam_hidden"):
            positive_int(name, getattr(self, name))
        boolean("reparam", self.reparam)
        non_negative_float("init_std", self.init_std)
        integer("seed", self.seed)


class Prefix(nn.Module):
    """One task's prefixes: ``forward()`` returns them as one tensor ``(n_layer, 2, n_prefix, d_model)``."""

    def __init__(self, config: PrefixTuningConfig, n_layer: int, d_model: int):
        super().__init__()
        self.config, self.n_layer, self.d_model = config, n_layer, d_model
        n, g = config.n_prefix, torch.Generator().manual_seed(config.seed)
        if config.reparam:
            self.embedding = nn.Parameter(torch.randn(n, config.reparam_dim, generator=g))  # P' (n, e)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                self.mlp = nn.Sequential(nn.Linear(config.reparam_dim, config.reparam_hidden), nn.Tanh(),
                                         nn.Linear(config.reparam_hidden, n_layer * 2 * d_model))
        else:
            prefix = config.init_std * torch.randn(n_layer, 2, n, d_model, generator=g)
            self.prefix = nn.Parameter(prefix)  # (L, 2, n, C)

    @property
    def n_prefix(self) -> int:
        return self.embedding.shape[0] if self.config.reparam else self.prefix.shape[2]

    def forward(self) -> torch.Tensor:
        if not self.config.reparam:
            return self.prefix
        n, L, C = self.embedding.shape[0], self.n_layer, self.d_model
        # P = MLP(P'): (n, e) -> (n, L * 2 * C) -> (n, L, 2, C) -> (L, 2, n, C)
        return self.mlp(self.embedding).view(n, L, 2, C).permute(1, 2, 0, 3)

    @torch.no_grad()
    def fold(self) -> None:
        """Replace P' and the MLP by their output, stored as plain prefixes (same outputs, fewer parameters)."""
        if not self.config.reparam:
            return
        trainable = self.embedding.requires_grad
        prefix = self().clone()
        del self.embedding, self.mlp
        self.prefix = nn.Parameter(prefix, requires_grad=trainable)
        self.config = replace(self.config, reparam=False)

    def extra_repr(self) -> str:
        c, n = self.config, sum(p.numel() for p in self.parameters())
        mlp = f"reparam: {c.reparam_dim} -> {c.reparam_hidden} -> {self.n_layer * 2 * self.d_model}"
        how = mlp if c.reparam else "plain"
        return f"n_prefix={self.n_prefix}, n_layer={self.n_layer}, d_model={self.d_model}, {how}, params={n:,}"


class PrefixTuning(nn.Module):
    """The named prefixes of one model, which of them the next call uses, and the hook that feeds them in."""

    def __init__(self, n_head: int, block_size: int):
        super().__init__()
        self.n_head, self.block_size = n_head, block_size
        self.prefixes = nn.ModuleDict()
        self.active: str | None = None  # the prefix in use (None: the base model)
        self.rows: list | None = None   # or one name per batch row

    def layers(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cache content for a batch: per layer ``(k, v)``, each ``(B, n_head, n_prefix, head_dim)``."""
        rows = [self.active] * batch_size if self.rows is None else self.rows
        if len(rows) != batch_size:
            raise ValueError(f"{len(rows)} prefix names (one per row) for a batch of {batch_size} rows")
        names = list(dict.fromkeys(rows))
        p = torch.stack([self.prefixes[name]() for name in names])  # (U, L, 2, n, C)
        p = p[torch.tensor([names.index(r) for r in rows], device=p.device)]  # (B, L, 2, n, C): row b's own prefix
        B, L, _, n, C = p.shape
        # (B, L, 2, n, C) -> (B, L, 2, n, nh, hs) -> (L, 2, B, nh, n, hs)
        p = p.view(B, L, 2, n, self.n_head, C // self.n_head).permute(1, 2, 0, 4, 3, 5)
        return [(p[i, 0], p[i, 1]) for i in range(L)]

    def pre_hook(self, model: GPT, args: tuple, kwargs: dict):
        """Put the prefixes in use in the call's key/value cache (a fresh one, or generate()'s empty one)."""
        x = args[0] if args else kwargs.get("idx", kwargs.get("inputs_embeds"))
        if (self.active is None and self.rows is None) or x is None:
            return None
        cache = kwargs.get("past_kv")
        if cache is not None and len(cache) > 0:  # a later step of generation: the prefixes are in the cache
            return None
        B, T = x.shape[:2]
        n_prefix = self.prefixes[self.active or self.rows[0]].n_prefix
        if n_prefix + T > self.block_size:
            raise ValueError(f"a prefix of {n_prefix} positions + {T} input tokens exceed the context "
                             f"(block_size={self.block_size})")
        kwargs = dict(kwargs)
        cache = kwargs["past_kv"] = cache if cache is not None else KVCache(model.config.n_layer)
        cache.layers, cache.n_virtual = self.layers(B), n_prefix  # the prefix holds no text positions
        return args, kwargs

    def extra_repr(self) -> str:
        return f"active={self.active!r}" + ("" if self.rows is None else f", rows={self.rows}")


def add_prefix_tuning(model: GPT, n_prefix: int = PrefixTuningConfig.n_prefix,
                      reparam: bool = PrefixTuningConfig.reparam, name: str = "default", **options) -> GPT:
    """Freeze ``model`` and add trainable key/value prefixes to every layer; returns the model.
    ``options``: the other fields of :class:`PrefixTuningConfig`. A new ``name`` keeps the earlier
    prefixes and makes the new one active (and the only trainable one)."""
    config = PrefixTuningConfig(n_prefix=n_prefix, reparam=reparam, **options)  # validates the options
    module("model", model, GPT)
    adapter_name(name, _names(model), "a prefix")
    if n_prefix >= model.config.block_size:
        raise ValueError(f"n_prefix={n_prefix} leaves no room for text in the context "
                         f"(block_size={model.config.block_size})")
    prefix = Prefix(config, model.config.n_layer, model.config.d_model).to(model.pos_emb.weight)  # may run out
    prefix.train(model.training)  # new modules take the model's train/eval mode
    freeze(model)
    if getattr(model, "prefix_tuning", None) is None:
        model.prefix_tuning = PrefixTuning(model.config.n_head, model.config.block_size).train(model.training)
        model.register_forward_pre_hook(model.prefix_tuning.pre_hook, with_kwargs=True)
    model.prefix_tuning.prefixes[name] = prefix
    _set_active(model, name)
    return model


def fold_prefix(model: GPT, name: str | None = None) -> GPT:
    """Fold the reparameterisation MLP of prefix ``name`` (default: every prefix) into plain prefixes."""
    names = _names(model)
    if not names or (name is not None and name not in names):
        raise ValueError(f"no prefix named {name!r}; the model has {names}" if names else
                         "the model has no prefix tuning; call add_prefix_tuning first")
    for n, prefix in model.prefix_tuning.prefixes.items():
        if name is None or n == name:
            prefix.fold()
    return model


# --- bookkeeping: named prefixes, one per row, what a file holds ----------------------------------------


def _names(model: GPT) -> list[str]:
    pt = getattr(model, "prefix_tuning", None)
    return [] if pt is None else list(pt.prefixes)


def _set_active(model: GPT, name: str | None) -> None:
    """``name`` runs (None: the base model) and is the only prefix that trains (as PEFT's set_adapter)."""
    pt = model.prefix_tuning
    for n, prefix in pt.prefixes.items():
        prefix.requires_grad_(n == name)
    pt.active, pt.rows = name, None


def _set_rows(model: GPT, names: list | None) -> None:
    pt = model.prefix_tuning
    if names is not None:
        if None in names:
            raise ValueError("prefix tuning cannot run the bare base on some rows of a batch: every row "
                             "needs a prefix name")
        sizes = {pt.prefixes[n].n_prefix for n in names}
        if len(sizes) > 1:
            raise ValueError(f"prefixes mixed in one batch must have the same n_prefix, got {sorted(sizes)}")
    pt.rows = None if names is None else list(names)


def _delete(model: GPT, name: str) -> None:
    pt = model.prefix_tuning
    del pt.prefixes[name]
    pt.active = None if pt.active == name else pt.active


METHOD = Method("prefix", PrefixTuningConfig, add_prefix_tuning, owned=(PrefixTuning,), names=_names,
                parts=lambda model, name: {"prefix_tuning.prefix": model.prefix_tuning.prefixes[name]},
                options=lambda model, name: asdict(model.prefix_tuning.prefixes[name].config),
                active=lambda model: model.prefix_tuning.active, set_active=_set_active, set_rows=_set_rows,
                delete=_delete)

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

How it hooks in, without editing the model: the prefixes go through the model's key/value cache
(``past_kv``), where generation keeps the keys and values of earlier tokens. A forward pre-hook passes
a :class:`KVCache` pre-filled with the prefixes when the call brings no cache, and fills an empty cache
it is given (``generate()``'s own cache, on its first call); a non-empty cache already holds them.
The text keeps positions ``0 .. T-1`` (the model's default would start after the ``n_prefix`` cached
positions), and the context counts the prefix: ``n_prefix + T <= block_size``.

Named prefixes: one model can hold several (one per task). ``add_prefix_tuning(model, ..., name=)``
adds one (the same name twice is an error), :func:`set_prefix` chooses which one runs (``None``: the
base model), :func:`delete_prefix` removes one, :func:`list_prefixes` lists them. Given one
name per row, a single forward pass runs each row with its own task's prefix: the cache simply holds a
different prefix in each row (all of them must have the same ``n_prefix``).

Sizes: ``add_prefix_tuning`` asks for ``n_prefix >= 1``. The hook itself works with an empty prefix,
which leaves the base model unchanged: the tests check that by emptying the parameter.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from .full import freeze
from .model import GPT, KVCache


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


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
            _positive_int(name, getattr(self, name))
        if not isinstance(self.reparam, bool):
            raise ValueError(f"reparam must be True or False, got {self.reparam!r}")
        if not isinstance(self.init_std, (int, float)) or isinstance(self.init_std, bool) or not self.init_std >= 0:
            raise ValueError(f"init_std must be a number >= 0, got {self.init_std!r}")


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
        self.active: str | list[str] | None = None  # a name, one name per row, or None (the base model)

    @property
    def names(self) -> list[str]:
        return list(self.prefixes.keys())

    @property
    def n_prefix(self) -> int:
        """Length of the prefixes in use (set_prefix makes sure that mixed ones agree)."""
        first = self.active if isinstance(self.active, str) else self.active[0]
        return self.prefixes[first].n_prefix

    def layers(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The cache content for a batch: per layer ``(k, v)``, each ``(B, n_head, n_prefix, head_dim)``."""
        rows = [self.active] * batch_size if isinstance(self.active, str) else self.active
        if len(rows) != batch_size:
            raise ValueError(f"set_prefix was given {len(rows)} names, one per row, "
                             f"but the batch has {batch_size} rows")
        names = list(dict.fromkeys(rows))
        p = torch.stack([self.prefixes[name]() for name in names])  # (U, L, 2, n, C)
        p = p[torch.tensor([names.index(r) for r in rows], device=p.device)]  # (B, L, 2, n, C): row b's own prefix
        B, L, _, n, C = p.shape
        # (B, L, 2, n, C) -> (B, L, 2, n, nh, hs) -> (L, 2, B, nh, n, hs)
        p = p.view(B, L, 2, n, self.n_head, C // self.n_head).permute(1, 2, 0, 4, 3, 5)
        return [(p[i, 0], p[i, 1]) for i in range(L)]

    def pre_hook(self, model: GPT, args: tuple, kwargs: dict):
        """Put the active prefixes in the call's key/value cache and keep the text at positions 0..T-1."""
        x = args[0] if args else kwargs.get("idx", kwargs.get("inputs_embeds"))
        if self.active is None or x is None:
            return None
        kwargs = dict(kwargs)
        B, T = x.shape[:2]
        cache = kwargs.get("past_kv")
        if cache is None:
            cache = kwargs["past_kv"] = KVCache(model.config.n_layer)
        if len(cache) == 0:  # a fresh cache: the prefixes go first
            if self.n_prefix + T > self.block_size:
                raise ValueError(f"a prefix of {self.n_prefix} positions + {T} input tokens exceed the context "
                                 f"(block_size={self.block_size})")
            cache.layers = self.layers(B)
            start = 0
        else:  # a later step of generation: the prefixes are already in the cache
            start = len(cache) - self.n_prefix
        if kwargs.get("position_ids") is None:
            kwargs["position_ids"] = torch.arange(start, start + T, device=x.device)
        return args, kwargs

    def extra_repr(self) -> str:
        return f"active={self.active!r}"


def add_prefix_tuning(model: GPT, n_prefix: int = 10, reparam: bool = True, name: str = "default",
                      **options) -> GPT:
    """Freeze ``model`` and add trainable key/value prefixes to every layer; returns the model.

    ``options`` are the other fields of :class:`PrefixTuningConfig`. Adding a prefix under a new
    ``name`` keeps the earlier ones and makes the new one active (and the only trainable one).
    """
    config = PrefixTuningConfig(n_prefix=n_prefix, reparam=reparam, **options)  # validates the options
    if not isinstance(model, GPT):
        raise TypeError(f"add_prefix_tuning needs a minipeft GPT, got {type(model).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a prefix name must be a Python identifier (like 'rotate'), got {name!r}")
    existing = getattr(model, "prefix_tuning", None)
    if existing is not None and name in existing.prefixes:
        raise ValueError(f"the model already has a prefix named {name!r}; pick another name or delete_prefix() it")
    if hasattr(nn.ModuleDict(), name):
        raise ValueError(f"{name!r} cannot be a prefix name (it is taken by nn.ModuleDict)")
    if n_prefix >= model.config.block_size:
        raise ValueError(f"n_prefix={n_prefix} leaves no room for text in the context "
                         f"(block_size={model.config.block_size})")
    freeze(model)
    if existing is None:
        model.prefix_tuning = existing = PrefixTuning(model.config.n_head, model.config.block_size)
        model.register_forward_pre_hook(existing.pre_hook, with_kwargs=True)
    existing.prefixes[name] = Prefix(config, model.config.n_layer, model.config.d_model).to(model.pos_emb.weight)
    set_prefix(model, name)
    return model


def list_prefixes(model: GPT) -> list[str]:
    """Names of the prefixes in ``model``, in the order they were added (``[]`` without prefix tuning)."""
    pt = getattr(model, "prefix_tuning", None)
    return [] if pt is None else pt.names


def _prefix_tuning(model: GPT) -> PrefixTuning:
    if getattr(model, "prefix_tuning", None) is None:
        raise ValueError("the model has no prefix tuning; call add_prefix_tuning first")
    return model.prefix_tuning


def set_prefix(model: GPT, names: str | list[str] | None) -> GPT:
    """Choose the prefix of the next calls: a name, one name per row of the batch, or None (the base).

    The prefixes in use become trainable, the others are frozen (as PEFT's ``set_adapter`` does).
    """
    pt = _prefix_tuning(model)
    used = [] if names is None else [names] if isinstance(names, str) else list(names)
    if names is not None and not isinstance(names, str) and not used:
        raise ValueError("set_prefix got an empty list of names")
    unknown = sorted(set(n for n in used if n not in pt.prefixes))
    if unknown:
        raise ValueError(f"unknown prefix name(s) {unknown}; the model has {pt.names}")
    sizes = {pt.prefixes[n].n_prefix for n in used}
    if len(sizes) > 1:
        raise ValueError(f"prefixes mixed in one batch must have the same n_prefix, got sizes {sorted(sizes)}")
    for n, prefix in pt.prefixes.items():
        prefix.requires_grad_(n in used)
    pt.active = names if isinstance(names, str) or names is None else used
    return model


def delete_prefix(model: GPT, name: str) -> GPT:
    """Remove the prefix ``name``; if it was in use, the model runs without a prefix (the base)."""
    pt = _prefix_tuning(model)
    if name not in pt.prefixes:
        raise ValueError(f"unknown prefix name {name!r}; the model has {pt.names}")
    del pt.prefixes[name]
    if pt.active == name or (isinstance(pt.active, list) and name in pt.active):
        pt.active = None
    return model


def fold_prefix(model: GPT, name: str | None = None) -> GPT:
    """Fold the reparameterisation MLP of prefix ``name`` (default: every prefix) into plain prefixes."""
    pt = _prefix_tuning(model)
    if name is not None and name not in pt.prefixes:
        raise ValueError(f"unknown prefix name {name!r}; the model has {pt.names}")
    for n, prefix in pt.prefixes.items():
        if name is None or n == name:
            prefix.fold()
    return model

"""Prompt tuning: a few trainable vectors (a "soft prompt") read by the frozen model before the text.

The model sees ``n_tokens`` virtual tokens in front of the embedded text::

    h_0 = [P ; E[x]] + pos,     P in R^{n_tokens x d_model} trainable, everything else frozen

so only ``n_tokens * d_model`` numbers train (20 x 128 = 2,560 for the toy model, 0.3 % of it).
Lester, Al-Rfou & Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv 2104.08691.

How it hooks in, without editing the model: the soft prompt is a submodule (``model.prompt_tuning``,
so it is in ``parameters()`` and ``state_dict()``); a forward pre-hook turns ``model(idx)`` into
``model(inputs_embeds=[P ; E[idx]], position_ids=...)`` and a forward hook drops the virtual positions
from the logits, so the output is ``(B, T, V)`` as before and the loss, ``train`` and ``evaluate`` work
unchanged.

Positions: the text keeps positions ``0 .. T-1``, as in pretraining; the virtual tokens have none (the
hook hands the model ``P - pos_emb[0]`` at position 0, so the first block reads exactly ``P``). Pushing
the text to positions ``n_tokens ..`` instead makes prompt tuning collapse on the toy model (notebook
03). The context counts the virtual tokens: ``n_tokens + T <= block_size``. In generation the soft
prompt enters ``generate``'s empty :class:`KVCache` on the first call and stays there (``n_virtual``
positions that are not text); later steps add nothing.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .common import Method, integer, module, one_of, positive_int
from .full import freeze
from .model import GPT
from .tasks import PAD_ID, tokenizer

INITS = ("vocab", "random")


@dataclass
class PromptTuningConfig:
    n_tokens: int = 20
    init: str = "vocab"           # "vocab": embeddings of real characters; "random": Gaussian vectors
    init_text: str | None = None  # with init="vocab": start from these characters (repeated / cut to n_tokens)
    seed: int = 0                 # which characters are sampled, or which random vectors are drawn

    def __post_init__(self):
        positive_int("n_tokens", self.n_tokens)
        one_of("init", self.init, INITS)
        integer("seed", self.seed)
        if self.init_text is not None:
            if self.init != "vocab":
                raise ValueError(f"init_text needs init='vocab', got init={self.init!r}")
            if not isinstance(self.init_text, str) or not self.init_text:
                raise ValueError(f"init_text must be a non-empty string, got {self.init_text!r}")
            bad = sorted(set(c for c in self.init_text if c not in tokenizer.stoi))
            if bad:
                raise ValueError(f"init_text {self.init_text!r} has characters outside the vocabulary: {bad} "
                                 f"(the vocabulary is {tokenizer.chars!r})")


class SoftPrompt(nn.Module):
    """``n_tokens`` trainable vectors that the hooks put in front of every input."""

    def __init__(self, config: PromptTuningConfig, embedding: torch.Tensor):
        super().__init__()
        self.config = config
        self.embedding = nn.Parameter(embedding.detach().clone())  # (n_tokens, d_model)
        self._n_virtual = 0  # positions prepended in the current call; the forward hook removes them

    @property
    def n_tokens(self) -> int:
        return self.embedding.shape[0]

    def pre_hook(self, model: GPT, args: tuple, kwargs: dict):
        """Rewrite ``model(idx, ...)`` into ``model(inputs_embeds=[P ; E[idx]], position_ids=...)``."""
        kwargs = dict(kwargs)
        idx = args[0] if args else kwargs.pop("idx", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if (idx is None) == (embeds is None):
            return None  # let the model raise its own error
        if idx is not None:
            embeds = model.embed(idx)  # (B, T, C), the ids checked
        B, T, _ = embeds.shape
        cache, positions = kwargs.get("past_kv"), kwargs.get("position_ids")
        self._n_virtual = 0
        if cache is not None and len(cache) > 0:  # a later step of generation: the prompt is in the cache
            kwargs.update(inputs_embeds=embeds)
            return (), kwargs
        n = self.n_tokens
        if n + T > model.config.block_size:
            raise ValueError(f"{n} virtual tokens + {T} input tokens exceed the context "
                             f"(block_size={model.config.block_size})")
        if positions is None:
            positions = torch.arange(T, device=embeds.device)  # the text keeps positions 0..T-1
        virtual = torch.zeros(*positions.shape[:-1], n, dtype=positions.dtype, device=positions.device)
        # the virtual tokens carry no position: cancel the pos_emb[0] that the model will add
        prompt = (self.embedding - model.pos_emb.weight[0]).to(embeds.dtype)
        prompt = prompt.unsqueeze(0).expand(B, n, -1)  # (n, C) -> (B, n, C)
        kwargs.update(inputs_embeds=torch.cat([prompt, embeds], dim=1),    # (B, n + T, C)
                      position_ids=torch.cat([virtual, positions], dim=-1))  # (n + T,) or (B, n + T)
        if cache is not None:
            cache.n_virtual = n  # the soft prompt's cached positions are not text
        self._n_virtual = n
        return (), kwargs

    def post_hook(self, model: GPT, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Drop the virtual positions: logits (B, n + T, V) -> (B, T, V)."""
        n, self._n_virtual = self._n_virtual, 0
        return output[:, n:]

    def extra_repr(self) -> str:
        c = self.config
        init = f"init_text={c.init_text!r}" if c.init_text else f"init={c.init!r}"
        return f"n_tokens={self.n_tokens}, d_model={self.embedding.shape[1]}, {init}, params={self.embedding.numel():,}"


def initial_prompt(model: GPT, config: PromptTuningConfig) -> torch.Tensor:
    """The starting soft prompt (n_tokens, d_model): real character embeddings, or random ones at their scale."""
    W = model.tok_emb.weight.detach()  # (V, C)
    n, g = config.n_tokens, torch.Generator().manual_seed(config.seed)
    if config.init == "random":
        # Gaussian with the spread of the real token embeddings, so the comparison is about content, not size
        return (torch.randn(n, W.shape[1], generator=g) * W[PAD_ID + 1:].std().item()).to(W)
    if config.init_text is not None:
        ids = tokenizer.encode(config.init_text)
        ids = torch.tensor((ids * (n // len(ids) + 1))[:n])  # repeat, then cut to n
    else:
        ids = torch.randint(PAD_ID + 1, W.shape[0], (n,), generator=g)  # sampled characters, never padding
    return W[ids.to(W.device)].clone()


def add_prompt_tuning(model: GPT, n_tokens: int = PromptTuningConfig.n_tokens, init: str = PromptTuningConfig.init,
                      init_text: str | None = PromptTuningConfig.init_text, seed: int = PromptTuningConfig.seed) -> GPT:
    """Freeze ``model`` and give it a trainable soft prompt of ``n_tokens`` vectors (see
    :class:`PromptTuningConfig`); returns the model."""
    config = PromptTuningConfig(n_tokens, init, init_text, seed)  # validates the options
    module("model", model, GPT)
    if hasattr(model, "prompt_tuning"):
        raise ValueError("the model already has prompt tuning; start again from a fresh mp.load_base()")
    if n_tokens >= model.config.block_size:
        raise ValueError(f"n_tokens={n_tokens} leaves no room for text in the context "
                         f"(block_size={model.config.block_size})")
    if init_text is not None and model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(f"init_text needs the course vocabulary ({tokenizer.vocab_size} ids), "
                         f"the model has {model.config.vocab_size}")
    embedding = initial_prompt(model, config)
    freeze(model)
    model.prompt_tuning = SoftPrompt(config, embedding).train(model.training)
    model.register_forward_pre_hook(model.prompt_tuning.pre_hook, with_kwargs=True)
    model.register_forward_hook(model.prompt_tuning.post_hook)
    return model


# --- bookkeeping: what a file holds (prompt tuning has one unnamed soft prompt) --------------------------

METHOD = Method("prompt", PromptTuningConfig, add_prompt_tuning, owned=(SoftPrompt,),
                names=lambda model: [None] if isinstance(getattr(model, "prompt_tuning", None), SoftPrompt) else [],
                parts=lambda model, name: {"prompt_tuning": model.prompt_tuning},
                options=lambda model, name: asdict(model.prompt_tuning.config))

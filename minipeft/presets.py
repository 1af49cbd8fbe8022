"""Model shapes for the memory formula: our toy model, and the published shapes of real decoder models.

A :class:`ModelShape` holds only the sizes that parameter counts and memory depend on. ``PRESETS`` maps
a name to the shape read from the model's ``config.json`` on the Hugging Face hub (cited beside each);
``n_params()`` reproduces each model's published parameter count exactly (a test checks it), e.g.
6,738,415,616 for Llama-2-7B (Touvron et al. 2023, arXiv 2307.09288) and 125,239,296 for OPT-125M
(Zhang et al. 2022, arXiv 2205.01068).
"""
from __future__ import annotations

from dataclasses import dataclass

from .model import GPTConfig


@dataclass(frozen=True)
class ModelShape:
    """The sizes the formula needs. ``from_config`` reads a :class:`minipeft.GPTConfig` (our toy model)."""
    name: str
    vocab_size: int
    d_model: int
    n_layer: int
    n_head: int
    d_ff: int
    n_positions: int = 0        # learned position embeddings (0: rotary, no parameters)
    n_kv_head: int | None = None  # grouped-query attention (Llama-2-70B: 8); None = n_head
    mlp: str = "gelu"           # "gelu" | "relu": fc_in, fc_out; "swiglu": fc_gate, fc_in (up), fc_out (down)
    bias: bool = True
    norm: str = "layernorm"     # "layernorm": weight + bias, keeps mean and 1/std; "rmsnorm": weight, keeps 1/rms
    tied_head: bool = False     # the output head shares the token embedding
    source: str = ""

    @classmethod
    def from_config(cls, config: GPTConfig, name: str = "toy") -> "ModelShape":
        return cls(name, config.vocab_size, config.d_model, config.n_layer, config.n_head, config.d_ff,
                   n_positions=config.block_size)

    @property
    def kv_dim(self) -> int:
        return self.d_model // self.n_head * (self.n_kv_head or self.n_head)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one block, by our names."""
        C, F, K = self.d_model, self.d_ff, self.kv_dim
        mlp = {"fc_in": (C, F), "fc_out": (F, C)}
        if self.mlp == "swiglu":
            mlp = {"fc_gate": (C, F), **mlp}
        return {"q_proj": (C, C), "k_proj": (C, K), "v_proj": (C, K), "o_proj": (C, C), **mlp}

    def tensors(self) -> list[int]:
        """Sizes of the base model's parameter tensors: embeddings, per block the linear weights (and
        biases) and the norms' weights (and biases), the final norm, the head (unless tied)."""
        C, V = self.d_model, self.vocab_size
        norm = [C, C] if self.norm == "layernorm" else [C]
        linear = [size for i, o in self.linears().values() for size in ([i * o, o] if self.bias else [i * o])]
        head = [] if self.tied_head else [V * C]
        return [V * C] + ([self.n_positions * C] if self.n_positions else []) + (linear + 2 * norm) * self.n_layer \
            + norm + head

    def n_params(self) -> int:
        """Parameters of the base model."""
        return sum(self.tensors())


# Published shapes: the config.json of each model on the Hugging Face hub.
PRESETS = {
    "toy": ModelShape.from_config(GPTConfig()),
    "OPT-125M": ModelShape("OPT-125M", 50272, 768, 12, 12, 3072, n_positions=2050, mlp="relu", tied_head=True,
                           source="huggingface.co/facebook/opt-125m/blob/main/config.json"),
    "OPT-1.3B": ModelShape("OPT-1.3B", 50272, 2048, 24, 32, 8192, n_positions=2050, mlp="relu", tied_head=True,
                           source="huggingface.co/facebook/opt-1.3b/blob/main/config.json"),
    "Llama-2-7B": ModelShape("Llama-2-7B", 32000, 4096, 32, 32, 11008, mlp="swiglu", bias=False, norm="rmsnorm",
                             source="huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json"),
    "Llama-2-13B": ModelShape("Llama-2-13B", 32000, 5120, 40, 40, 13824, mlp="swiglu", bias=False, norm="rmsnorm",
                              source="huggingface.co/meta-llama/Llama-2-13b-hf/blob/main/config.json"),
    # LLaMA (1): the 33B and 65B models of the QLoRA paper (Touvron et al. 2023, arXiv 2302.13971)
    "LLaMA-33B": ModelShape("LLaMA-33B", 32000, 6656, 60, 52, 17920, mlp="swiglu", bias=False, norm="rmsnorm",
                            source="huggingface.co/huggyllama/llama-30b/blob/main/config.json"),
    "LLaMA-65B": ModelShape("LLaMA-65B", 32000, 8192, 80, 64, 22016, mlp="swiglu", bias=False, norm="rmsnorm",
                            source="huggingface.co/huggyllama/llama-65b/blob/main/config.json"),
    "Llama-2-70B": ModelShape("Llama-2-70B", 32000, 8192, 80, 64, 28672, n_kv_head=8, mlp="swiglu", bias=False,
                              norm="rmsnorm", source="huggingface.co/meta-llama/Llama-2-70b-hf/blob/main/config.json"),
}

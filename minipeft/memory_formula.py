"""Training memory, predicted: a closed-form formula for any model shape, method and batch.

The same four parts as :func:`minipeft.measure_memory`, from arithmetic alone::

    weights     = sum over tensors of numel * bytes   (NF4: 0.5 byte per weight + one fp32 absmax per 64)
    gradients   = trainable * 4                        (bf16 full fine-tuning: * 2)
    optimizer   = trainable * 8                        AdamW's m and v in fp32 (bf16 full: + 4 for the fp32 master copy)
                  trainable * 2 + absmax               8-bit AdamW (bitsandbytes; Dettmers et al. 2022,
                                                       arXiv 2110.02861; see optimizer_bytes)
    activations = sum over layers of what autograd keeps for backward (below)

Activations, per block, in elements (B batch, T tokens, C = d_model, F = d_ff, h heads, Tk = T + prefix),
with every part present for full fine-tuning::

    LayerNorm inputs and outputs         4 B T C  (+ 2 B T statistics per LayerNorm: mean, 1/std)
    q and k^T copies for the scores      2 B T C
    softmax output                       B h T Tk   (FlashAttention: none; it recomputes the scores)
    v copy, input of o_proj              2 B T C
    GELU input and output                2 B T F

= 8BTC + 2BTF + 4BT + BhT^2 per layer in fp32, which is Korthikanti et al.'s ``sbh(34 + 5as/h)`` bytes
(arXiv 2205.05198) without its dropout masks (our dropout is 0) and at 4 bytes instead of 2: with F = 4C
their 34 = 2 x (16 elements) + 2 bytes of masks; we add the LayerNorm statistics they neglect.

What a PEFT method removes: autograd saves a tensor only if some gradient needs it. A frozen linear layer
keeps no input (its weight gradient is not needed), but the layers above the lowest trainable part still
keep what their *input* gradient needs (LayerNorm inputs, softmax, GELU input, q, k, v). So the formula
walks one block in the order of the forward pass with a flag "does this tensor need a gradient?"
(:func:`block_activations`), exactly as autograd decides. Prompt tuning lengthens T by its virtual
tokens and needs the gradient all the way down; prefix tuning lengthens the keys and values to Tk.

Gradient checkpointing (Chen et al. 2016, arXiv 1604.06174) keeps only each block's input (B T C) between
forward and backward, and recomputes one block's inside at a time in backward. The formula counts
``activations = what is held after the forward pass + the largest block's inside`` (the field
``recomputed``): an upper bound on the saved tensors alive at once, since the head's and the loss's are
freed before the first block is recomputed. :func:`minipeft.measure_memory` counts the same two terms.

The presets of :mod:`minipeft.presets` give the published shapes of real models, so the formula
answers "what would LoRA cost on a 7B model?". For them it assumes fused norms and, by default,
FlashAttention-style attention: an estimate, not a measurement.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .common import boolean, positive_int
from .memory import OPTIMIZERS, MemoryBreakdown
from .model import GPTConfig
from .adapter import PLACEMENTS
from .methods import METHODS as REGISTRY
from .presets import PRESETS, ModelShape
from .nf4 import DQ_BLOCKSIZE
from .qlora import NF4Config

DTYPE_BYTES = {"fp32": 4, "bf16": 2}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16"}
BASE_DTYPES = ("fp32", "bf16", "nf4")
METHODS = (*REGISTRY, "qlora")  # QLoRA: LoRA's options on a 4-bit base
NF4_BLOCK = NF4Config.blocksize  # weights per absmax constant
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096  # bitsandbytes 0.50, optim/optimizer.py: Optimizer2State.init_state


@dataclass(frozen=True)
class Plan:
    """What a method trains and changes, as the formula needs it (built by :func:`method_plan`)."""
    full: bool = False          # every parameter trains
    lora: tuple = ()            # ((linear name, r), ...) in every block
    n_virtual: int = 0          # prompt tuning: extra positions in front of the text
    n_prefix: int = 0           # prefix tuning: extra keys and values in every layer
    reparam_hidden: int = 0     # prefix tuning's reparameterisation MLP: its hidden width (0: none)
    adapters: tuple = ()        # where bottleneck adapters sit: ("attn", "mlp") houlsby, ("mlp",) pfeiffer
    bottleneck: int = 0
    relu: bool = False          # the adapter's nonlinearity keeps its output (ReLU) rather than its input
    tensors: tuple = ()         # sizes of the trainable tensors the method adds (for 8-bit optimizer state)
    ia3: tuple = ()             # IA3: ((linear name, scales its input?), ...) in every block
    dora: bool = False          # DoRA: the LoRA layers also learn a magnitude per output feature

    @property
    def added(self) -> int:
        """Trainable parameters the method adds (0 for full fine-tuning)."""
        return sum(self.tensors)

    @property
    def trained(self) -> set[str]:
        """Linear layers that must keep their input (their weight, or a LoRA on them, trains)."""
        return {name for name, _ in self.lora} | {name for name, inp in self.ia3 if inp}  # IA3: x * l keeps x

    @property
    def scaled(self) -> set[str]:
        """IA3 layers whose output is scaled: they keep that output (for l's gradient), not their input."""
        return {name for name, inp in self.ia3 if not inp}


def method_plan(shape: ModelShape, method: str, **options) -> Plan:
    """The :class:`Plan` of ``method`` with the options of its ``add_*`` function (their defaults too)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    config = REGISTRY["lora" if method == "qlora" else method].config  # its defaults, and its checks
    known = () if config is None else tuple(config.__dataclass_fields__)
    unknown = set(options) - set(known)
    if unknown:
        raise ValueError(f"{method} takes the options {sorted(known) or 'none'}, got {sorted(unknown)}")
    o = {} if config is None else asdict(config(**options))
    C, L = shape.d_model, shape.n_layer
    if method == "full":
        return Plan(full=True)
    if method == "prompt":
        return Plan(n_virtual=o["n_tokens"], tensors=(o["n_tokens"] * C,))
    if method in ("lora", "qlora", "dora"):
        layers = shape.linears()
        targets = (o["targets"],) if isinstance(o["targets"], str) else tuple(o["targets"])
        names = list(layers) if targets == ("all-linear",) else list(targets)
        bad = [n for n in names if n not in layers]
        if bad:
            raise ValueError(f"LoRA targets {bad} are not linear layers of {shape.name}: {list(layers)}")
        lora = tuple((n, o["r"]) for n in names)   # A: r x in, B: out x r (DoRA's m: out) per layer
        per_layer = [size for n, r in lora for size in (r * layers[n][0], layers[n][1] * r)
                     + ((layers[n][1],) if method == "dora" else ())]
        return Plan(lora=lora, dora=method == "dora", tensors=tuple(per_layer) * L)
    if method == "ia3":  # one vector per target layer: its input's size (feed-forward) or its output's
        layers = shape.linears()
        bad = [n for n in o["targets"] if n not in layers]
        if bad:
            raise ValueError(f"IA3 targets {bad} are not linear layers of {shape.name}: {list(layers)}")
        ia3 = tuple((n, n in o["feedforward"]) for n in o["targets"])
        return Plan(ia3=ia3, tensors=tuple(layers[n][0 if inp else 1] for n, inp in ia3) * L)
    if method == "prefix":  # per layer n keys and n values; or P = MLP(P'): n x e -> e x H -> H x (L 2 C)
        n, e, H = o["n_prefix"], o["reparam_dim"], o["reparam_hidden"]
        tensors = (n * e, e * H, H, H * L * 2 * C, L * 2 * C) if o["reparam"] else (L * 2 * n * C,)
        return Plan(n_prefix=n, reparam_hidden=H if o["reparam"] else 0, tensors=tensors)
    where = tuple(path.split(".")[0] for path in PLACEMENTS[o["placement"]])  # ("attn", "mlp") or ("mlp",)
    b = o["bottleneck"]   # each adapter: down C x b + b, up b x C + C
    return Plan(adapters=where, bottleneck=b, relu=o["activation"] == "relu",
                tensors=(C * b, b, b * C, C) * L * len(where))


def block_activations(shape: ModelShape, plan: Plan, B: int, T: int, grad_in: bool, act: int = 4,
                      flash: bool = False) -> tuple[int, bool]:
    """Bytes one block keeps for backward, and whether its output needs a gradient.

    Follows the forward pass; ``*_g`` says "this tensor needs a gradient", and a tensor is kept only
    when the gradient of another input of the same operation needs it. ``act``: bytes per activation.
    """
    C, F, h = shape.d_model, shape.d_ff, shape.n_head
    Tk = T + plan.n_prefix                           # keys and values per query (prefix tuning adds some)
    trained, r = plan.trained, dict(plan.lora)
    needs = trained | plan.scaled                    # linear layers whose output needs a gradient
    stats = 2 if shape.norm == "layernorm" else 1    # fp32 mean and 1/std per position (RMSNorm: 1/rms)
    kept = 0

    def norm(g: bool) -> int:                        # a norm keeps its input and statistics if g
        return (B * T * C * act + stats * B * T * 4) if g or plan.full else 0

    def lora_out(*names, g_in=True) -> int:          # LoRA keeps A x (B, T, r) for B's gradient
        # DoRA also W x and s B A x (B, T, out) for m's gradient, and fp32 vectors of out numbers: the norm,
        # g = m / norm, and g - 1 if the layer's input (so W x) needs a gradient
        dora = {n: 2 * B * T * lins[n][1] * act + (3 if g_in else 2) * lins[n][1] * 4 for n in names if plan.dora}
        return sum(B * T * r[n] * act + dora.get(n, 0) for n in names if n in r)

    lins = shape.linears()
    kept += sum(B * T * lins[n][1] * act for n in plan.scaled)  # IA3: base(x) * l keeps base(x)

    # x -> ln_1 -> u -> q, k, v
    kept += norm(grad_in)
    u_g = grad_in or plan.full
    qkv = ("q_proj", "k_proj", "v_proj")
    kept += B * T * C * act if plan.full or trained & set(qkv) else 0   # u, shared by the three
    kept += lora_out(*qkv, g_in=u_g)
    q_g, k_g, v_g = (u_g or plan.full or n in needs for n in qkv)
    k_g, v_g = k_g or plan.n_prefix > 0, v_g or plan.n_prefix > 0     # the trained prefix joins k and v
    s_g = q_g or k_g                                 # the scores q k^T need a gradient
    if flash:    # q, k, v, the output and one fp32 log-sum-exp per query; no T x Tk scores
        kept += (2 * B * T * C + 2 * B * Tk * C) * act + B * h * T * 4 if s_g or v_g else 0
    else:
        kept += B * Tk * C * act if q_g else 0       # k^T, for q's gradient
        kept += B * T * C * act if k_g else 0        # q, for k's gradient
        kept += T * Tk if s_g else 0                 # the causal mask (bool) of masked_fill
        kept += B * h * T * Tk * act if s_g or v_g else 0   # softmax output = weights applied to v
        kept += B * Tk * C * act if s_g else 0       # v, for the weights' gradient
    y_g = s_g or v_g
    kept += B * T * C * act if plan.full or "o_proj" in trained else 0  # o_proj's input
    kept += lora_out("o_proj", g_in=y_g)
    kept += adapter(plan, "attn", B * T, C, act)
    x1_g = grad_in or y_g or plan.full or "o_proj" in needs or "attn" in plan.adapters
    # x1 -> ln_2 -> u2 -> MLP
    kept += norm(x1_g)
    u2_g = x1_g or plan.full
    mlp_in = ("fc_gate", "fc_in") if shape.mlp == "swiglu" else ("fc_in",)
    kept += B * T * C * act if plan.full or trained & set(mlp_in) else 0
    kept += lora_out(*mlp_in, g_in=u2_g) + lora_out("fc_out", g_in=u2_g or bool(needs & set(mlp_in)))
    out_trained = plan.full or "fc_out" in trained
    in_g = {n: u2_g or plan.full or n in needs for n in mlp_in}
    BTF = B * T * F * act
    if shape.mlp == "gelu":     # GELU keeps its input; fc_out keeps GELU's output
        kept += (BTF if in_g["fc_in"] else 0) + (BTF if out_trained else 0)
    elif shape.mlp == "relu":   # ReLU keeps its output, the very tensor fc_out keeps
        kept += BTF if in_g["fc_in"] or out_trained else 0
    else:                       # fc_out(silu(gate) * up): silu keeps gate; the product keeps up and silu(gate)
        gate_g, up_g = in_g["fc_gate"], in_g["fc_in"]
        kept += (2 * BTF if gate_g else 0) + (BTF if up_g else 0) + (BTF if out_trained else 0)
    kept += adapter(plan, "mlp", B * T, C, act)
    return kept, x1_g or any(in_g.values()) or out_trained or "fc_out" in needs or "mlp" in plan.adapters


def adapter(plan: Plan, where: str, BT: int, C: int, act: int) -> int:
    """A bottleneck adapter keeps its input h (for W_down) and, in the bottleneck, the nonlinearity's
    input and output (ReLU: its output only, the same tensor W_up keeps)."""
    if where not in plan.adapters:
        return 0
    return (BT * C + BT * plan.bottleneck * (1 if plan.relu else 2)) * act


def _shape(model) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, GPTConfig):
        return ModelShape.from_config(model)
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model]
    raise ValueError(f"model must be a GPTConfig, a ModelShape or a preset name {list(PRESETS)}, got {model!r}")


def activation_bytes(shape: ModelShape, plan: Plan, B: int, T: int, act: int = 4, flash: bool = False,
                     checkpointing: bool = False) -> tuple[int, int]:
    """Bytes kept for backward by one step on ``B`` sequences of ``T`` text tokens (see the module docstring),
    and of them, those recomputed in backward. Checkpointing keeps each block's input (B T C) instead of
    its inside, and adds the largest block's inside, recomputed one block at a time."""
    C, V = shape.d_model, shape.vocab_size
    Tm = T + plan.n_virtual                      # positions the blocks see
    grad = plan.full or plan.n_virtual > 0       # does the first block's input need a gradient?
    kept, recomputed = 0, 0
    for _ in range(shape.n_layer):
        block, grad = block_activations(shape, plan, B, Tm, grad, act, flash)
        kept += B * Tm * C * act if checkpointing else block
        recomputed = max(recomputed, block if checkpointing else 0)
    stats = 2 if shape.norm == "layernorm" else 1
    kept += (B * Tm * C * act + stats * B * Tm * 4) if grad or plan.full else 0  # final norm
    kept += B * Tm * C * act if plan.full and not shape.tied_head else 0         # input of the trained head
    kept += B * T * C * act if plan.full and shape.tied_head else 0
    kept += B * T * V * 4 + B * T * 8 + 4        # fp32 log-softmax of the logits, int64 targets, the loss weight
    if plan.n_prefix:  # the prefixes picked per row by an int64 index; the reparam MLP keeps tanh's output
        kept += B * 8 + plan.n_prefix * plan.reparam_hidden * act
    if plan.full:                                # the embeddings keep their int64 indices
        kept += B * T * 8 + (T * 8 if shape.n_positions else 0)
    return kept + recomputed, recomputed


def optimizer_bytes(sizes, optimizer: str = "adamw", mixed: bool = False) -> int:
    """AdamW's state for trainable tensors of ``sizes`` elements: m and v in fp32 (8 bytes per parameter;
    mixed precision adds a 4-byte fp32 master copy). 8-bit AdamW (bitsandbytes, ``AdamW8bit``): m and v in
    one byte each, plus one fp32 absmax per block of 256 values of each, for tensors of at least 4,096
    elements (smaller ones stay fp32), plus the two 256-entry fp32 code books, shared by all tensors.
    Paged 8-bit AdamW keeps the same bytes; it only lets them move to CPU memory on a spike."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    master = 4 * sum(sizes) if mixed else 0
    if optimizer == "adamw":
        return 8 * sum(sizes) + master
    big = [n for n in sizes if n >= BNB_MIN_8BIT]
    small = sum(sizes) - sum(big)
    return master + 8 * small + sum(2 * n + 2 * 4 * -(-n // BNB_BLOCK) for n in big) + (2 * 256 * 4 if big else 0)


def predict_memory(model="toy", method: str = "lora", batch_size: int = 32, seq_len: int = 32,
                   base_dtype: str = "fp32", compute_dtype: str | None = None, flash: bool | None = None,
                   double_quant: bool = NF4Config.double_quant, optimizer: str = "adamw",
                   checkpointing: bool = False, **options) -> MemoryBreakdown:
    """The formula's :class:`MemoryBreakdown` of one AdamW training step.

    ``model``: a GPTConfig, a :class:`ModelShape` or a name in ``PRESETS``. ``options`` are those of
    the method's ``add_*`` function (``r``, ``targets``, ``n_tokens``, ``n_prefix``, ``bottleneck``, ...).
    ``base_dtype``: how the frozen base is stored, "fp32", "bf16" or "nf4" ("qlora" implies "nf4");
    bf16 full fine-tuning means mixed precision (bf16 weights and gradients, fp32 master and moments).
    ``compute_dtype``: of the activations (default fp32 for an fp32 base, else bf16). ``flash``:
    FlashAttention-style attention (default: on for the real-model presets, off for our own model).
    ``double_quant``: NF4 absmax constants stored in 8 bits (QLoRA's default, as in ``mp.quantize_nf4``).
    ``optimizer``: "adamw", "adamw8bit" or "paged_adamw8bit" (:func:`optimizer_bytes`). ``checkpointing``:
    gradient checkpointing (``model.gradient_checkpointing = True``), see :func:`activation_bytes`.
    """
    shape = _shape(model)
    if method == "qlora":
        base_dtype = "nf4"
    if base_dtype not in BASE_DTYPES:
        raise ValueError(f"base_dtype must be one of {BASE_DTYPES}, got {base_dtype!r}")
    compute_dtype = compute_dtype or ("fp32" if base_dtype == "fp32" else "bf16")
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype must be 'fp32' or 'bf16', got {compute_dtype!r}")
    batch_size, seq_len = positive_int("batch_size", batch_size), positive_int("seq_len", seq_len)
    double_quant = boolean("double_quant", double_quant)
    if flash is not None:
        boolean("flash", flash)
    checkpointing = boolean("checkpointing", checkpointing)
    plan = method_plan(shape, method, **options)
    if plan.full and base_dtype == "nf4":
        raise ValueError("full fine-tuning cannot train 4-bit weights: choose base_dtype 'fp32' or 'bf16'")
    if checkpointing and plan.n_prefix:
        raise ValueError("gradient checkpointing does not work with prefix tuning (its cache grows in place)")
    flash = (shape.name in PRESETS and shape.name != "toy") if flash is None else flash
    N = shape.n_params()
    weights = {}

    def add(dtype: str, nbytes: int):
        weights[dtype] = weights.get(dtype, 0) + nbytes

    if base_dtype == "nf4":  # the block's linear weights in 4 bits; embeddings, norms, biases, head not
        sizes = [i * o for i, o in shape.linears().values()] * shape.n_layer
        for n in sizes:
            blocks = -(-n // NF4_BLOCK)
            add("uint8", (n + 1) // 2)                          # two 4-bit codes a byte
            if double_quant:  # absmax in 8 bits (in whole blocks of 256), an fp32 scale per 256, the offset
                add("uint8", DQ_BLOCKSIZE * -(-blocks // DQ_BLOCKSIZE))
                add("float32", 4 * (-(-blocks // DQ_BLOCKSIZE) + 1))
            else:
                add("float32", 4 * blocks)                      # one fp32 absmax a block
        add(DTYPE_NAMES[compute_dtype], (N - sum(sizes)) * DTYPE_BYTES[compute_dtype])
    else:
        add(DTYPE_NAMES[base_dtype], N * DTYPE_BYTES[base_dtype])
    add("float32", plan.added * 4)               # what a PEFT method adds trains in fp32
    trainable = N if plan.full else plan.added
    mixed = plan.full and base_dtype == "bf16"
    gradients = trainable * (2 if mixed else 4)
    state = optimizer_bytes(shape.tensors() if plan.full else plan.tensors, optimizer, mixed)
    act, recomputed = activation_bytes(shape, plan, batch_size, seq_len, DTYPE_BYTES[compute_dtype], flash,
                                       checkpointing)
    return MemoryBreakdown({k: v for k, v in weights.items() if v}, gradients, state, act, trainable,
                           recomputed=recomputed)

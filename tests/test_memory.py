"""Memory: the measurement against hand computations, and the formula against the measurement."""
import pytest
import torch
import torch.nn as nn

import minipeft as mp
from minipeft.memory_formula import predict_memory
from minipeft.presets import PRESETS, ModelShape


# --- the measurement, against a hand computation ---------------------------------------------------

def square_loss(model, x, y):
    return model(x).pow(2).sum()


@pytest.mark.parametrize("freeze_first", [False, True])
def test_two_layer_network_by_hand(freeze_first):
    """Linear(4, 8) -> ReLU -> Linear(8, 3) on a batch of 5, loss sum(out^2), everything fp32.

    Weights: (4*8 + 8) + (8*3 + 3) = 67 parameters = 268 bytes. Saved for backward:
      first linear: its input x (5x4 = 80 B), needed for its weight gradient (only if it trains);
      ReLU: its output (5x8 = 160 B) -- the very tensor the second linear keeps as its input: once;
      pow(2): its input, the output (5x3 = 60 B).
    Frozen first layer: nothing below the ReLU needs a gradient, so x is not kept: 160 + 60 = 220 B.
    """
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    if freeze_first:
        net[0].requires_grad_(False)
    x = torch.randn(5, 4)
    m = mp.measure_memory(net, batch=(x, None), loss=square_loss)
    trainable = 27 if freeze_first else 67
    assert m.weights == {"float32": 268}
    assert m.trainable == trainable
    assert m.gradients == 4 * trainable
    assert m.optimizer == 2 * 4 * trainable
    assert m.activations == (220 if freeze_first else 300)
    assert m.total == 268 + 12 * trainable + m.activations


def test_measure_leaves_the_model_unchanged(tiny_model):
    mp.full_finetune(tiny_model)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    mp.measure_memory(tiny_model, batch_size=2, seq_len=8)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in tiny_model.parameters())
    assert not tiny_model.training


def test_a_failed_measurement_restores_every_modules_mode(tiny_model):
    """A step that fails midway (a sequence longer than the context) leaves each module's mode as it was."""
    mp.add_lora(tiny_model.eval(), r=2, dropout=0.1)
    tiny_model.blocks[0].train()  # a mixed state: the root in eval, one block in train
    modes = [m.training for m in tiny_model.modules()]
    with pytest.raises(ValueError):
        mp.measure_memory(tiny_model, batch_size=2, seq_len=tiny_model.config.block_size + 1)
    assert [m.training for m in tiny_model.modules()] == modes


@pytest.mark.parametrize("method", ["full", "lora"])
def test_optimizer_state_is_two_fp32_moments(tiny_model, method):
    """AdamW keeps m and v: 2 x trainable x 4 bytes (REFERENCES: 16 bytes per parameter in all)."""
    mp.full_finetune(tiny_model) if method == "full" else mp.add_lora(tiny_model, r=2)
    trainable, _ = mp.trainable_parameters(tiny_model)
    m = mp.measure_memory(tiny_model, batch_size=2, seq_len=8)
    assert m.optimizer == 2 * trainable * 4
    assert m.gradients == trainable * 4


def test_measure_rejects_bad_input(tiny_model):
    with pytest.raises(ValueError, match="no trainable parameters"):
        mp.measure_memory(mp.freeze(tiny_model))
    mp.full_finetune(tiny_model)
    with pytest.raises(ValueError, match="seq_len"):
        mp.measure_memory(tiny_model, seq_len=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        mp.measure_memory(tiny_model, optimizer="sgd")


# --- the formula against the measurement ----------------------------------------------------------

def _apply(model, method, options):
    if method == "full":
        return mp.full_finetune(model)
    if method == "lora":
        return mp.add_lora(model, **options)
    if method == "prompt":
        return mp.add_prompt_tuning(model, **options)
    if method == "prefix":
        return mp.add_prefix_tuning(model, **options)
    if method == "adapter":
        return mp.add_adapters(model, **options)
    if method == "qlora":
        mp.quantize_nf4(model, double_quant=options.pop("double_quant", True))
        return mp.add_lora(model, **options)
    raise AssertionError(method)


CASES = [
    ("full", {}),
    ("lora", {"r": 4}),
    ("lora", {"r": 2, "targets": "all-linear"}),
    ("lora", {"r": 3, "targets": ("k_proj", "fc_out")}),
    ("lora", {"r": 2, "targets": ("o_proj",)}),
    ("prompt", {"n_tokens": 5}),
    ("prefix", {"n_prefix": 4}),
    ("prefix", {"n_prefix": 3, "reparam": False}),
    ("adapter", {"bottleneck": 4}),
    ("adapter", {"bottleneck": 3, "placement": "pfeiffer"}),
    ("adapter", {"bottleneck": 3, "placement": "houlsby", "activation": "relu"}),
    ("qlora", {"r": 4}),
    ("qlora", {"r": 2, "targets": "all-linear", "double_quant": False}),
]


@pytest.mark.parametrize("method,options", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("batch_size,seq_len", [(3, 11), (8, 30)])
def test_formula_matches_measurement(tiny_model, tiny_config, method, options, batch_size, seq_len):
    """Exact for weights, gradients and optimizer state; activations within 10 % (in fact exact)."""
    _apply(tiny_model, method, dict(options))
    measured = mp.measure_memory(tiny_model, batch_size, seq_len)
    # on the CPU the 4-bit layers compute in fp32
    predicted = predict_memory(tiny_config, method, batch_size, seq_len, compute_dtype="fp32", **options)
    assert measured.weights == predicted.weights
    assert measured.trainable == predicted.trainable == mp.trainable_parameters(tiny_model)[0]
    assert measured.gradients == predicted.gradients
    assert measured.optimizer == predicted.optimizer
    assert abs(predicted.activations - measured.activations) <= 0.10 * measured.activations


# --- presets: published shapes ---------------------------------------------------------------------

@pytest.mark.parametrize("name,published", [
    ("toy", 812_032),                # data/base/report.json
    ("OPT-125M", 125_239_296),       # sum of parameter sizes of facebook/opt-125m
    ("OPT-1.3B", 1_315_758_080),
    ("Llama-2-7B", 6_738_415_616),
    ("Llama-2-13B", 13_015_864_320),
    ("Llama-2-70B", 68_976_648_192),
])
def test_preset_parameter_counts_match_published_models(name, published):
    assert PRESETS[name].n_params() == published


@pytest.mark.parametrize("name,billions", [("LLaMA-33B", 32.5), ("LLaMA-65B", 65.2)])
def test_llama_one_presets_match_the_papers_sizes(name, billions):
    """Touvron et al. 2023 (arXiv 2302.13971), Table 2: 32.5B and 65.2B parameters (cut, not rounded, to
    one decimal: the 65B model has 65.29 billion)."""
    assert PRESETS[name].n_params() // 10 ** 8 == round(billions * 10)


def test_sixteen_bytes_per_parameter_for_full_fine_tuning():
    """REFERENCES: fp32 AdamW 4 + 4 + 8; mixed precision bf16 2 + 2 + 12: 16 bytes per parameter."""
    for dtype in ("fp32", "bf16"):
        p = predict_memory("Llama-2-7B", "full", 1, 1, base_dtype=dtype)
        assert p.weight_bytes + p.gradients + p.optimizer == 16 * 6_738_415_616


def test_korthikanti_without_dropout():
    """Per layer, full fine-tuning, eager attention: Korthikanti's s b h (34 + 5 a s / h) bytes in 16 bit
    minus the dropout masks (our dropout is 0): 16 elements of sbh + as^2 b, here at 2 bytes, plus
    the LayerNorm statistics (2 x 2 fp32 per position) they neglect."""
    shape = ModelShape("gpt", vocab_size=10, d_model=64, n_layer=1, n_head=4, d_ff=256, n_positions=0)
    s, b, h, a = 32, 2, 64, 4
    two = predict_memory(shape, "full", b, s, base_dtype="bf16", flash=False)
    one = ModelShape("gpt", vocab_size=10, d_model=64, n_layer=2, n_head=4, d_ff=256, n_positions=0)
    per_layer = predict_memory(one, "full", b, s, base_dtype="bf16", flash=False).activations - two.activations
    assert per_layer == s * b * h * 16 * 2 + 2 * a * s * s * b + 4 * s * b * 4 + s * s


def test_repr_prints_binary_units():
    """2**30 bytes is one GiB, not one GB (10**9): the repr says GiB."""
    text = repr(mp.MemoryBreakdown({"float32": 3 * 2 ** 30}, 2 ** 20, 0, 512))
    assert "weights=3.00 GiB" in text and "gradients=1.00 MiB" in text and "activations=512 B" in text


def test_formula_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        predict_memory("toy", "no_such_method")
    with pytest.raises(ValueError, match="takes the options"):
        predict_memory("toy", "lora", rank=4)
    with pytest.raises(ValueError, match="4-bit"):
        predict_memory("toy", "full", base_dtype="nf4")
    with pytest.raises(ValueError, match="preset"):
        predict_memory("GPT-5", "lora")
    with pytest.raises(ValueError, match="not linear layers"):
        predict_memory("toy", "lora", targets=("gate_proj",))
    with pytest.raises(ValueError, match="optimizer must be one of"):
        predict_memory("toy", "lora", optimizer="adam8bit")
    with pytest.raises(TypeError, match="checkpointing"):
        predict_memory("toy", "lora", checkpointing="yes")
    with pytest.raises(ValueError, match="prefix"):
        predict_memory("toy", "prefix", checkpointing=True)


# --- plots and the widget's function ---------------------------------------------------------------

def test_gpu_fit_by_hand():
    from minipeft.plots import gpu_fit
    twenty_gb = mp.MemoryBreakdown({"bfloat16": 20 * 2 ** 30})
    assert gpu_fit(twenty_gb) == {16: False, 24: True, 40: True, 48: True, 80: True}
    assert gpu_fit(mp.MemoryBreakdown({"float32": 24 * 2 ** 30}))[24]  # exactly full still fits


@pytest.mark.parametrize("method", ["full", "prompt", "prefix", "adapter", "lora", "qlora"])
@pytest.mark.parametrize("base_dtype", ["fp32", "bf16", "nf4"])
def test_memory_estimate_over_its_range(method, base_dtype):
    import matplotlib.pyplot as plt
    from minipeft.plots import memory_estimate, plot_memory_estimate
    if method == "full" and base_dtype == "nf4":
        with pytest.raises(ValueError, match="4-bit"):
            memory_estimate("Llama-2-7B", method, base_dtype=base_dtype)
        return
    p, fits = memory_estimate("Llama-2-7B", method, 8, base_dtype, 4, 512)
    assert p.total > 0 and set(fits) == {16, 24, 40, 48, 80}
    if method == "full":  # 16 bytes per parameter before activations (REFERENCES, Memory)
        assert p.weight_bytes + p.gradients + p.optimizer == 16 * 6_738_415_616
    fig = plot_memory_estimate("Llama-2-7B", method, 8, base_dtype, 4, 512)
    assert len(fig.axes[0].patches) == 4
    plt.close(fig)


@pytest.mark.parametrize("preset,method,base_dtype,batch,labels", [
    # 14 GiB: the axis ends at 1.6 x 14 = 22 GiB, so only the 16 GB GPU's line is drawn, and it fits
    ("Llama-2-7B", "lora", "nf4", 4, [" 16 GB GPU fits"]),
    # 1,953 GiB: the five lines lie within 6 % of the axis of each other and share one label
    ("Llama-2-70B", "full", "bf16", 64, [" 16, 24, 40, 48, 80 GB GPU too small"]),
])
def test_memory_estimate_labels_each_gpu_line_once(preset, method, base_dtype, batch, labels):
    import matplotlib.pyplot as plt
    from minipeft.plots import plot_memory_estimate
    fig = plot_memory_estimate(preset, method, 8, base_dtype, batch, 512)
    assert [t.get_text() for t in fig.axes[0].texts] == labels
    plt.close(fig)


def test_breakdown_bars_stack_to_the_totals():
    import matplotlib.pyplot as plt
    from minipeft.plots import plot_memory_breakdown, plot_memory_scaling
    parts = {"a": mp.MemoryBreakdown({"float32": 2 ** 20}, 2 ** 20, 2 * 2 ** 20, 3 * 2 ** 20),
             "b": mp.MemoryBreakdown({"float32": 2 ** 20}, 0, 0, 5 * 2 ** 20)}
    fig = plot_memory_breakdown(parts, unit="MiB")
    tops = {}
    for bar in fig.axes[0].patches:
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, 0), bar.get_y() + bar.get_height())
    assert tops == {0: pytest.approx(7.0), 1: pytest.approx(6.0)}
    plt.close(fig)
    fig = plot_memory_scaling("OPT-125M", batch_sizes=(1, 4), seq_len=128)
    assert len(fig.axes[0].get_lines()) == 2 + 5  # two methods, five GPU sizes
    assert fig.axes[0].get_ylabel() == "GiB"
    plt.close(fig)
    with pytest.raises(ValueError, match="unit must be one of"):
        plot_memory_breakdown(parts, unit="GB")  # 2**30 bytes is a GiB; a decimal GB is not offered
    with pytest.raises(ValueError, match="unit"):
        plot_memory_breakdown(parts, unit="GiBs")
    plt.close(fig)


# --- gradient checkpointing and 8-bit optimizer state ----------------------------------------------

CHECKPOINT_CASES = [c for c in CASES if c[0] != "prefix"]  # prefix tuning's cache cannot be recomputed


@pytest.mark.parametrize("method,options", CHECKPOINT_CASES, ids=lambda v: str(v))
def test_formula_matches_measurement_with_checkpointing(tiny_model, tiny_config, method, options):
    """Held after the forward pass + the largest block recomputed: formula and measurement agree exactly.
    Checkpointing saves (the smaller blocks' insides) - (the blocks' inputs): with two blocks it saves when
    every block keeps a lot (full fine-tuning, prompt tuning), and can cost memory when the lowest block
    keeps little (LoRA on o_proj only: block 0 keeps almost nothing, yet its input is held)."""
    _apply(tiny_model, method, dict(options))
    plain = mp.measure_memory(tiny_model, 3, 11)
    tiny_model.gradient_checkpointing = True
    measured = mp.measure_memory(tiny_model, 3, 11)
    predicted = predict_memory(tiny_config, method, 3, 11, compute_dtype="fp32", checkpointing=True, **options)
    assert measured.activations == predicted.activations
    assert measured.recomputed == predicted.recomputed > 0
    assert (measured.weights, measured.gradients, measured.optimizer) == (plain.weights, plain.gradients,
                                                                          plain.optimizer)
    if method in ("full", "prompt"):
        assert measured.activations < plain.activations


def test_checkpointing_by_hand():
    """Two blocks, LoRA on q and v, B=2, T=5, C=8, fp32. Held after the forward pass: each block's input
    (2 x 2 x 5 x 8 x 4 = 640 B), the final LayerNorm's input and statistics (320 + 2 x 10 x 4 = 400 B),
    the fp32 log-softmax of the logits (10 x 7 x 4 = 280 B), the int64 targets (80 B) and the loss weight
    (4 B): 1,404 B. Recomputed: the larger block, block 1 (its input needs a gradient, for block 0's LoRA)."""
    config = mp.GPTConfig(vocab_size=7, block_size=8, d_model=8, n_layer=2, n_head=2, d_ff=16)
    torch.manual_seed(0)
    model = mp.add_lora(mp.GPT(config), r=2)
    model.gradient_checkpointing = True
    m = mp.measure_memory(model, 2, 5)
    assert m.activations - m.recomputed == 640 + 400 + 280 + 80 + 4
    # block 1 keeps, with a gradient flowing through it: ln_1's input + stats (320 + 80), ln_1's output u for
    # the LoRA A gradients (320), LoRA's A u for q and v (2 x 10 x 2 x 4 = 160), k^T and q (2 x 320), the
    # causal mask (25 bools), the softmax (2 x 2 x 5 x 5 x 4 = 400), v (320), ln_2's input + stats (400),
    # GELU's input (10 x 16 x 4 = 640): 3,305 B
    assert m.recomputed == 320 + 80 + 320 + 160 + 640 + 25 + 400 + 320 + 400 + 640


def test_eight_bit_adamw_state_by_hand_and_bitsandbytes(tiny_model):
    """bitsandbytes' AdamW8bit: one byte for m and one for v per parameter and an fp32 absmax per 256
    of each, for tensors of >= 4,096 elements; smaller ones keep fp32 m and v (8 bytes); plus the two
    256-entry fp32 code books (2 KiB), shared. Hand count for the tiny model (C=32, F=64, V=41, 48
    positions, 2 layers), full fine-tuning: 8-bit: fc_in and fc_out weights (2,048 each) are below
    4,096, so no tensor is! Everything stays fp32 -- the formula must say the same."""
    mp.full_finetune(tiny_model)
    n = mp.trainable_parameters(tiny_model)[0]
    measured = mp.measure_memory(tiny_model, 2, 8, optimizer="adamw8bit")
    assert measured.optimizer == 8 * n == predict_memory(tiny_model.config, "full", optimizer="adamw8bit").optimizer


def test_eight_bit_adamw_state_on_large_tensors():
    """C=64, F=128, V=13, 16 positions, 1 layer, LoRA r=64 on q and v: A and B are 64 x 64 = 4,096 each,
    just 8-bit: each 2 x 4,096 + 2 x 4 x 16 absmax = 8,320 B; four tensors + 2,048 B of code books."""
    config = mp.GPTConfig(vocab_size=13, block_size=16, d_model=64, n_layer=1, n_head=2, d_ff=128)
    torch.manual_seed(0)
    model = mp.add_lora(mp.GPT(config), r=64)
    by_hand = 4 * (2 * 4096 + 2 * 4 * 16) + 2 * 256 * 4
    assert mp.measure_memory(model, 2, 8, optimizer="adamw8bit").optimizer == by_hand
    with pytest.warns(UserWarning, match="[Pp]aged"):  # on the CPU: the same state, not paged
        assert mp.measure_memory(model, 2, 8, optimizer="paged_adamw8bit").optimizer == by_hand
    for optimizer in ("adamw8bit", "paged_adamw8bit"):  # paging moves the state, it does not shrink it
        assert predict_memory(config, "lora", r=64, optimizer=optimizer).optimizer == by_hand
    assert predict_memory(config, "lora", r=64).optimizer == 4 * 4096 * 8


def test_eight_bit_adamw_on_llama_7b_is_a_quarter():
    """Full fine-tuning of Llama-2-7B: 2 bytes (+ 8 bytes per 256) instead of 8 per parameter; the norms'
    4,096-element weights are just large enough, so every tensor is 8-bit."""
    n = 6_738_415_616
    fp32 = predict_memory("Llama-2-7B", "full", 1, 1).optimizer
    eight = predict_memory("Llama-2-7B", "full", 1, 1, optimizer="adamw8bit").optimizer
    assert fp32 == 8 * n
    assert eight == 2 * n + 8 * sum(-(-t // 256) for t in PRESETS["Llama-2-7B"].tensors()) + 2048
    assert 0.25 < eight / fp32 < 0.26


def test_checkpointing_on_llama_7b_holds_one_vector_per_token_and_layer():
    """QLoRA on Llama-2-7B, batch 1 x 512 tokens, bf16 activations. Held after the forward pass: 32 block
    inputs of 512 x 4,096 x 2 bytes (128 MiB), the final RMSNorm's input and fp32 1/rms (4 MiB + 2 KiB), the
    fp32 log-softmax of the logits (512 x 32,000 x 4), the int64 targets and the loss weight."""
    T, C, V = 512, 4096, 32000
    plain = predict_memory("Llama-2-7B", "qlora", 1, T)
    ck = predict_memory("Llama-2-7B", "qlora", 1, T, checkpointing=True)
    assert ck.activations - ck.recomputed == 32 * T * C * 2 + (T * C * 2 + T * 4) + T * V * 4 + T * 8 + 4
    assert ck.activations < plain.activations / 4

import pytest
import torch

import minipeft as mp
from minipeft.train import lr_at, train_step


def test_short_training_lowers_loss(tiny_model):
    task = mp.make_task("copy", n_train=256)
    hist = mp.train(tiny_model, task, steps=200, lr=1e-2, batch_size=32, device="cpu", progress=False)
    first, last = sum(hist.loss[:5]) / 5, sum(hist.loss[-5:]) / 5
    assert last < 0.7 * first  # from ~ln(41) = 3.7 to below 2.6


def test_deterministic_on_cpu(tiny_config):
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        m = mp.GPT(tiny_config)
        runs.append(mp.train(m, mp.make_task("rotate", n_train=64), steps=10, device="cpu",
                             progress=False, seed=5).loss)
    assert runs[0] == runs[1]


def test_only_trainable_parameters_change(tiny_model):
    mp.freeze(tiny_model)
    tiny_model.head.weight.requires_grad_(True)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    mp.train(tiny_model, mp.make_task("copy", n_train=64), steps=5, device="cpu", progress=False)
    after = tiny_model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight"}


def test_schedule_by_hand():
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)  # half-way down the cosine: 0.1 + 0.9/2


def test_eval_history(tiny_model):
    h = mp.train(tiny_model, mp.make_task("copy", n_train=64, n_val=32), steps=6, eval_every=3,
                 device="cpu", progress=False)
    assert h.eval_steps == [3, 6] and len(h.val_acc) == 2 and all(0 <= a <= 1 for a in h.train_acc)


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(lr=float("nan")), "lr"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_arguments(tiny_model, kwargs, words):
    with pytest.raises(ValueError, match=words):
        mp.train(tiny_model, mp.make_task("copy", n_train=8), progress=False, **kwargs)


def test_no_trainable_parameters(tiny_model):
    mp.freeze(tiny_model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        mp.train(tiny_model, mp.make_task("copy", n_train=8), progress=False)


def test_evaluate_bad_input(tiny_model):
    with pytest.raises(ValueError, match="split"):
        mp.evaluate(tiny_model, mp.make_task("copy", n_train=8), split="validation")
    with pytest.raises(ValueError, match="Task"):
        mp.evaluate(tiny_model, "copy")


# --- nothing lost on bad input ------------------------------------------------------------------------

def snapshot(model):
    """Every tensor's bits (NaN compares equal to itself), the requires_grad flags, and the mode."""
    bits = {k: v.detach().clone().view(-1).view(torch.uint8) for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    return bits, flags, model.training


def assert_unchanged(model, snap):
    bits, flags, training = snapshot(model)
    assert bits.keys() == snap[0].keys()
    changed = [k for k in bits if not torch.equal(bits[k], snap[0][k])]
    assert not changed, f"changed: {changed}"
    assert flags == snap[1] and training == snap[2]


def small_task():
    return mp.make_task("copy", n_train=32, n_val=8)


NO_GPU = [(dict(device="cuda"), ValueError, "device")] if not torch.cuda.is_available() else []


@pytest.mark.parametrize("kwargs, error, name", [
    (dict(steps=0), ValueError, "steps"), (dict(steps=-3), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"), (dict(steps="10"), TypeError, "steps"),
    (dict(steps=True), TypeError, "steps"), (dict(steps=None), TypeError, "steps"),
    (dict(batch_size=0), ValueError, "batch_size"), (dict(batch_size="32"), TypeError, "batch_size"),
    (dict(batch_size=True), TypeError, "batch_size"), (dict(batch_size=8.0), TypeError, "batch_size"),
    (dict(lr=0.0), ValueError, "lr"), (dict(lr=-1e-3), ValueError, "lr"), (dict(lr=float("nan")), ValueError, "lr"),
    (dict(lr=float("inf")), ValueError, "lr"), (dict(lr="1e-3"), TypeError, "lr"), (dict(lr=None), TypeError, "lr"),
    (dict(lr=True), TypeError, "lr"),
    (dict(seed=1.5), TypeError, "seed"), (dict(seed="0"), TypeError, "seed"), (dict(seed=None), TypeError, "seed"),
    (dict(warmup=-1), ValueError, "warmup"), (dict(steps=5, warmup=6), ValueError, "warmup"),
    (dict(warmup=1.5), TypeError, "warmup"), (dict(warmup="10"), TypeError, "warmup"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"), (dict(weight_decay=float("inf")), ValueError, "weight_decay"),
    (dict(weight_decay=float("nan")), ValueError, "weight_decay"), (dict(weight_decay="0"), TypeError, "weight_decay"),
    (dict(eval_every=-1), ValueError, "eval_every"), (dict(eval_every=2.5), TypeError, "eval_every"),
    (dict(eval_every="5"), TypeError, "eval_every"),
    (dict(device="not-a-device"), ValueError, "device"), (dict(device=3.5), TypeError, "device"),
    (dict(progress="yes"), TypeError, "progress"), (dict(progress=1), TypeError, "progress"),
    (dict(progress=None), TypeError, "progress"),
    (dict(task="copy"), ValueError, "task"), (dict(task=[]), ValueError, "task"),
    (dict(task=mp.Task("copy", [], ["copy:ab=ab."], 0)), ValueError, "train"),
] + NO_GPU)
@pytest.mark.parametrize("start_training", [False, True])
def test_bad_arguments_change_nothing(tiny_model, kwargs, error, name, start_training):
    """Refused before anything happens: no step taken (a bad eval_every used to fail after one), mode kept."""
    model = mp.full_finetune(tiny_model).train(start_training)
    before = snapshot(model)
    args = dict(task=small_task(), steps=5, device="cpu", progress=False) | kwargs
    with pytest.raises(error, match=name) as info:
        mp.train(model, **args)
    assert "not supported between" not in str(info.value)
    assert_unchanged(model, before)


def test_nan_weight_refused_up_front(tiny_model):
    model = mp.full_finetune(tiny_model).train()
    with torch.no_grad():
        model.blocks[1].mlp.fc_in.weight[3, 4] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"'blocks\.1\.mlp\.fc_in\.weight' has 1 non-finite"):
        mp.train(model, small_task(), steps=3, device="cpu", progress=False)
    assert_unchanged(model, before)


def record_before_each_step(model):
    """Clones of the parameters at every training-mode forward, i.e. as they were before each step."""
    seen = []

    def hook(module, args):
        if module.training:
            seen.append([p.detach().clone() for p in module.parameters()])
    model.register_forward_pre_hook(hook)
    return seen


@pytest.mark.parametrize("start_training", [False, True])
def test_huge_lr_stops_before_the_bad_step(tiny_model, start_training):
    model = mp.full_finetune(tiny_model).train(start_training)
    seen = record_before_each_step(model)
    with pytest.raises(ValueError, match=r"at step (\d+) .* learning rate .*lower lr") as info:
        mp.train(model, small_task(), steps=50, lr=1e9, warmup=0, device="cpu", progress=False)
    failed = int(info.value.args[0].split("at step ")[1].split()[0])
    assert failed == len(seen) - 1 >= 1  # the first steps ran; step `failed` computed a loss and stopped
    for p, q in zip(model.parameters(), seen[-1]):  # the weights before the failing step, bit for bit
        assert torch.equal(p.detach(), q)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert model.training == start_training
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_gradient_is_not_applied(tiny_model):
    """A finite loss but an infinite gradient at step 3: steps 0-2 are kept, step 3 is not applied."""
    model = mp.full_finetune(tiny_model)
    seen = record_before_each_step(model)
    calls = []
    model.head.weight.register_hook(lambda g: (calls.append(1), g * float("inf") if len(calls) == 4 else g)[1])
    with pytest.raises(ValueError, match=r"at step 3 \(of 10\).*gradient norm (nan|inf)"):
        mp.train(model, small_task(), steps=10, lr=1e-2, device="cpu", progress=False)
    assert len(seen) == 4
    for p, q in zip(model.parameters(), seen[3]):
        assert torch.equal(p.detach(), q)
    assert not torch.equal(seen[3][0], seen[0][0])  # the three good steps were applied
    assert model.training is False


def test_mode_after_normal_exit_is_eval(tiny_model):
    model = mp.full_finetune(tiny_model).train()
    mp.train(model, small_task(), steps=2, device="cpu", progress=False)
    assert model.training is False and all(p.grad is None for p in model.parameters())


def test_train_step_refuses_a_nan_loss_before_the_optimiser(tiny_model):
    model = mp.full_finetune(tiny_model)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, y = mp.encode_batch(small_task().train[:4])
    with torch.no_grad():
        reference = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    before = [p.detach().clone() for p in params]
    loss = train_step(model, opt, x, y, params)
    torch.testing.assert_close(loss, reference.item(), atol=1e-6, rtol=1e-6)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # the step was applied
    model.head.weight.data[0, 0] = float("nan")
    after = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match="loss nan"):
        train_step(model, opt, x, y, params)
    for p, a in zip(params, after):
        assert torch.equal(p.detach().view(torch.uint8), a.view(torch.uint8))


# --- evaluate ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, name", [
    (dict(batch_size=0), ValueError, "batch_size"), (dict(batch_size="512"), TypeError, "batch_size"),
    (dict(batch_size=True), TypeError, "batch_size"), (dict(max_examples=0), ValueError, "max_examples"),
    (dict(max_examples=-5), ValueError, "max_examples"), (dict(max_examples=2.5), TypeError, "max_examples"),
    (dict(split="validation"), ValueError, "split"), (dict(split=None), ValueError, "split"),
])
def test_evaluate_bad_arguments(tiny_model, kwargs, error, name):
    before = snapshot(tiny_model.train())
    with pytest.raises(error, match=name):
        mp.evaluate(tiny_model, small_task(), **kwargs)
    assert_unchanged(tiny_model, before)


def test_evaluate_empty_split(tiny_model):
    with pytest.raises(ValueError, match="'val' split of task 'copy' is empty"):
        mp.evaluate(tiny_model, mp.Task("copy", ["copy:ab=ab."], [], 0))


def test_evaluate_test_split_where_the_task_has_one(tiny_model):
    task = small_task()
    if getattr(task, "test", None) is None:
        with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
            mp.evaluate(tiny_model, task, split="test")
    else:
        assert 0.0 <= mp.evaluate(tiny_model, task, split="test") <= 1.0


def test_evaluate_counts_exact_matches():
    """An oracle that predicts every next character right, except on the rows it is told to get wrong:
    the accuracy is the fraction of rows it gets right, whatever the batch size."""
    task = small_task()
    wrong = set(task.val[::3])  # 3 of the 8 validation texts

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

        def forward(self, x):  # (B, T) -> one-hot logits (B, T, vocab)
            logits = torch.zeros(*x.shape, mp.tokenizer.vocab_size)
            for b, row in enumerate(x):
                prompt = mp.tokenizer.decode(row.tolist())
                text = next(t for t in task.val if t[:-1] == prompt)
                for i, c in enumerate(text[1:]):
                    logits[b, i, mp.tokenizer.stoi["." if text in wrong and i >= text.index("=") else c]] = 1
            return logits

    for batch_size in (1, 3, 512):
        assert mp.evaluate(Oracle(), task, batch_size=batch_size) == pytest.approx(5 / 8)

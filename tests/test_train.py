import pytest
import torch

import minipeft as mp
from minipeft.train import lr_at


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
        mp.evaluate(tiny_model, mp.make_task("copy", n_train=8), split="test")
    with pytest.raises(ValueError, match="Task"):
        mp.evaluate(tiny_model, "copy")

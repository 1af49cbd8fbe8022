import torch

import minipeft as mp


def test_load_base_returns_independent_copies():
    a, b = mp.load_base(), mp.load_base()
    assert a is not b
    with torch.no_grad():
        a.head.weight.add_(1.0)
    assert not torch.equal(a.head.weight, b.head.weight)
    assert torch.equal(b.head.weight, mp.load_base().head.weight)


def test_base_solves_pretraining_and_not_downstream():
    """Validation splits of seed 0 were held out of pretraining (base.py draws its data with seed 0)."""
    base = mp.load_base()
    for name in mp.PRETRAIN_TASKS:
        assert mp.evaluate(base, mp.make_task(name, seed=0)) >= 0.95, name
    for name in mp.DOWNSTREAM_TASKS:
        assert mp.evaluate(base, mp.make_task(name, seed=0)) <= 0.05, name


def test_base_is_small_and_reported():
    from minipeft.base import BASE_DIR
    assert (BASE_DIR / "model.safetensors").stat().st_size < 10 * 2 ** 20
    report = mp.base_report()
    assert set(report["exact_match"]) == set(mp.PRETRAIN_TASKS + mp.DOWNSTREAM_TASKS)

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


# --- the family of smaller bases (notebook 12) ---------------------------------------------------------

import json

import pytest

from minipeft.base import BASE_DIR, FAMILY, FAMILY_DIR, PRETRAIN_RECIPE


def hand_count(c: dict) -> int:
    """Parameters of a GPT with config ``c``, counted by hand from the architecture (not from the code):
    per block four d x d projections with biases, the MLP d -> d_ff -> d with biases, two LayerNorms;
    token and position embeddings, the final LayerNorm and the untied head without bias."""
    d, f, L, V, T = c["d_model"], c["d_ff"], c["n_layer"], c["vocab_size"], c["block_size"]
    block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
    return L * block + V * d + T * d + 2 * d + V * d


def config_of(path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_hand_count_gives_the_shipped_bases_published_count():
    assert hand_count(config_of(BASE_DIR)) == 812_032  # the count in the shipped report


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_family_base_loads_and_has_the_count_of_its_config(name):
    path = FAMILY_DIR / name
    config, shipped = config_of(path), config_of(BASE_DIR)
    model = mp.load_base(path)
    assert sum(p.numel() for p in model.parameters()) == hand_count(config) == mp.base_report(path)["params"]
    assert {k: config[k] for k in FAMILY[name]} == FAMILY[name]
    assert config["d_ff"] == 4 * config["d_model"]
    # everything but the sizes is the shipped base's: the config and the pretraining recipe
    sizes = set(FAMILY[name])
    assert {k: v for k, v in config.items() if k not in sizes} == {k: v for k, v in shipped.items() if k not in sizes}
    assert mp.base_report(path)["recipe"] == mp.base_report(BASE_DIR)["recipe"] == PRETRAIN_RECIPE
    assert set(mp.base_report(path)["exact_match"]) == set(mp.PRETRAIN_TASKS + mp.DOWNSTREAM_TASKS)


def test_family_spans_at_least_30x_smallest_first_and_stays_small():
    counts = [hand_count(config_of(path)) for path in mp.family_bases().values()]
    assert counts == sorted(counts) and len(counts) >= 4
    assert counts[-1] / counts[0] >= 30
    assert mp.family_bases()[list(mp.family_bases())[-1]] == BASE_DIR  # the shipped base is the largest
    size = sum(f.stat().st_size for f in FAMILY_DIR.rglob("*") if f.is_file())
    assert size < 4 * 2 ** 20, f"data/family holds {size / 2 ** 20:.1f} MiB"


def test_load_base_names_the_missing_folder_and_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no base model at .*nowhere.*python -m minipeft pretrain`"):
        mp.load_base(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"pretrain --family"):
        mp.load_base(FAMILY_DIR / "d1_l1")
    with pytest.raises(ValueError, match="no family base 'd1_l1'"):
        mp.pretrain_family(["d1_l1"])


def test_pretrain_writes_a_base_of_the_given_size(tmp_path, monkeypatch):
    import minipeft.base
    small = lambda name, seed=0, n_train=None, n_test=500: mp.make_task(name, seed, n_train=64, n_val=32, n_test=n_test)
    monkeypatch.setattr(minipeft.base, "make_task", small)  # the same code path on small data (fast)
    report = mp.pretrain(tmp_path, progress=False, config=FAMILY["d32_l1"], steps=2, warmup=1)
    config = config_of(tmp_path)
    assert (config["d_model"], config["n_layer"], config["d_ff"]) == (32, 1, 128)
    assert report["params"] == hand_count(config) and report["recipe"] == {**PRETRAIN_RECIPE, "steps": 2, "warmup": 1}
    assert mp.base_report(tmp_path) == report

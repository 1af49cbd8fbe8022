"""The comparison on the protocol (rows on a tiny model, checked against evaluations made here), its
failure and stability rules, the lecture's table scored on hand-made measurements with known answers,
the CLI and the warm command's notebook list."""
import csv
import math
import os
from pathlib import Path

import pytest

import minipeft as mp
from minipeft import compare, report
from minipeft.__main__ import main, notebooks
from minipeft.memory import MemoryBreakdown
from minipeft.protocol import RunResult, Search
from minipeft.train import History


@pytest.fixture
def tiny_base(tiny_config, monkeypatch, tmp_path):
    """A tiny GPT in place of the shipped base, with the cache off (its key knows only the shipped base)."""
    monkeypatch.setenv("MINIPEFT_CACHE", "0")
    monkeypatch.setenv("MINIPEFT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compare, "load_base", lambda: mp.GPT(tiny_config))
    return lambda: mp.GPT(tiny_config)


TINY = dict(steps=2, seeds=3, eval_examples=8, forgetting_examples=4, max_widen=0)


def test_rows_on_a_tiny_model_report_the_test_split_of_n_seeds(tiny_base, tiny_config):
    config = compare.CompareConfig(methods=("full", "lora_qv"), **TINY)
    results = compare.run_comparison(config, base=tiny_base)
    task = mp.make_task("sortdesc", 0)
    assert [r.key for r in results] == ["full", "lora_qv"]
    for r in results:
        assert r.lr in r.setting.grid and set(r.search.runs) == set(r.setting.grid)  # 5 rates, chosen among them
        assert [run.seed for run in r.runs] == [0, 1, 2] and all(run.lr == r.lr for run in r.runs)
        build = r.setting.builder(tiny_base)
        for run in r.runs:   # the reported number is the test split, scored again here on the restored model
            assert run.test == mp.evaluate(run.restore(build), task, "test", max_examples=8)
        assert r.test.n == 3 and r.test.mean == pytest.approx(sum(run.test for run in r.runs) / 3)
    base = sum(p.numel() for p in mp.GPT(tiny_config).parameters())
    lora = 2 * 2 * (8 * 32 + 32 * 8)  # 2 layers x (q, v) x (A: r x d + B: d x r)
    full, lora_qv = results
    assert (full.trainable, full.total, full.percent) == (base, base, 100.0)
    assert (lora_qv.trainable, lora_qv.total) == (lora, base + lora)       # PEFT's: of the adapted model
    assert lora_qv.percent == pytest.approx(100 * lora / (base + lora), rel=1e-12)


def _run(seed, test, loss=0.1):
    return RunResult({"method": "x"}, seed, 1e-2, History(loss=[loss] * 10), test, test, 1.0, 10, 100)


def _result(key, tests, losses=None, trainable=10, total=100, memory=1000, pretrain=(0.9, 0.8)):
    runs = [_run(i, t, (losses or [0.1] * len(tests))[i]) for i, t in enumerate(tests)]
    m = MemoryBreakdown({"float32": memory}, 0, 0, 0, trainable)
    setting = compare.SETTINGS[key]
    return compare.MethodResult(setting, Search(setting.spec, 1e-2, {1e-2: runs[:1]}, runs, False),
                                [pretrain[0]] * len(tests), [pretrain[1]] * len(tests), trainable, total, m, m, 1, 0.01)


@pytest.mark.parametrize("tests,losses,failed,stable", [
    ([0.80, 0.80, 0.80], None, 0, True),
    ([0.80, 0.70, 0.30], None, 1, False),              # 0.3 < half the median 0.7
    ([0.80, 0.80, 0.80], [0.1, math.nan, 0.1], 1, False),
    ([0.80, 0.70, 0.90], None, 0, False),              # std 0.1 > 0.05
    ([0.011, 0.008, 0.014], None, 0, False),           # std 0.003 <= 0.05 but > 10 % of the mean 0.011
    ([0.0, 0.0, 0.0], None, 0, False),                 # nothing learned: no failed run, but not "stable"
])
def test_failed_runs_and_stability(tests, losses, failed, stable):
    r = _result("lora_qv", tests, losses)
    assert (r.failed, r.stable) == (failed, stable)


def test_forgetting_is_trained_against_untrained():
    r = _result("lora_qv", [0.5, 0.6, 0.7], pretrain=(0.9, 0.75))
    assert r.forgetting.mean == pytest.approx(0.15) and r.forgetting.n == 3


def _cells(results):
    return {(c.method, c.column): c for c in report.score_lecture(results)}


def test_lecture_table_scored_by_hand():
    full = _result("full", [0.90, 0.80, 1.00], trainable=1000, total=1000, memory=1000)
    # prompt: 0.5 % trainable, memory x0.10, accuracy x0.5 on every seed, unstable (10 % rule)
    prompt = _result("prompt", [0.45, 0.40, 0.50], trainable=5, total=1000, memory=100)
    # LoRA (q, v): 1.5 % trainable, memory x0.30, accuracy x0.95, x1.0, x0.9 of full's per seed
    lora = _result("lora_qv", [0.855, 0.80, 0.90], trainable=15, total=1000, memory=300)
    cells = _cells([full, prompt, lora])
    built = [c for c in cells.values() if c.verdict == "by construction"]
    assert {c.method for c in built} == {full.label} and len(built) == 5          # only full's, stability kept
    assert cells[full.label, "stability"].verdict == "differs"                    # std 0.1 > 0.05: unstable
    # trainable % on the toy model: prompt 0.5 % against "<0.1%" (fewer is better): worse -> differs
    assert cells[prompt.label, "trainable % (toy)"].verdict == "differs"
    assert cells[lora.label, "trainable % (toy)"].verdict == "agrees"             # 1.5 % in [0.05, 2]
    # Llama-2-7B, by hand: LoRA r=8 on q, v: 32 layers x 2 x 8 x (4096 + 4096) = 4,194,304 trainable of
    # 6,738,415,616 + 4,194,304 -> 0.0622 %; 20 prompt tokens x 4096 = 81,920 -> 0.00122 %
    assert cells[lora.label, "trainable % (7B)"].measured == "0.0622%"
    assert cells[prompt.label, "trainable % (7B)"].measured == "0.00122%"
    assert cells[prompt.label, "trainable % (7B)"].verdict == "agrees"
    # memory: prompt x0.10 in "Very Low" [0, 0.2): agrees; LoRA x0.30 against "Low" [0.2, 0.45): agrees
    assert cells[prompt.label, "memory (toy)"].verdict == "agrees"
    assert cells[lora.label, "memory (toy)"].measured == "x0.30"
    # performance: prompt x0.5 on each seed against "Moderate–Low" (< 0.6): agrees
    assert cells[prompt.label, "performance"].verdict == "agrees"
    # LoRA x0.95, x1.0, x0.9: mean 0.95, s = 0.05, half width 4.303 * 0.05 / sqrt(3) = 0.124 -> [0.826, 1.074]
    # crosses 0.9, the edge of "High": inconclusive
    assert cells[lora.label, "performance"].verdict == "inconclusive"
    assert cells[lora.label, "performance"].measured == "x0.95 [0.83, 1.07] n=3"
    # stability keeps its direction: "Unstable" claimed, unstable measured: agrees
    assert cells[prompt.label, "stability"].verdict == "agrees"


def test_direction_is_kept():
    full = _result("full", [0.8, 0.8, 0.8], trainable=1000, total=1000, memory=1000)
    cheap = _result("lora_qv", [0.8, 0.8, 0.8], trainable=15, total=1000, memory=100)      # x0.10 < "Low"
    heavy = _result("lora_all", [0.4, 0.4, 0.4], trainable=15, total=1000, memory=800)     # x0.80: "High"
    steady = _result("prompt", [0.5, 0.5, 0.5], trainable=1, total=1000, memory=100)       # stable, "Unstable" claimed
    cells = _cells([full, cheap, heavy, steady])
    assert cells[cheap.label, "memory (toy)"].verdict == "better than claimed"
    assert cells[heavy.label, "memory (toy)"].verdict == "differs"
    assert cells[heavy.label, "performance"].verdict == "differs"       # x0.5 exactly on every seed, below "High"
    assert cells[cheap.label, "performance"].verdict == "agrees"        # x1.0, n=3, no spread
    assert cells[steady.label, "stability"].verdict == "better than claimed"
    unstable = _result("lora_qv", [0.8, 0.5, 0.9], trainable=15, total=1000, memory=300)
    assert _cells([full, unstable])[unstable.label, "stability"].verdict == "differs"


@pytest.mark.parametrize("bins", [report.MEMORY, {k: v for k, v in report.PERFORMANCE.items() if k != "Strong"}])
def test_bins_do_not_overlap(bins):
    edges = sorted(bins.values())
    assert all(a[1] == b[0] for a, b in zip(edges, edges[1:]))  # each bin starts where the previous ends
    for x in [i / 100 for i in range(0, 150)]:
        assert sum(lo <= x < hi for lo, hi in bins.values()) == 1


def test_score_line_counts_testable_cells_only():
    full = _result("full", [0.8, 0.8, 0.8], trainable=1000, total=1000, memory=1000)
    cells = report.score_lecture([full, _result("lora_qv", [0.8, 0.8, 0.8], trainable=15, total=1000, memory=300)])
    # full: 5 by construction + stability (agrees); LoRA: 6 testable, all agree but its 7B memory (x0.18 by
    # the formula, below "Low")
    assert report.score_line(cells).startswith("6 of 7 testable cells agree (1 better than claimed, 0 differ, "
                                               "0 inconclusive")
    assert "5 cells true by construction excluded" in report.score_line(cells)


def test_cli_on_a_tiny_model_writes_the_report(tiny_base, tmp_path, capsys):
    out = tmp_path / "docs"
    code = main(["compare", "--quick", "--methods", "full", "lora_qv", "--steps", "1", "--seeds", "3",
                 "--eval-examples", "8", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.count("5 rates:") == 2 and "testable cells agree" in printed
    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == ["full", "lora_qv"] and all(r["n"] == "3" for r in table)
    assert all(len(r["search_val_by_lr"].split()) == 5 for r in table)
    md = (out / "comparison.md").read_text()
    assert "python -m minipeft compare --quick" in md and "Machine:" in md and "testable cells" in md
    assert (out / "comparison.png").stat().st_size > 0


def test_checkpoint_bytes_hold_the_trained_tensors():
    """LoRA r=8 on q and v: 4 layers x 2 x 8 x (128 + 128) = 16,384 fp32 numbers = 65,536 bytes + headers."""
    model = mp.add_lora(mp.load_base(), r=8)
    n = compare.checkpoint_bytes(model, "lora")
    assert 65_536 < n < 65_536 + 16_000


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown method"):
        compare.CompareConfig(methods=("dora",))
    with pytest.raises(ValueError, match="seeds"):
        compare.CompareConfig(seeds=0)
    with pytest.raises(ValueError, match="max_widen"):
        compare.CompareConfig(max_widen=-1)
    with pytest.raises(ValueError, match="unknown task"):
        compare.CompareConfig(task="nope")


def test_settings_follow_the_spec_convention_and_the_protocol():
    """{"method": registry key, **options} (+ "nf4": True), written as the chapter that teaches the method
    writes it (02 full, 03 prompt, 04 prefix, 05 adapters, 08 LoRA all / QLoRA, 11 LoRA q, v), so that
    the cache shares the runs; every grid has >= 5 increasing rates, about evenly spaced in log."""
    assert compare.SETTINGS["lora_all"].spec == {"method": "lora", "r": 8, "targets": "all-linear"}
    assert compare.SETTINGS["qlora"].spec == {"method": "lora", "r": 8, "targets": "all-linear", "nf4": True}
    assert compare.SETTINGS["full"].spec == {"method": "full"}
    assert compare.SETTINGS["prompt"].spec == {"method": "prompt", "n_tokens": 20, "init": "vocab"}
    assert compare.SETTINGS["prefix"].spec == {"method": "prefix", "n_prefix": 10, "reparam": True}
    assert compare.SETTINGS["adapter"].spec == {"method": "adapter", "bottleneck": 16, "placement": "houlsby"}
    assert compare.SETTINGS["lora_qv"].spec == {"method": "lora", "r": 8}
    assert compare.CompareConfig().steps == 200 and compare.CompareConfig().batch_size == 32
    for s in compare.SETTINGS.values():
        g = s.grid
        mean_ratio = (g[-1] / g[0]) ** (1 / (len(g) - 1))
        assert len(g) >= 5 and all(b / a == pytest.approx(mean_ratio, rel=0.1) for a, b in zip(g, g[1:])), s.key


def test_readme_carries_the_stored_table():
    """The README's table is the one ``python -m minipeft compare --out docs`` wrote, row for row."""
    root = Path(__file__).resolve().parents[1]
    md = (root / "docs" / "comparison.md").read_text().split("\n\n")[0]
    table = [line for line in md.splitlines() if line.startswith("|")]
    readme = (root / "README.md").read_text()
    assert len(table) == 2 + len(compare.SETTINGS)
    assert all(line in readme.splitlines() for line in table)


def test_every_row_is_a_method_of_the_registry():
    """The table's rows are settings of the registry's methods: no method is defined twice."""
    assert {s.method for s in compare.SETTINGS.values()} <= set(mp.METHODS)
    for s in compare.SETTINGS.values():
        model = s.build(0)
        assert s.method in (mp.methods_in(model) or {"full": None})


def test_warm_runs_every_notebook_in_order():
    folder = Path(__file__).resolve().parents[1] / "notebooks"
    numbered = [f for f in os.listdir(folder) if f.endswith(".ipynb") and f[:2].isdigit() and f[2] == "_"]
    names = [p.name for p in notebooks()]
    assert names == sorted(numbered) and len(names) >= 10
    assert [n[:3] for n in names] == [f"{i:02d}_" for i in range(1, len(names) + 1)]   # 01_, 02_, ... in order

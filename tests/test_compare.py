"""The comparison runner: the CLI on a tiny budget, the table's columns and its failure rule."""
import csv
from pathlib import Path

import pytest

import minipeft as mp
from minipeft import compare, report
from minipeft.__main__ import main
from minipeft.memory import MemoryBreakdown


def test_cli_quick_tiny_budget_gives_one_row_per_method(tmp_path, capsys):
    # smaller than --quick, for testing efficiency: 2 steps per run, 1 per sweep point, 2 seeds, 16 examples
    code = main(["compare", "--quick", "--steps", "2", "--sweep-steps", "1", "--seeds", "2", "--eval-examples", "16",
                 "--out", str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert len(rows) == len(compare.SETTINGS)
    for method in compare.SETTINGS.values():
        assert sum(line.startswith(f"| {method.label} |") for line in rows) == 1
    with (tmp_path / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == list(compare.SETTINGS)
    assert all(len(r["accuracies"].split()) == 2 for r in table)
    # full fine-tuning changes the base in every run; every PEFT method leaves it bit-for-bit as it was
    assert {r["key"]: r["base_unchanged"] for r in table} == {k: "0" if k == "full" else "2" for k in compare.SETTINGS}
    md = (tmp_path / "comparison.md").read_text()
    assert "python -m minipeft compare --quick" in md and "Machine:" in md
    assert (tmp_path / "comparison.png").stat().st_size > 0


def _result(accuracies, losses=None, trainable=100):
    m = MemoryBreakdown({"float32": 400}, 400, 800, 1000, trainable)
    return compare.MethodResult("k", "label", 1e-3, {1e-3: (0.5, 0.1)}, accuracies, losses or [0.1] * len(accuracies),
                                [0.0] * len(accuracies), [True] * len(accuracies), trainable, 1000, m, m, 123, 0.01)


@pytest.mark.parametrize("accuracies,losses,failed", [
    ([0.8, 0.8, 0.8], None, 0),
    ([0.8, 0.7, 0.3], None, 1),               # 0.3 < half the median 0.7
    ([0.8, 0.8, 0.8], [0.1, float("nan"), 0.1], 1),
    ([0.0, 0.0], None, 0),                    # nothing learned is not "unstable"
])
def test_failed_runs(accuracies, losses, failed):
    assert _result(accuracies, losses).failed == failed


def test_table_row_by_hand():
    row = report.table_rows([_result([0.5, 0.7])])[0]
    assert row["accuracy"] == "0.600 ± 0.141"          # stdev of (0.5, 0.7) = 0.1414
    assert row["trainable %"] == "10"                  # 100 / 1000
    assert row["train memory (MB)"] == f"{2600 / 2 ** 20:.1f}"
    assert row["failed runs"] == "0/2"
    assert row["base unchanged"] == "2/2"
    table = report.markdown_table([_result([0.5]), _result([0.6])])
    assert len(table.splitlines()) == 4 and table.splitlines()[0].count("|") == len(report.COLUMNS) + 1


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
    with pytest.raises(ValueError, match="unknown task"):
        compare.CompareConfig(task="nope")


def test_readme_carries_the_stored_table():
    """The README's table is the one ``python -m minipeft compare --out docs`` wrote, row for row."""
    root = Path(__file__).resolve().parents[1]
    table = [line for line in (root / "docs" / "comparison.md").read_text().splitlines() if line.startswith("|")]
    readme = (root / "README.md").read_text()
    assert len(table) == 2 + len(compare.SETTINGS)
    assert all(line in readme.splitlines() for line in table)


def test_every_row_is_a_method_of_the_registry():
    """The table's rows are settings of the registry's methods: no method is defined twice."""
    assert {s.method for s in compare.SETTINGS.values()} <= set(mp.METHODS)
    for s in compare.SETTINGS.values():
        model = s.apply(mp.load_base(), seed=0)
        assert s.method in (mp.methods_in(model) or {"full": None})

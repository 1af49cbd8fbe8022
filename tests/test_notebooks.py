"""The notebooks as stored: valid, executed top to bottom, no error in any output.

(nbval runs them; this checks what a reader sees on GitHub or a course site without running them.)
"""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_clean(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, "no code cells"
    counts = [c.get("execution_count") for c in code]
    assert None not in counts, "some code cells were never executed: store the outputs of a full run"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), "cells were not run top to bottom once"
    for i, cell in enumerate(code):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"code cell {i} stores an error: {out.get('ename')}"
            text = "".join(out.get("text", "")) if out["output_type"] == "stream" else ""
            assert "Traceback" not in text, f"code cell {i} stores a traceback"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_opens_with_versions_and_a_title(path):
    nb = json.loads(path.read_text())
    first_md = next(c for c in nb["cells"] if c["cell_type"] == "markdown")
    assert "".join(first_md["source"]).lstrip().startswith("# ")
    first_code = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    assert "torch.__version__" in first_code and "QUICK" in first_code


# nbval compares the output of a "# NBVAL_CHECK_OUTPUT" cell character by character, so such a cell may print
# only what is the same on every CPU and thread count (counts, shapes, code books, seeded draws): never the
# result of training, evaluation, a measurement or a clock, whose last digits move with the summation order
MEASURED = re.compile(r"\b(train|train_step|run|lr_search|evaluate|exact_match|token_accuracy|solve|measure_memory|"
                      r"perf_counter|monotonic|time\.time)\s*\(")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_compared_cells_print_nothing_that_depends_on_the_cpu(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        source = "".join(cell["source"])
        if cell["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" in source:
            assert not MEASURED.search(source), f"cell {i} is compared by nbval but runs {MEASURED.search(source)[0]}"


def test_the_measured_pattern_catches_a_training_cell():
    assert MEASURED.search("history = mp.train(model, task, steps=10)")
    assert MEASURED.search("acc = mp.evaluate(model, task)") and MEASURED.search("t0 = time.perf_counter()")
    assert MEASURED.search("r = mp.run(spec, build, task, seed=0, lr=1e-2, steps=300)")
    assert MEASURED.search("search = mp.lr_search(spec, build, task, grid=grid, steps=300)")
    assert not MEASURED.search("mp.print_trainable_parameters(model)")  # counts are exact


CHAPTERS = [p for p in NOTEBOOKS if p.name[:2].isdigit()]  # the numbered chapters


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_ends_with_exercises_and_hidden_solutions(path):
    """3-5 exercises; each closed one has a hidden solution cell (tagged "solution") that CI runs."""
    nb = json.loads(path.read_text())
    titles = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"]
    assert any(re.search(r"^#+ Exercises", t, re.M) for t in titles), "no 'Exercises' section"
    solutions = [c for c in nb["cells"] if c["cell_type"] == "code"
                 and "".join(c["source"]).lstrip().startswith("# Solution")]
    assert 3 <= len(solutions) <= 5, f"{len(solutions)} solution cells"
    for c in solutions:
        assert c["metadata"].get("jupyter", {}).get("source_hidden") and "solution" in c["metadata"].get("tags", []), \
            "a solution cell is not hidden and tagged 'solution'"

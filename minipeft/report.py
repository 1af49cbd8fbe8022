"""The comparison's report: the table with intervals, the lecture's table scored, the forgetting plot, and
the ``compare`` command that writes them (``python -m minipeft compare --out docs``).

:mod:`minipeft.compare` runs the experiments and returns :class:`~minipeft.compare.MethodResult` s; this
module only judges and shows them.
"""
from __future__ import annotations

import csv
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .compare import FAILED_RULE, STABLE_RULE, CompareConfig, MethodResult, run_comparison
from .memory_formula import predict_memory
from .presets import PRESETS
from .protocol import paired, summary, verdict
from .tasks import PRETRAIN_TASKS

# --- the measured table ---------------------------------------------------------------------------

COLUMNS = ("method", "trainable params", "trainable %", "train memory (MiB)", "test exact match", "failed runs",
           "stable", "pretraining exact match: untrained → trained", "checkpoint (kB)", "step time (ms)", "lr")


def table_rows(results: list[MethodResult]) -> list[dict]:
    """One dict per method with the table's columns, as printed."""
    rows = []
    for r in results:
        t, f = r.test, r.forgetting
        rows.append({
            "method": r.label,
            "trainable params": f"{r.trainable:,}",
            "trainable %": f"{r.percent:.3g}",
            "train memory (MiB)": f"{r.memory.total / 2 ** 20:.1f}",
            "test exact match": f"{t.mean:.3f} ± {t.std:.3f} [{t.lo:.3f}, {t.hi:.3f}] n={t.n}" if t.n > 1
                                else f"{t.mean:.3f} (n=1)",
            "failed runs": f"{r.failed}/{len(r.runs)}",
            "stable": "yes" if r.stable else "no",
            "pretraining exact match: untrained → trained":
                f"{summary(r.untrained_pretrain).mean:.3f} → {summary(r.trained_pretrain).mean:.3f} "
                f"(lost {f.mean:+.3f}" + (f" [{f.lo:+.3f}, {f.hi:+.3f}])" if f.n > 1 else ")"),
            "checkpoint (kB)": f"{r.checkpoint_bytes / 1000:,.1f}",
            "step time (ms)": f"{1000 * r.step_time:.1f}",
            "lr": f"{r.lr:g}" + (" (edge)" if r.search.at_edge else ""),
        })
    return rows


def markdown(rows: list[dict], columns=None) -> str:
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows])


def markdown_table(results: list[MethodResult]) -> str:
    return markdown(table_rows(results), COLUMNS)


def grids(results: list[MethodResult]) -> str:
    """Each method's learning-rate search: val exact match at every rate, the chosen one in brackets."""
    lines = []
    for r in results:
        points = "  ".join((f"[{lr:g}: {rs[0].val:.3f}]" if lr == r.lr else f"{lr:g}: {rs[0].val:.3f}")
                           + ("(diverged)" if not math.isfinite(rs[0].final_loss) else "")
                           for lr, rs in r.search.runs.items())
        edge = "  (still at the edge)" if r.search.at_edge else ""
        lines.append(f"{r.label:30s} {len(r.search.runs)} rates: {points}{edge}")
    return "\n".join(lines)


COMPETITIVE_RULE = ("competitive with full fine-tuning: the 95 % interval of (method - full), paired by seed "
                    "on test exact match, lies wholly above -0.05 (agrees); wholly below -0.05: differs; "
                    "across -0.05: inconclusive")


def competitive(results: list[MethodResult]) -> list[str]:
    """One line per PEFT method against full fine-tuning: the paired difference and its verdict."""
    full = next(r for r in results if r.key == "full")
    lines = []
    for r in results:
        if r.key != "full":
            p = paired(r.accuracies, full.accuracies, (r.key, "full"))
            lines.append(f"{verdict(p.difference, (-0.05, math.inf)):12s} | {r.label} vs full: {p}")
    return lines


# --- the lecture's table, scored --------------------------------------------------------------------

LECTURE = {  # lecture notes, "Empirical Comparison of Fine-tuning Methods"
    "full": ("100%", "High", "Strong", "Stable"),
    "prompt": ("<0.1%", "Very Low", "Moderate–Low", "Unstable (small models)"),
    "prefix": ("~1–2%", "Low", "Moderate–High", "Stable"),
    "adapter": ("~1–5%", "Moderate", "High", "Stable"),
    "lora": ("~0.1–1%", "Low", "High", "Stable"),
}
ROW = {"full": "full", "prompt": "prompt", "prefix": "prefix", "adapter": "adapter", "lora_qv": "lora",
       "lora_all": "lora", "qlora": "lora"}  # the lecture has no QLoRA row: QLoRA is LoRA on a 4-bit base
PARAMS = {"100%": (100, 100), "<0.1%": (0, 0.1), "~1–2%": (0.5, 4), "~1–5%": (0.5, 10), "~0.1–1%": (0.05, 2)}
MEMORY = {"Very Low": (0, 0.2), "Low": (0.2, 0.45), "Moderate": (0.45, 0.75), "High": (0.75, math.inf)}
PERFORMANCE = {"Moderate–Low": (-math.inf, 0.6), "Moderate–High": (0.6, 0.9), "High": (0.9, math.inf),
               "Strong": (0.9, math.inf)}
RULES = (
    "trainable %: PEFT's (trainable / all parameters of the adapted model), on the toy model and, by the "
    "formula, Llama-2-7B; '<b%' is [0, b], '~a–b%' is [a/2, 2b]; fewer is better",
    "memory: one training step's total divided by full fine-tuning's (toy: measured, batch 32; Llama-2-7B: "
    "formula, bf16, batch 4 x 512); bins Very Low [0, 0.2), Low [0.2, 0.45), Moderate [0.45, 0.75), "
    "High >= 0.75; less is better",
    "performance: test exact match divided by full fine-tuning's, per seed (95 % interval over seeds); bins "
    "Moderate–Low < 0.6, Moderate–High [0.6, 0.9), High and Strong >= 0.9; more is better",
    f"stability: {STABLE_RULE} ({FAILED_RULE}); stable where 'Unstable' was claimed is better than claimed",
    "full fine-tuning's trainable %, memory and performance are 100 %, x1 and x1 by construction: excluded",
    "verdict against a range: agrees inside it; better than claimed / differs wholly on the better / worse "
    "side; inconclusive across an edge",
)


@dataclass
class Cell:
    method: str
    column: str
    claimed: str
    measured: str          # the value that decided the verdict
    verdict: str           # agrees, better than claimed, differs, inconclusive, or "by construction"


def score_lecture(results: list[MethodResult], preset: str = "Llama-2-7B", batch: int = 4, seq: int = 512) -> list[Cell]:
    """Every cell of the lecture's table, judged from ``results`` by :data:`RULES`."""
    res = {r.key: r for r in results}
    full = res["full"]
    full_7b = predict_memory(preset, "full", batch, seq, base_dtype="bf16")
    n7 = PRESETS[preset].n_params()
    cells = []
    for key, r in res.items():
        params, memory, perf, stable = LECTURE[ROW[key]]
        add = lambda column, claimed, measured, word: cells.append(Cell(r.label, column, claimed, measured, word))
        if key == "full":
            for column, claimed in (("trainable % (toy)", params), ("trainable % (7B)", params),
                                    ("memory (toy)", memory), ("memory (7B)", memory), ("performance", perf)):
                add(column, claimed, "the reference itself", "by construction")
        else:
            name, options = r.setting.formula
            p7 = predict_memory(preset, name, batch, seq, base_dtype="nf4" if name == "qlora" else "bf16", **options)
            pct7 = 100 * p7.trainable / (n7 + p7.trainable)  # PEFT's: of the adapted model
            add("trainable % (toy)", params, f"{r.percent:.3g}%", verdict(r.percent, PARAMS[params], False))
            add("trainable % (7B)", params, f"{pct7:.3g}%", verdict(pct7, PARAMS[params], False))
            for column, ratio in (("memory (toy)", r.memory.total / full.memory.total),
                                  ("memory (7B)", p7.total / full_7b.total)):
                add(column, memory, f"x{ratio:.2f}", verdict(ratio, MEMORY[memory], False))
            if all(f > 0 for f in full.accuracies):
                s = summary([a / f for a, f in zip(r.accuracies, full.accuracies)])
                shown = f"x{s.mean:.2f} [{s.lo:.2f}, {s.hi:.2f}] n={s.n}" if s.n > 1 else f"x{s.mean:.2f} (n=1)"
                add("performance", perf, shown, verdict(s, PERFORMANCE[perf]))
            else:
                add("performance", perf, "full fine-tuning scored 0", "inconclusive")
        claimed_stable = stable == "Stable"
        word = "agrees" if r.stable == claimed_stable else ("differs" if claimed_stable else "better than claimed")
        add("stability", stable, f"{'stable' if r.stable else 'unstable'} (std {r.std:.3f}, "
                                 f"{r.failed}/{len(r.runs)} failed)", word)
    return cells


def score_line(cells: list[Cell]) -> str:
    """``k of n testable cells agree`` with the other verdicts counted."""
    testable = [c for c in cells if c.verdict != "by construction"]
    count = lambda word: sum(c.verdict == word for c in testable)
    return (f"{count('agrees')} of {len(testable)} testable cells agree ({count('better than claimed')} better "
            f"than claimed, {count('differs')} differ, {count('inconclusive')} inconclusive; "
            f"{len(cells) - len(testable)} cells true by construction excluded)")


def lecture_table(cells: list[Cell]) -> str:
    """The scored lecture table as markdown: one row per method, each cell 'claimed / measured: verdict'."""
    columns = list(dict.fromkeys(c.column for c in cells))
    rows = {}
    for c in cells:
        rows.setdefault(c.method, {"method": c.method})[c.column] = f"{c.claimed} / {c.measured}: **{c.verdict}**"
    return markdown([{col: row.get(col, "") for col in ["method", *columns]} for row in rows.values()])


# --- forgetting along training -----------------------------------------------------------------------

def plot_forgetting(curves: dict, labels: dict[str, str], task: str, ax=None):
    """New-task exact match against mean pretraining exact match along training, one line per run (its
    ``.track``): the untrained method is the hollow circle, the end of training the filled one."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.5, 4.5))
    for key, r in curves.items():
        old = [sum(vals) / len(PRETRAIN_TASKS) for vals in zip(*(r.track[t] for t in PRETRAIN_TASKS))]
        new = r.track[task]
        line, = ax.plot(old, new, "-", marker=".", label=f"{labels[key]} (lr {r.lr:g})")
        ax.plot(old[0], new[0], "o", mfc="none", color=line.get_color(), ms=9)
        ax.plot(old[-1], new[-1], "o", color=line.get_color(), ms=7)
    ax.set(xlabel=f"pretraining tasks ({', '.join(PRETRAIN_TASKS)}): mean exact match", ylabel=f"{task}: exact match",
           title="learning vs forgetting along training (hollow: untrained, filled: end)")
    ax.legend(fontsize=8)
    return fig


# --- the command ---------------------------------------------------------------------------------------

def machine() -> str:
    """One line describing where the numbers were measured."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    return (f"{device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, {platform.system()}")


def notes(config: CompareConfig) -> str:
    return (f"Task `{config.task}`, {config.steps} steps of batch {config.batch_size} per run; per method the "
            f"learning rate searched at that budget on a log grid of at least 5 rates (widened at an edge, at most "
            f"{config.max_widen} steps), chosen on val (seed 0), then {config.seeds} seeds at the chosen rate, "
            f"reported on test: mean ± sample std [95 % t-interval] n. Failed runs: {FAILED_RULE}; {STABLE_RULE}. "
            f"Memory: one measured training step (weights + gradients + AdamW state + activations) at batch "
            f"{config.batch_size}. Pretraining exact match: mean over {', '.join(PRETRAIN_TASKS)} "
            f"({config.forgetting_examples} val examples each) with the method switched on, untrained (same seed) "
            f"and trained; 'lost' is the drop that training caused, with its 95 % interval. Every PEFT method "
            f"leaves the base bit for bit (tests/test_methods.py), so switched off it forgets nothing.")


def write_outputs(results: list[MethodResult], out_dir, config: CompareConfig, command: str,
                  seconds: float) -> dict[str, Path]:
    """Write ``comparison.md`` (tables, rules, command, machine), ``comparison.csv`` and ``comparison.png``."""
    from .plots import plot_comparison
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "comparison.md", "csv": out / "comparison.csv", "png": out / "comparison.png"}
    judged = "full" in {r.key for r in results}
    cells = score_lecture(results) if judged else []
    paths["md"].write_text(
        f"{markdown_table(results)}\n\n{notes(config)}\n\nLearning-rate searches (val exact match, seed 0; "
        f"chosen in brackets):\n\n```\n{grids(results)}\n```\n\n"
        + (f"{COMPETITIVE_RULE}:\n\n```\n" + "\n".join(competitive(results))
           + f"\n```\n\n### The lecture's table, scored\n\n{lecture_table(cells)}\n\n**{score_line(cells)}.**\n\n"
           "Rules:\n\n" + "".join(f"* {rule}\n" for rule in RULES) if judged else "")
        + f"\nCommand: `{command}`  \nMachine: {machine()}  \nWall time: {seconds / 60:.1f} min\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "key", "spec", "trainable", "total", "trainable_percent", "memory_bytes",
                         "predicted_memory_bytes", "test_mean", "test_std", "test_lo", "test_hi", "n", "test_by_seed",
                         "failed", "stable", "pretrain_untrained", "pretrain_trained", "forgetting_mean",
                         "checkpoint_bytes", "step_time_s", "lr", "lr_at_edge", "search_val_by_lr"])
        for r in results:
            t = r.test
            writer.writerow([r.label, r.key, r.setting.spec, r.trainable, r.total, f"{r.percent:.4f}", r.memory.total,
                             r.predicted.total, f"{t.mean:.4f}", f"{r.std:.4f}", f"{t.lo:.4f}", f"{t.hi:.4f}", t.n,
                             " ".join(f"{a:.4f}" for a in r.accuracies), r.failed, r.stable,
                             " ".join(f"{a:.4f}" for a in r.untrained_pretrain),
                             " ".join(f"{a:.4f}" for a in r.trained_pretrain), f"{r.forgetting.mean:.4f}",
                             r.checkpoint_bytes, f"{r.step_time:.5f}", r.lr, r.search.at_edge,
                             " ".join(f"{k:g}:{rs[0].val:.3f}" for k, rs in r.search.runs.items())])
    fig = plot_comparison(results)
    fig.savefig(paths["png"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths


def print_report(results: list[MethodResult]) -> None:
    """What the command prints (and notebook 09 shows): searches, table, competitiveness, the scored lecture table."""
    print("learning-rate searches (val exact match, seed 0; chosen in brackets):\n" + grids(results))
    print("\n" + markdown_table(results))
    if "full" not in {r.key for r in results}:
        return  # the rest is judged against full fine-tuning
    print(f"\n{COMPETITIVE_RULE}:\n" + "\n".join(competitive(results)))
    cells = score_lecture(results)
    print("\nthe lecture's table, scored:\n" + lecture_table(cells) + "\n" + score_line(cells))


def main(args, argv=None) -> int:
    """The ``compare`` subcommand (arguments parsed in ``minipeft/__main__.py``)."""
    overrides = {k: v for k, v in dict(seeds=args.seeds, device=args.device, steps=args.steps, task=args.task,
                                       eval_examples=args.eval_examples, forgetting_examples=args.eval_examples,
                                       methods=tuple(args.methods) if args.methods else None).items()
                 if v is not None}
    config = CompareConfig.quick(**overrides) if args.quick else CompareConfig(**overrides)
    t0 = time.perf_counter()
    results = run_comparison(config)
    seconds = time.perf_counter() - t0
    print_report(results)
    print(f"\n{len(results)} methods in {seconds / 60:.1f} min on {machine()}")
    if args.out:
        command = "python -m minipeft " + " ".join(sys.argv[1:] if argv is None else argv)
        paths = write_outputs(results, args.out, config, command, seconds)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

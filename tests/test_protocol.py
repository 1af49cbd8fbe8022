"""The experiment protocol against independent references: hand-worked intervals, published t quantiles,
a Monte-Carlo coverage check, synthetic objectives with a known best, synthetic pairs with a known answer."""
import math
import random
import statistics

import pytest
import torch

import minipeft as mp
from minipeft import protocol as P
from minipeft.tasks import encode_batch, exact_match


# --- summary and the t-interval ------------------------------------------------------------------

def test_interval_hand_worked_n3():
    """x = 0.8, 0.9, 1.0: mean 0.9; squared deviations 0.01 + 0 + 0.01 = 0.02; s^2 = 0.02 / 2 = 0.01, s = 0.1;
    t_{0.975, 2} = 4.303 (table); half width 4.303 * 0.1 / sqrt(3) = 0.43030 / 1.73205 = 0.248434."""
    s = P.summary([0.8, 0.9, 1.0])
    assert s.n == 3
    assert s.mean == pytest.approx(0.9, abs=1e-12) and s.std == pytest.approx(0.1, abs=1e-12)
    assert s.lo == pytest.approx(0.9 - 0.248434, abs=1e-6) and s.hi == pytest.approx(0.9 + 0.248434, abs=1e-6)


def test_interval_hand_worked_n4():
    """x = 2, 4, 4, 6: mean 4; squared deviations 4 + 0 + 0 + 4 = 8; s^2 = 8 / 3, s = 1.632993;
    t_{0.975, 3} = 3.182; half width 3.182 * 1.632993 / 2 = 2.598092."""
    s = P.summary([2, 4, 4, 6])
    assert s.std == pytest.approx(1.632993, abs=1e-6)
    assert (s.lo, s.hi) == (pytest.approx(4 - 2.598092, abs=1e-5), pytest.approx(4 + 2.598092, abs=1e-5))


def test_std_is_the_sample_std():
    xs = [random.Random(1).random() for _ in range(7)]
    assert P.summary(xs).std == pytest.approx(statistics.stdev(xs), rel=1e-12)  # ddof = 1


def test_one_value_has_no_interval_and_bad_values_are_refused():
    s = P.summary([0.5])
    assert s.mean == 0.5 and math.isnan(s.std) and (s.lo, s.hi) == (-math.inf, math.inf)
    for bad in ([], [0.1, math.nan]):
        with pytest.raises(ValueError, match="finite numbers"):
            P.summary(bad)


@pytest.mark.parametrize("df, published", [(31, 2.040), (40, 2.021), (50, 2.009), (60, 2.000), (80, 1.990),
                                           (100, 1.984), (10**6, 1.960)])
def test_t_quantile_beyond_the_table_matches_published_values(df, published):
    # NIST/SEMATECH e-Handbook, table 1.3.6.7.2 (3 decimals): the expansion must round to them
    assert abs(P.t975(df) - published) <= 0.0006


def test_t_table_is_decreasing_and_joins_the_expansion():
    ts = [P.t975(df) for df in range(1, 60)]
    assert all(a > b for a, b in zip(ts, ts[1:]))
    assert P.t975(30) - P.t975(31) < 0.005
    with pytest.raises(ValueError, match="df"):
        P.t975(0)


def test_interval_covers_the_true_mean_95_percent_of_the_time():
    # Monte Carlo, independent of the table: normal samples of n = 4, 4000 intervals
    rng = random.Random(0)
    hits = 0
    for _ in range(4000):
        s = P.summary([rng.gauss(1.0, 2.0) for _ in range(4)])
        hits += s.lo <= 1.0 <= s.hi
    assert 0.935 <= hits / 4000 <= 0.965  # 95 % +- 4.6 binomial standard errors; a z-interval gives ~0.86


# --- the paired comparison ------------------------------------------------------------------------

def test_paired_clear_difference_either_way():
    rng = random.Random(0)
    b = [0.5 + 0.2 * rng.random() for _ in range(5)]
    a = [x + 0.1 + rng.gauss(0, 0.01) for x in b]  # A is 0.1 better on every seed, up to small noise
    p = P.paired(a, b, names=("LoRA", "full"))
    assert p.verdict == "LoRA better" and p.n == 5
    assert p.difference.lo < 0.1 < p.difference.hi and p.difference.lo > 0
    assert P.paired(b, a).verdict == "B better"
    assert P.paired(a, b).verdict == "A better"


def test_paired_identical_and_noise_only():
    a = [0.7, 0.8, 0.75, 0.9]
    p = P.paired(a, list(a))
    assert p.verdict == "no measurable difference at this n"
    assert (p.difference.mean, p.difference.lo, p.difference.hi) == (0.0, 0.0, 0.0)
    rng = random.Random(3)
    b = [x + rng.gauss(0, 0.2) for x in a]
    b[0] = a[0] + 0.1; b[1] = a[1] - 0.1  # differences of both signs
    assert P.paired(a, b).verdict == "no measurable difference at this n"


def test_paired_hand_worked_all_positive_but_not_measurable():
    """d = 1, 2, 3: mean 2, s = 1, half width 4.303 / sqrt(3) = 2.4843 > 2: the interval holds 0, so three
    seeds that all favour A are not yet a measurable difference."""
    p = P.paired([1, 2, 3], [0, 0, 0])
    assert p.verdict == "no measurable difference at this n"
    assert p.difference.lo == pytest.approx(2 - 2.484338, abs=1e-5)
    with pytest.raises(ValueError, match="paired"):
        P.paired([1, 2], [1])


# --- verdicts ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("measured, claimed, higher, word", [
    ((0.92, 0.97), (0.9, 1.0), True, "agrees"),
    (0.5, (0.0, 1.0), None, "agrees"),                      # an exact number (a parameter count)
    ((0.5, 0.7), (0.9, 1.0), True, "differs"),
    ((0.5, 0.7), (0.0, 0.3), True, "better than claimed"),
    ((0.5, 0.7), (0.9, 1.0), False, "better than claimed"),  # lower is better (a loss, memory)
    ((0.5, 0.7), (0.0, 0.3), None, "differs"),
    ((0.85, 0.95), (0.9, 1.0), True, "inconclusive"),
    ((0.0, 2.0), (0.9, 1.0), True, "inconclusive"),
    ((0.02, 0.05), (-math.inf, 0.1), False, "agrees"),      # a one-sided claim, "< 0.1"
])
def test_verdict_rule(measured, claimed, higher, word):
    assert P.verdict(measured, claimed, higher) == word


def test_verdict_of_a_summary_and_the_printed_line(capsys):
    s = P.summary([0.8, 0.9, 1.0])  # 95 % CI 0.652 to 1.148
    assert P.verdict(s, (0.5, 2.0)) == "agrees"
    assert P.verdict(s, (0.9, 1.0)) == "inconclusive"
    assert P.print_verdict("LoRA reaches 0.9", s, (0.9, 1.0)) == "inconclusive"
    line = capsys.readouterr().out
    assert line.startswith("verdict: inconclusive | LoRA reaches 0.9 | measured 0.900") and "rule:" in line
    with pytest.raises(ValueError, match="lo <= hi"):
        P.verdict((1.0, 0.0), (0.0, 1.0))


def test_a_printed_verdict_shows_a_number_to_4_digits_not_its_float_noise(capsys):
    P.print_verdict("differs by 0", 0.2 - 0.201, (-0.01, 0.01))        # -0.0010000000000000009 in binary
    P.print_verdict("an interval", (0.1 + 0.2, 1 / 3), (0.0, 1.0))
    P.print_verdict("a count", 3072, (0, 10_000))
    out = capsys.readouterr().out.splitlines()
    assert "| measured -0.001 |" in out[0] and "| measured (0.3, 0.3333) |" in out[1]
    assert "| measured 3072 |" in out[2]


# --- the grid search ---------------------------------------------------------------------------------

def test_log_grid():
    assert P.log_grid(1e-3, 1e-1) == [0.001, 0.00316, 0.01, 0.0316, 0.1]
    with pytest.raises(ValueError):
        P.log_grid(1e-1, 1e-3)


def test_grid_widens_up_to_an_off_grid_best():
    best = 0.3  # above the grid: the search must walk up until the best point is inside
    calls = []

    def score(lr):
        calls.append(lr)
        return -(math.log10(lr) - math.log10(best)) ** 2

    grid = P.log_grid(1e-4, 1e-2)                    # ratio sqrt(10)
    scores, chosen, at_edge = P.grid_search(grid, score)
    added = sorted(set(scores) - set(grid))
    assert added == [0.0316, 0.1, 0.316, 1.0]       # one grid step (x sqrt(10)) at a time
    assert chosen == 0.316 and not at_edge
    assert len(calls) == len(set(calls)) == 9       # every point scored once


def test_grid_widens_down_and_stops_at_the_cap():
    scores, chosen, at_edge = P.grid_search([1, 2, 4, 8, 16], lambda lr: -lr)  # best: as low as possible
    assert sorted(scores)[:3] == [1 / 16, 1 / 8, 1 / 4] and len(scores) == 9   # 4 widenings (the cap)
    assert chosen == 1 / 16 and at_edge
    scores, chosen, at_edge = P.grid_search([1, 2, 4, 8, 16], lambda lr: -lr, max_widen=0)
    assert len(scores) == 5 and chosen == 1 and at_edge


def test_grid_needs_five_increasing_points():
    for bad in ([1, 2, 3, 4], [1, 2, 2, 3, 4], [0, 1, 2, 3, 4]):
        with pytest.raises(ValueError, match="at least 5 increasing"):
            P.grid_search(bad, lambda lr: 0)


# --- runs on a tiny GPT ------------------------------------------------------------------------------

@pytest.fixture
def tiny_task():
    return mp.make_task("rotate", seed=0, n_train=64, n_val=32, n_test=32)


def _builder(config, calls=None):
    def build():
        if calls is not None:
            calls.append(1)
        return mp.full_finetune(mp.GPT(config))
    return build


ARGS = dict(steps=4, batch_size=8, device="cpu", eval_examples=32, cache=False)


def test_run_equals_train_then_evaluate_by_hand(tiny_config, tiny_task):
    r = P.run({"method": "full"}, _builder(tiny_config), tiny_task, seed=1, lr=3e-3, keep_tensors=True, **ARGS)
    torch.manual_seed(1)
    model = mp.GPT(tiny_config)
    hist = mp.train(model, tiny_task, steps=4, lr=3e-3, batch_size=8, seed=1, device="cpu", progress=False)
    assert r.history.loss == hist.loss and not r.cached
    assert r.val == mp.evaluate(model, tiny_task, "val")
    x, y = encode_batch(tiny_task.test)  # the test split scored without evaluate()
    with torch.no_grad():
        assert r.test == exact_match(model(x), y).mean().item()
    assert set(r.tensors) == {n for n, _ in model.named_parameters()}
    assert all(torch.equal(r.tensors[n], p) for n, p in model.named_parameters())
    restored = r.restore(_builder(tiny_config))
    assert mp.evaluate(restored, tiny_task, "val") == r.val
    assert r.trainable_percent == 100.0


def test_build_with_an_argument_gets_the_seed(tiny_config, tiny_task):
    """A build that takes an argument receives the run's seed (for a method's own ``seed`` option)."""
    seen = []

    def build(seed):
        seen.append(seed)
        return mp.add_adapters(mp.GPT(tiny_config), bottleneck=4, seed=seed)
    a = P.run({"method": "adapter"}, build, tiny_task, seed=3, lr=1e-3, keep_tensors=True, **ARGS)
    b = P.run({"method": "adapter"}, build, tiny_task, seed=4, lr=1e-3, keep_tensors=True, **ARGS)
    assert seen == [3, 4]
    assert not torch.equal(a.tensors["blocks.0.attn.o_proj.adapters.default.down.weight"],
                           b.tensors["blocks.0.attn.o_proj.adapters.default.down.weight"])
    a.restore(build)
    assert seen == [3, 4, 3]


def test_trainable_percent_is_peft_s(tiny_config):
    model = mp.GPT(tiny_config)
    base = sum(p.numel() for p in model.parameters())
    mp.add_lora(model, r=2, alpha=4, targets=("q_proj",))
    lora = 2 * (2 * 32 + 32 * 2)  # 2 layers x (A: r x d_model + B: d_model x r)
    assert P.trainable_percent(model) == pytest.approx(100 * lora / (base + lora), rel=1e-12)  # LoRA in "all"


def test_run_rejects_bad_spec_and_task(tiny_config, tiny_task):
    with pytest.raises(TypeError, match="JSON-able"):
        P.run({"method": object()}, _builder(tiny_config), tiny_task, seed=0, lr=1e-3, **ARGS)
    with pytest.raises(TypeError, match="Task"):
        P.run({"method": "full"}, _builder(tiny_config), "rotate", seed=0, lr=1e-3, **ARGS)


def test_lr_search_reuses_the_search_runs_as_seeds(tiny_config, tiny_task):
    calls = []
    s = P.lr_search({"method": "full"}, _builder(tiny_config, calls), tiny_task, grid=P.log_grid(1e-3, 1e-1),
                    seeds=3, **ARGS)
    n_search = sum(len(rs) for rs in s.runs.values())
    assert len(s.runs) >= 5 and all(len(rs) == 1 and rs[0].seed == 0 for rs in s.runs.values())
    assert len(calls) == n_search + 2              # only seeds 1 and 2 are new at the chosen rate
    assert [r.seed for r in s.reported] == [0, 1, 2] and s.reported[0] is s.runs[s.lr][0]
    assert all(r.lr == s.lr for r in s.reported)
    # chosen on validation (ties to the lower final loss), reported on test
    best = max(s.runs, key=lambda lr: (s.runs[lr][0].val, -s.runs[lr][0].final_loss))
    assert s.lr == best
    assert s.test == P.summary([r.test for r in s.reported])
    with pytest.raises(ValueError, match="search_seeds"):
        P.lr_search({"method": "full"}, _builder(tiny_config), tiny_task, grid=P.log_grid(1e-3, 1e-1),
                    seeds=2, search_seeds=3, **ARGS)


def test_tracked_tasks_are_scored_untrained_along_training_and_at_the_end(tiny_config, tiny_task):
    """track= scores each task before the first step (the method applied, untrained), every k steps and at
    the end; the first and last points equal evaluations made here of the untrained and the trained model."""
    other = mp.make_task("copy", seed=0, n_train=64, n_val=32, n_test=0)
    track = {"rotate": tiny_task, "copy": other}
    args = {**ARGS, "steps": 5}
    r = P.run({"method": "full"}, _builder(tiny_config), tiny_task, seed=1, lr=3e-3, keep_tensors=True,
              track=track, track_every=2, track_examples=32, **args)
    assert r.track["step"] == [0, 2, 4, 5]
    torch.manual_seed(1)
    untrained = mp.GPT(tiny_config)
    trained = r.restore(_builder(tiny_config))
    for name, t in track.items():
        assert r.track[name][0] == mp.evaluate(untrained, t, "val", max_examples=32)
        assert r.track[name][-1] == mp.evaluate(trained, t, "val", max_examples=32)
    plain = P.run({"method": "full"}, _builder(tiny_config), tiny_task, seed=1, lr=3e-3, **args)
    assert plain.history.loss == r.history.loss and plain.track is None   # scoring changes no training step

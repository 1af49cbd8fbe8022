import pytest

import minipeft as mp
from minipeft.tasks import IGNORE


def test_tokenizer_round_trip_and_bad_characters():
    tok = mp.tokenizer
    s = "add:12,34=46."
    assert tok.decode(tok.encode(s)) == s
    assert tok.vocab_size == 41 == mp.GPTConfig().vocab_size
    with pytest.raises(ValueError, match=r"\['A', '!'\]|\['!', 'A'\]"):
        tok.encode("copy:A!=x.")


@pytest.mark.parametrize("name, x, answer", [
    ("copy", "abc", "abc"), ("reverse", "abcd", "dcba"), ("sort", "cab", "abc"), ("add", "12,34", "46"),
    ("add", "99,99", "198"), ("rotate", "abcd", "bcda"), ("caesar", "abz", "bca"),
    ("sortdesc", "cab", "cba"), ("rotate_few", "xyz", "yzx"),
])
def test_solve_by_hand(name, x, answer):
    assert mp.solve(name, x) == answer


@pytest.mark.parametrize("name", mp.TASKS)
def test_deterministic_and_disjoint(name):
    a, b = mp.make_task(name, seed=3), mp.make_task(name, seed=3)
    assert a.train == b.train and a.val == b.val
    assert mp.make_task(name, seed=4).train != a.train
    inputs = lambda texts: {t.split(":")[1].split("=")[0] for t in texts}
    assert not inputs(a.train) & inputs(a.val)
    assert len(set(a.train)) == len(a.train)
    for text in a.train[:50]:
        task, rest = text.split(":")
        x, ans = rest.split("=")
        assert ans.endswith(".") and mp.solve(task, x) == ans[:-1]


def test_low_resource_variant_size():
    assert len(mp.make_task("rotate_few").train) == 48
    assert len(mp.make_task("rotate").train) == 2000


def test_unknown_task_lists_known():
    with pytest.raises(ValueError, match="known tasks: copy, reverse"):
        mp.make_task("multiply")


def test_encode_batch_scores_answer_only():
    x, y = mp.encode_batch(["copy:ab=ab.", "add:1,2=3."])
    # 'copy:ab=ab.' : inputs are the first 10 characters, targets from the '=' on: 'a', 'b', '.'
    assert x.shape == y.shape == (2, 10)
    assert mp.tokenizer.decode(y[0][y[0] != IGNORE]) == "ab."
    assert mp.tokenizer.decode(y[1][y[1] != IGNORE]) == "3."
    assert (y[0] != IGNORE).nonzero().flatten().tolist() == [7, 8, 9]
    assert x[1, 9].item() == 0  # padding


def test_exact_match_vs_token_accuracy_by_hand():
    import torch
    y = torch.tensor([[IGNORE, 1, 2], [IGNORE, 3, 4]])
    pred = torch.tensor([[5, 1, 2], [5, 3, 9]])  # row 0 all right, row 1 one of two right
    logits = torch.nn.functional.one_hot(pred, 10).float()
    assert mp.exact_match(logits, y).tolist() == [1.0, 0.0]
    assert mp.token_accuracy(logits, y) == 3 / 4

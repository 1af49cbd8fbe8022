import hashlib

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
    assert a.test == b.test and len(a.test) == 500
    inputs = lambda texts: {t.split(":")[1].split("=")[0] for t in texts}
    assert not inputs(a.train) & inputs(a.val)
    assert not inputs(a.test) & inputs(a.train) and not inputs(a.test) & inputs(a.val)
    assert len(inputs(a.test)) == len(a.test)
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


# sha256("\n".join(train) + "|" + "\n".join(val))[:16] and the first examples, computed with the code
# before the test split existed (make_task(name, seed) drew val then train only): the notebooks' stored
# numbers depend on these examples, so adding the test split must not move them.
BEFORE_TEST_SPLIT = {
    ("copy", 0): ("dae994bd246c0e89", "copy:upvq=upvq.", "copy:lvrvvkle=lvrvvkle."),
    ("add", 3): ("ec0b58da662ef9af", "add:7,65=72.", "add:29,35=64."),
    ("rotate", 0): ("5739c09c1932cdc7", "rotate:uzxkcf=zxkcfu.", "rotate:pmtwjxa=mtwjxap."),
    ("caesar", 3): ("f80aaecbc88ba1c3", "caesar:kxqwmmy=lyrxnnz.", "caesar:hsodyaa=itpezbb."),
    ("sortdesc", 0): ("26d7b12630b01ced", "sortdesc:cmpuzo=zupomc.", "sortdesc:rchpo=rpohc."),
    ("rotate_few", 0): ("379fc540f67f74f0", "rotate:uzxkcf=zxkcfu.", "rotate:pmtwjxa=mtwjxap."),
    ("sortdesc_few", 3): ("7e567d1aafbf9d27", "sortdesc:jllm=mllj.", "sortdesc:sgktf=tskgf."),
}


@pytest.mark.parametrize("name, seed", sorted(BEFORE_TEST_SPLIT))
def test_train_and_val_unchanged_by_the_test_split(name, seed):
    digest, first_train, first_val = BEFORE_TEST_SPLIT[name, seed]
    for n_test in (0, 500, 1000):
        t = mp.make_task(name, seed=seed, n_test=n_test)
        assert len(t.test) == n_test
        assert t.train[0] == first_train and t.val[0] == first_val
        joined = "\n".join(t.train) + "|" + "\n".join(t.val)
        assert hashlib.sha256(joined.encode()).hexdigest()[:16] == digest


def test_small_splits_unchanged_and_test_follows():
    t = mp.make_task("rotate", seed=0, n_train=100, n_val=50, n_test=30)
    joined = "\n".join(t.train) + "|" + "\n".join(t.val)
    assert hashlib.sha256(joined.encode()).hexdigest()[:16] == "ed3fbee5aa8e0b07"  # from the code before
    # the test split is the continuation of the same stream: a bigger train split starts with the
    # same 100 examples and then takes the 30 test inputs as its next ones
    bigger = mp.make_task("rotate", seed=0, n_train=130, n_val=50, n_test=0)
    assert bigger.train == t.train + t.test


def test_capacity_counts_the_test_split():
    mp.make_task("add", n_train=9000, n_val=500, n_test=500)  # exactly the 100 x 100 inputs
    with pytest.raises(ValueError, match="only 10000 distinct inputs; asked for 10001"):
        mp.make_task("add", n_train=9000, n_val=500, n_test=501)
    with pytest.raises(ValueError, match=r"n_test must be an integer in \[0, inf\]"):
        mp.make_task("rotate", n_test=-1)

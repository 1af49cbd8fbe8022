"""Toy character-level tasks, generated from a seed (nothing is downloaded).

Every example is one line of text ``task:input=answer.``, for example ``reverse:abcd=dcba.``. The model
reads the prompt ``reverse:abcd=`` and is scored on the answer ``dcba.`` only (the final ``.`` says
"stop"). Two families:

* **pretraining tasks** the shipped base model was trained on: ``copy``, ``reverse``, ``sort``, ``add``;
* **downstream tasks** it never saw, but can learn from what it knows: ``rotate`` (move the first
  character to the end), ``caesar`` (shift every letter by one, z -> a) and ``sortdesc`` (sort, largest
  first). Each has a low-resource variant ``<name>_few`` with only 48 training examples.

Three disjoint splits: ``train`` (the model learns from it), ``val`` (choices such as the learning
rate are made on it) and ``test`` (reported once the choices are made, never used to choose).

Under teacher forcing the model predicts every answer character from the true characters before it,
so "all answer characters right" (exact match) is the same as greedy decoding getting the answer
right, in one forward pass.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .common import integer, positive_int

PAD_ID = 0
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz:=,."
IGNORE = -100  # target value that the loss and the accuracy skip


class CharTokenizer:
    """One id per character; id 0 is padding. ``decode(encode(s)) == s``."""

    def __init__(self, chars: str = CHARS):
        self.chars = chars
        self.stoi = {c: i + 1 for i, c in enumerate(chars)}
        self.itos = {i + 1: c for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 1

    def encode(self, text: str) -> list[int]:
        bad = sorted(set(c for c in text if c not in self.stoi))
        if bad:
            raise ValueError(f"characters {bad} of {text!r} are not in the vocabulary {self.chars!r}")
        return [self.stoi[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.itos.get(int(i), "") for i in ids)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size}, chars={self.chars!r}, pad_id={PAD_ID})"


tokenizer = CharTokenizer()
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _letters(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))


def _two_numbers(rng: random.Random) -> str:
    return f"{rng.randint(0, 99)},{rng.randint(0, 99)}"


# name -> (make an input, compute its answer)
_RULES = {
    "copy": (_letters, lambda s: s),
    "reverse": (_letters, lambda s: s[::-1]),
    "sort": (_letters, lambda s: "".join(sorted(s))),
    "add": (_two_numbers, lambda s: str(sum(int(n) for n in s.split(",")))),
    "rotate": (_letters, lambda s: s[1:] + s[0]),
    "caesar": (_letters, lambda s: "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)),
    "sortdesc": (_letters, lambda s: "".join(sorted(s, reverse=True))),
}
PRETRAIN_TASKS = ("copy", "reverse", "sort", "add")
DOWNSTREAM_TASKS = ("rotate", "caesar", "sortdesc")
N_FEW = 48  # training examples of a low-resource variant
TASKS = PRETRAIN_TASKS + DOWNSTREAM_TASKS + tuple(f"{n}_few" for n in DOWNSTREAM_TASKS)


def solve(name: str, x: str) -> str:
    """The answer of task ``name`` for input ``x``: ``solve("rotate", "abc") == "bca"``."""
    return _RULES[name.removesuffix("_few")][1](x)


@dataclass
class Task:
    name: str
    train: list[str]  # full texts, 'rotate:abc=bca.'
    val: list[str]    # chooses (learning rate, ...); disjoint from train (no input appears in both)
    seed: int
    test: list[str] = field(default_factory=list)  # reports; disjoint from train and val

    def __repr__(self):
        return (f"Task({self.name!r}, seed={self.seed}, train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, example={self.train[0]!r})")


def make_task(name: str, seed: int = 0, n_train: int | None = None, n_val: int = 500,
              n_test: int = 500) -> Task:
    """Generate task ``name`` (one of ``TASKS``) with a seed; the same seed gives the same examples.

    Inputs are drawn without repetition from one stream per task and seed: the first ``n_val`` are the
    validation split, the next ``n_train`` the training split, the next ``n_test`` the test split; so
    the three share no input, and the test split (drawn last) leaves train and val as they were before
    it existed. ``n_train`` defaults to 2,000 (48 for a ``_few`` variant).
    """
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    seed, n_val, n_test = integer("seed", seed), positive_int("n_val", n_val), integer("n_test", n_test, 0)
    n_train = (N_FEW if name.endswith("_few") else 2000) if n_train is None else positive_int("n_train", n_train)
    base = name.removesuffix("_few")
    make_input, _ = _RULES[base]
    capacity = 100 * 100 if base == "add" else sum(26 ** k for k in range(3, 9))
    n = n_val + n_train + n_test
    if n > capacity:
        raise ValueError(f"task {name!r} has only {capacity} distinct inputs; asked for {n} "
                         f"(n_train={n_train} + n_val={n_val} + n_test={n_test})")
    # a different stream per task, so that tasks with the same seed do not share inputs
    rng = random.Random(f"{base}-{seed}")
    inputs: dict[str, None] = {}  # a dict keeps the order of first appearance
    while len(inputs) < n:
        inputs[make_input(rng)] = None
    texts = [f"{base}:{x}={solve(base, x)}." for x in inputs]
    return Task(name, texts[n_val:n_val + n_train], texts[:n_val], seed, texts[n_val + n_train:])


def encode_batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets for next-character prediction, scored on the answer only.

    ``x[b, t]`` is character t of text b; ``y[b, t]`` is character t + 1 where that character belongs
    to the answer (after the ``=``), else ``IGNORE``.

    >>> x, y = encode_batch(["copy:ab=ab."])
    >>> tokenizer.decode(x[0]), [tokenizer.decode([i]) if i >= 0 else '-' for i in y[0].tolist()]
    ('copy:ab=ab', ['-', '-', '-', '-', '-', '-', '-', 'a', 'b', '.'])
    """
    ids = [tokenizer.encode(t) for t in texts]
    T = max(len(s) for s in ids) - 1
    x = torch.full((len(ids), T), PAD_ID, dtype=torch.long)
    y = torch.full((len(ids), T), IGNORE, dtype=torch.long)
    for b, (text, s) in enumerate(zip(texts, ids)):
        n = len(s) - 1
        x[b, :n] = torch.tensor(s[:-1])
        first = text.index("=")  # y[first] is the first answer character
        y[b, first:n] = torch.tensor(s[first + 1:])
    return x, y


def exact_match(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per row: 1.0 if the argmax is right at every scored position of ``y``, else 0.0."""
    scored = y != IGNORE
    right = (logits.argmax(-1) == y) | ~scored
    return right.all(dim=1).float()


def token_accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of scored characters whose argmax is right."""
    scored = y != IGNORE
    return ((logits.argmax(-1) == y) & scored).sum().item() / max(scored.sum().item(), 1)

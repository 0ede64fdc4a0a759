"""Labelled texts for sparse probing: the built-in tasks made from the embedded corpus, and user
tasks read from a labelled data set.

Built-in (no download; `docs/interpretability.md`):

- ``source``: which of the corpus's four texts a passage comes from (Austen, the King James
  Bible, Shakespeare, the Jargon File): four one-vs-rest tasks.
- ``testament``: a King James Bible passage from the Old or the New Testament (the New begins
  at Matthew 1:1): a question of content, not of style, inside one text.
- ``dialogue``: an Austen paragraph of direct speech (it opens with a quotation mark) or of
  narration.

A passage is a run of consecutive lines (an Austen paragraph) of at most `PASSAGE_WORDS` words,
so that it fits a 128-token context. User tasks come from a ``.jsonl``, ``.csv`` or ``.parquet``
file or a Hugging Face data set with a text and a label column (SAEBench's own data sets among
them), split into train and test by a seeded shuffle.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from e2edict.corpus import TEXT_NAMES, read_text
from e2edict.errors import E2EDictError

PASSAGE_WORDS = 60
BUILTIN_TASKS = ("source", "testament", "dialogue")
NEW_TESTAMENT_START = "The book of the generation of Jesus Christ"


@dataclass
class Task:
    """Texts with class labels; ``classes`` in a fixed order (one-vs-rest tasks follow it)."""

    name: str
    texts: list[str]
    labels: list[str]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def check(self) -> Task:
        if len(self.classes) < 2:
            only = self.classes[0] if self.classes else "none"
            raise E2EDictError(f"probing task {self.name!r} has {len(self.classes)} class ({only}); at least 2 are needed")
        return self


def _passages(lines: list[str], max_words: int = PASSAGE_WORDS) -> list[str]:
    """Consecutive non-empty lines joined into passages of at most ``max_words`` words."""
    out, cur, n = [], [], 0
    for line in lines:
        words = len(line.split())
        if not words:
            continue
        if cur and n + words > max_words:
            out.append(" ".join(cur))
            cur, n = [], 0
        cur.append(line.strip())
        n += words
    if cur:
        out.append(" ".join(cur))
    return [p for p in out if len(p.split()) >= 8]


def _paragraphs(text: str) -> list[str]:
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    return [p for p in paras if 8 <= len(p.split()) <= PASSAGE_WORDS]


def builtin_task(name: str) -> Task:
    if name == "source":
        texts, labels = [], []
        for src in TEXT_NAMES:
            ps = _passages(read_text(src).splitlines())
            texts += ps
            labels += [src] * len(ps)
        return Task(name, texts, labels)
    if name == "testament":
        lines = read_text("kjv").splitlines()
        cut = next(i for i, line in enumerate(lines) if line.startswith(NEW_TESTAMENT_START))
        old, new = _passages(lines[:cut]), _passages(lines[cut:])
        return Task(name, old + new, ["old"] * len(old) + ["new"] * len(new))
    if name == "dialogue":
        paras = _paragraphs(read_text("austen"))
        return Task(name, paras, ["dialogue" if p.startswith('"') else "narration" for p in paras])
    raise E2EDictError(f"unknown built-in probing task {name!r}; known: {', '.join(BUILTIN_TASKS)}")


def user_task(path: str, text_column: str = "text", label_column: str = "label", split: str = "train") -> Task:
    """A labelled data set: a .jsonl / .csv / .parquet file, or a Hugging Face data set name."""
    p = Path(path)
    if p.suffix in (".jsonl", ".csv", ".parquet"):
        if not p.is_file():
            raise E2EDictError(f"probing data {path!r} does not exist")
        rows = _read_rows(p)
    else:
        rows = _hf_rows(path, split)
    if not rows:
        raise E2EDictError(f"probing data {path!r} holds no rows")
    cols = list(rows[0])
    for c, what in ((text_column, "text"), (label_column, "label")):
        if c not in cols:
            raise E2EDictError(f"probing data {path!r}: no {what} column {c!r} (columns: {', '.join(map(str, cols))})")
    texts, labels = [], []
    for i, r in enumerate(rows):
        t, lab = r.get(text_column), r.get(label_column)
        if not isinstance(t, str) or lab is None or lab == "":
            raise E2EDictError(f"probing data {path!r}: row {i} has no text or no label")
        texts.append(t)
        labels.append(str(lab))
    return Task(p.stem if p.suffix else path, texts, labels).check()


def _read_rows(p: Path) -> list[dict]:
    try:
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not all(isinstance(r, dict) for r in rows):
                raise ValueError("a line is not a JSON object")
            return rows
        if p.suffix == ".csv":
            with p.open(newline="", encoding="utf-8") as fh:
                return list(csv.DictReader(fh))
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise E2EDictError(f"probing data {str(p)!r} cannot be read ({e})") from None


def _hf_rows(name: str, split: str) -> list[dict]:
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many kinds: not found, offline, bad split
        raise E2EDictError(f"probing data {name!r}: not a .jsonl/.csv/.parquet file and not a loadable data set ({e})") from None
    return [dict(r) for r in ds]


@dataclass
class Split:
    """One one-vs-rest task: indices into the task's texts and their binary labels."""

    name: str
    train: list[int]
    train_y: list[int]
    test: list[int]
    test_y: list[int]


def one_vs_rest(task: Task, n_train: int, n_test: int, seed: int) -> list[Split]:
    """SAEBench's balanced one-vs-rest tasks: per class, half its examples and half drawn evenly
    from the other classes, ``n_train`` and ``n_test`` in all, the test texts never in training.
    A two-class task gives one split (the other would be its mirror)."""
    rng = random.Random(seed)
    by_class = {c: [i for i, lab in enumerate(task.labels) if lab == c] for c in task.classes}
    for idx in by_class.values():
        rng.shuffle(idx)
    # each class's examples divided once into a train and a test pool (1 : n_test / n_train)
    pools = {}
    for c, idx in by_class.items():
        cut = round(len(idx) * n_train / (n_train + n_test))
        pools[c] = (idx[:cut], idx[cut:])
    classes = task.classes[:1] if len(task.classes) == 2 else task.classes
    return [_balanced(task.name, c, pools, n_train, n_test, rng) for c in classes]


def _balanced(task: str, c: str, pools, n_train: int, n_test: int, rng: random.Random) -> Split:
    others = [o for o in pools if o != c]
    parts = []
    for which, n in ((0, n_train), (1, n_test)):
        pos = pools[c][which][: n // 2]
        neg: list[int] = []
        per = -(-(n - len(pos)) // len(others))
        for o in others:
            neg += pools[o][which][:per]
        neg = neg[: n - len(pos)]
        if len(pos) < 2 or len(neg) < 2:
            raise E2EDictError(f"probing task {task!r}: class {c!r} has too few examples for a {('train', 'test')[which]} split")
        items = [(i, 1) for i in pos] + [(i, 0) for i in neg]
        rng.shuffle(items)
        parts.append(([i for i, _ in items], [y for _, y in items]))
    return Split(f"{task}/{c}", parts[0][0], parts[0][1], parts[1][0], parts[1][1])

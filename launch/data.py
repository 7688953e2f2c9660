"""An embedded, deterministic, learnable sentence-pair task (no downloads).

Each example is `<s> A </s></s> B </s>`. The content vocabulary is split into `topics` groups; a sentence on
topic t draws each token from group t with probability `focus`, otherwise from the whole vocabulary. A and B
are on different topics; the label says whether B's topic comes after A's. Solving it needs both segments
and a comparison between them (a sentence-pair relation, like MRPC), yet the relation is simple enough that
a small RoBERTa learns it within a few dozen steps on CPU, so a falling loss shows that training works.
(A "same topic or not" label is an XOR of the two topics: far slower to learn from scratch.)

With `examples=N` the task is a finite training set of N examples that the batches cycle through, as a
fine-tuning data set is; a tiny model from scratch fits a few dozen of them within some 20 steps, which is
what the short distributed tests need to see a loss fall. Without it every batch is fresh.
"""

from __future__ import annotations

import torch

__all__ = ["SentencePairTask"]

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

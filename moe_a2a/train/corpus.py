"""Byte-level language-model data from a small text corpus shipped with the package.

Tokens are the bytes of the text (vocabulary 256), so no tokenizer is needed. The corpus is split
once: the first ``1 - valid_fraction`` of the bytes train, the rest is held out for validation.
Training batches are random windows drawn from a generator seeded by ``(seed, step, dp_rank)``, so a
resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Tuple

import torch

VOCAB_SIZE = 256
# The text ships in moe_a2a/data/ (package data), next to the tables the defaults read.
DEFAULT_CORPUS = Path(__file__).resolve().parent.parent / "data" / "kjv_genesis_exodus.txt"


def load_corpus(path: str | Path | None = None) -> bytes:
    """Read a corpus file as raw bytes (the shipped KJV text when ``path`` is ``None``)."""
    path = DEFAULT_CORPUS if path in (None, "", "builtin") else Path(path)
    if not path.is_file():
        raise ValueError(f"data.corpus: file {str(path)!r} does not exist")
    return path.read_bytes()


class ByteCorpus:
    """Train/validation split of a byte corpus, served as ``[batch, seq_length]`` int64 tokens.

    Args:
        data: the corpus bytes.
        seq_length: tokens per sample; each sample reads ``seq_length + 1`` bytes (inputs and
            next-byte labels).
        valid_fraction: share of the bytes, taken from the end, held out for validation.
    """

    def __init__(self, data: bytes, seq_length: int, valid_fraction: float = 0.1):
        if not 0.0 < valid_fraction < 1.0:
            raise ValueError(f"data.valid_fraction: expected a number in (0, 1), got {valid_fraction!r}")
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        split = int(len(tokens) * (1.0 - valid_fraction))
        self.train, self.valid = tokens[:split], tokens[split:]
        self.seq_length = int(seq_length)
        for name, part in (("training", self.train), ("validation", self.valid)):
            if len(part) < self.seq_length + 1:
                raise ValueError(
                    f"model.seq_length={seq_length}: the {name} split has only {len(part)} bytes, "
                    f"need at least seq_length + 1")

    def _windows(self, source: torch.Tensor, starts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        offsets = torch.arange(self.seq_length + 1)
        rows = source[starts[:, None] + offsets[None, :]]
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def train_batch(self, step: int, batch_size: int, dp_rank: int = 0,
                    seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """Random training windows for one step of one data-parallel rank.

        Returns:
            ``(tokens, labels)``, both ``[batch_size, seq_length]`` int64; ``labels`` is ``tokens``
            shifted by one byte.
        """
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 4099 + dp_rank)
        high = len(self.train) - self.seq_length - 1
        starts = torch.randint(0, high + 1, (batch_size,), generator=gen)
        return self._windows(self.train, starts)

    def num_valid_windows(self) -> int:
        """Number of disjoint validation windows."""
        return (len(self.valid) - 1) // self.seq_length

    def valid_batches(self, batch_size: int, max_batches: int, dp_rank: int = 0,
                      dp_size: int = 1) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        """Disjoint validation windows, the same every call, dealt round-robin to DP ranks.

        Every rank yields the same number of batches (``max_batches`` or fewer if the split is
        short), so collective calls inside the model stay in lockstep.
        """
        total = self.num_valid_windows()
        per_rank = total // dp_size
        num_batches = min(max_batches, per_rank // batch_size)
        if num_batches < 1:
            raise ValueError(
                f"validation split has {total} windows of seq_length={self.seq_length}: too few for "
                f"{dp_size} data-parallel ranks x micro_batch_size={batch_size}")
        starts_all = torch.arange(total) * self.seq_length
        mine = starts_all[dp_rank::dp_size]
        for b in range(num_batches):
            yield self._windows(self.valid, mine[b * batch_size:(b + 1) * batch_size])

"""A long-context recall task: key-value pairs early in a sequence, a query for one at its end.

What a long-term memory is for: with attention limited to a sliding window, the pair the
query asks about lies further back than the window, so only a memory can carry it.

A sequence of ``length`` token ids (no tokenizer; ids are the vocabulary):

    filler ... KEY k1 v1 ... filler ... KEY k2 v2 ... filler ... QUERY kq  ->  vq

- ids 0..3: PAD, KEY (marks a pair), QUERY, unused; then ``filler`` filler ids, ``keys`` key
  ids and ``values`` value ids;
- ``pairs`` pairs with distinct keys, at random positions in the first ``length - gap - 2``
  positions, so every pair ends at least ``gap`` tokens before the query;
- the last two positions are QUERY and the asked key; the target is that key's value, to be
  predicted at the last position. Accuracy = argmax over the value ids == the value; chance
  is 1 / ``values``.

Difficulty grows with ``length`` (farther back, more filler written into the memory) and with
``pairs``. Examples are a pure function of (seed, index): the same batch for the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

PAD, KEY, QUERY = 0, 1, 2
SPECIAL = 4


@dataclass(frozen=True)
class Recall:
    length: int = 128  # tokens per sequence, the query included
    pairs: int = 4  # key-value pairs per sequence
    gap: int = 32  # at least this many tokens between a pair and the query
    filler: int = 32  # distinct filler ids
    keys: int = 16  # distinct key ids
    values: int = 16  # distinct value ids

    def __post_init__(self):
        room = self.length - self.gap - 2
        if self.pairs < 1 or self.pairs > self.keys:
            raise ValueError(f"recall: pairs={self.pairs} must be in [1, keys={self.keys}]")
        if room < 3 * self.pairs:
            raise ValueError(f"recall: length {self.length} leaves {room} positions before the gap "
                             f"of {self.gap}; {self.pairs} pairs need {3 * self.pairs}")
        if min(self.filler, self.values) < 2:
            raise ValueError("recall: filler and values need at least 2 ids each")

    @property
    def vocab_size(self) -> int:
        return SPECIAL + self.filler + self.keys + self.values

    def value_ids(self) -> torch.Tensor:
        first = SPECIAL + self.filler + self.keys
        return torch.arange(first, first + self.values)

    def batch(self, n: int, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, length) token ids and (n,) the value to predict after the last token."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        x = SPECIAL + torch.randint(0, self.filler, (n, self.length), generator=g)
        room = self.length - self.gap - 2
        key0, val0 = SPECIAL + self.filler, SPECIAL + self.filler + self.keys
        target = torch.empty(n, dtype=torch.long)
        for i in range(n):
            keys = torch.randperm(self.keys, generator=g)[:self.pairs]
            vals = torch.randint(0, self.values, (self.pairs,), generator=g)
            # pair starts: distinct slots of 3 tokens in the first `room` positions
            slots = torch.randperm(room // 3, generator=g)[:self.pairs] * 3
            for s, k, v in zip(slots.tolist(), keys.tolist(), vals.tolist()):
                x[i, s:s + 3] = torch.tensor([KEY, key0 + k, val0 + v])
            asked = int(torch.randint(0, self.pairs, (1,), generator=g))
            x[i, -2:] = torch.tensor([QUERY, key0 + int(keys[asked])])
            target[i] = val0 + int(vals[asked])
        return x, target


def recall_loss_and_accuracy(model, task: Recall, x: torch.Tensor, target: torch.Tensor):
    """Cross-entropy of the value at the last position (over the value ids) and accuracy."""
    logits = model(x, last_only=True)[:, -1, task.value_ids().to(x.device)]
    idx = target - task.value_ids()[0]
    loss = torch.nn.functional.cross_entropy(logits.float(), idx.to(x.device))
    acc = (logits.argmax(-1).cpu() == idx).float().mean().item()
    return loss, acc

"""A long-context recall task: key-value pairs early in a sequence, queries for them at its end.

What a long-term memory is for: with attention limited to a sliding window, the pairs the
queries ask about lie further back than the window, so only a memory can carry them.
It is multi-query associative recall (Zoology, Arora et al. 2023) with a gap: a sequence of
``length`` token ids (no tokenizer; ids are the vocabulary)

    filler ... KEY k1 v1 ... filler ... KEY k2 v2 ... filler | QUERY k2 v2 QUERY k1 v1

- ids 0..3: PAD, KEY (marks a pair), QUERY, unused; then ``filler`` filler ids, ``keys`` key
  ids and ``values`` value ids;
- ``pairs`` pairs with distinct keys at random positions of the body, each ending at least
  ``gap`` tokens before the first query;
- the last 3 x ``pairs`` tokens ask for every pair once, in random order; the value after
  each asked key is a target (predicted at the key's position; the tokens given after it are
  the true values, so one answer never depends on another). Accuracy = argmax over the value
  ids == the value, over all targets; chance is 1 / ``values``.

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
        room = self.body - self.gap
        if self.pairs < 1 or self.pairs > self.keys:
            raise ValueError(f"recall: pairs={self.pairs} must be in [1, keys={self.keys}]")
        if room < 3 * self.pairs:
            raise ValueError(f"recall: length {self.length} leaves {room} positions before the gap "
                             f"of {self.gap}; {self.pairs} pairs need {3 * self.pairs}")
        if min(self.filler, self.values) < 2:
            raise ValueError("recall: filler and values need at least 2 ids each")

    @property
    def body(self) -> int:
        """Tokens before the queries."""
        return self.length - 3 * self.pairs

    @property
    def vocab_size(self) -> int:
        return SPECIAL + self.filler + self.keys + self.values

    def value_ids(self) -> torch.Tensor:
        first = SPECIAL + self.filler + self.keys
        return torch.arange(first, first + self.values)

    def batch(self, n: int, seed: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, length) token ids and (n, length) targets: the value id to predict at each
        asked key's position, -100 elsewhere."""
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)
        x = SPECIAL + torch.randint(0, self.filler, (n, self.length), generator=g)
        y = torch.full((n, self.length), -100, dtype=torch.long)
        key0, val0 = SPECIAL + self.filler, SPECIAL + self.filler + self.keys
        for i in range(n):
            keys = (key0 + torch.randperm(self.keys, generator=g)[:self.pairs]).tolist()
            vals = (val0 + torch.randint(0, self.values, (self.pairs,), generator=g)).tolist()
            # pair starts: distinct slots of 3 tokens in the body, ending >= gap before queries
            slots = (torch.randperm((self.body - self.gap) // 3, generator=g)[:self.pairs] * 3)
            for s, k, v in zip(slots.tolist(), keys, vals):
                x[i, s:s + 3] = torch.tensor([KEY, k, v])
            for j, p in enumerate(torch.randperm(self.pairs, generator=g).tolist()):
                at = self.body + 3 * j
                x[i, at:at + 3] = torch.tensor([QUERY, keys[p], vals[p]])
                y[i, at + 1] = vals[p]
        return x, y


def recall_loss_and_accuracy(model, task: Recall, x: torch.Tensor, target: torch.Tensor):
    """Cross-entropy over the value ids at the target positions, and accuracy."""
    logits = model(x)[..., task.value_ids().to(x.device)]
    where = target != -100
    picked = logits[where.to(x.device)].float()
    idx = (target[where] - task.value_ids()[0]).to(x.device)
    loss = torch.nn.functional.cross_entropy(picked, idx)
    acc = (picked.argmax(-1) == idx).float().mean().item()
    return loss, acc

"""The per-rank block cache and its gradient deposits (design note ``pipeline_cache.md`` §6.2–6.4).

One :class:`BlockCache` per pipeline rank, shared by the rank's V chunks, lives for one step:

* ``values[(mb, b)]``: a *detached alias* of block ``b`` of microbatch ``mb`` (no copy), inserted by the
  block's *entry stage* on this rank (the stage that produced it, or the one that received it). Later stages
  of the same rank read it with :meth:`read`, which returns a FRESH LEAF every time, so no stage's autograd
  graph ever reaches into another stage's graph ("backward through the graph a second time" otherwise).
* ``deposits[(mb, b)]``: the sum of the gradients that the readers' backward passes produced for their leaf
  of ``b``. The entry stage takes it in its own backward (:meth:`take`): a producer adds it to the block's
  output gradient before running backward, a receiver adds it to the input gradient it sends upstream. Data
  dependencies guarantee every reader's backward (a later stage on the same rank) runs first, for any valid
  schedule, zero-bubble I/W splits included.

Invariants checked when ``strict``: a key is taken exactly once, by then it received exactly as many deposits as
the layout says it has readers, and nothing is left at the end of the step (:meth:`assert_empty`).
:meth:`clear` drops everything; the runtime calls it in a ``finally`` so a failing step leaks nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Optional, Tuple

import torch

Key = Tuple[int, int]  # (microbatch, block)


class BlockCacheError(RuntimeError):
    """The cache was used against the layout's tables (a runtime bug, never a user error)."""


class BlockCache:
    def __init__(self, layout, rank: int, strict: bool = True):
        self.layout = layout
        self.rank = rank
        self.strict = strict
        self.values: Dict[Key, torch.Tensor] = {}
        self.deposits: Dict[Key, torch.Tensor] = {}
        self.ndep: Counter = Counter()
        self._expected = {b: len(layout.readers(rank, b)) for b in range(layout.num_blocks)}

    # ------------------------------------------------------------------ values
    def is_read(self, block: int) -> bool:
        """True if a later stage of this rank reads ``block`` from the cache (only then is it kept)."""
        return self._expected.get(block, 0) > 0

    def put(self, mb: int, block: int, tensor: torch.Tensor) -> None:
        """Remember block ``block`` of microbatch ``mb`` (detached alias) if a later stage here reads it."""
        if not self.is_read(block):
            return
        key = (mb, block)
        if key in self.values:
            raise BlockCacheError(f"rank {self.rank}: block {block} of microbatch {mb} entered the cache twice")
        self.values[key] = tensor.detach()

    def read(self, mb: int, block: int) -> torch.Tensor:
        """A fresh leaf (requires grad, shares storage) of the cached block."""
        try:
            value = self.values[(mb, block)]
        except KeyError:
            raise BlockCacheError(f"rank {self.rank}: block {block} of microbatch {mb} is not cached "
                                  f"(layout and schedule disagree)") from None
        return value.detach().requires_grad_(torch.is_grad_enabled())

    def evict(self, mb: int) -> None:
        """Drop the values of microbatch ``mb`` (after this rank's last chunk ran its forward)."""
        for key in [k for k in self.values if k[0] == mb]:
            del self.values[key]

    # ------------------------------------------------------------------ gradient deposits
    def deposit(self, mb: int, block: int, grad: Optional[torch.Tensor]) -> None:
        """A reader's gradient for its leaf of ``block`` (``None``: the reader did not use it)."""
        key = (mb, block)
        self.ndep[key] += 1
        if grad is None:
            return
        prev = self.deposits.get(key)
        self.deposits[key] = grad if prev is None else prev + grad

    def take(self, mb: int, block: int) -> Optional[torch.Tensor]:
        """Pop the summed deposits for ``block`` (at its entry stage's backward); ``None`` if it has readers
        that produced no gradient or no readers at all."""
        key = (mb, block)
        expected = self._expected.get(block, 0)
        got = self.ndep.pop(key, 0)
        if self.strict and got != expected:
            raise BlockCacheError(f"rank {self.rank}: block {block} of microbatch {mb} has {got} gradient "
                                  f"deposit(s) at its entry stage's backward, expected {expected} (one per reader)")
        return self.deposits.pop(key, None)

    # ------------------------------------------------------------------ lifetime
    def assert_empty(self) -> None:
        left = [f"value{k}" for k in self.values] + [f"deposit{k}" for k in self.deposits] + \
            [f"count{k}" for k, v in self.ndep.items() if v]
        if left:
            raise BlockCacheError(f"rank {self.rank}: block cache not empty at the end of the step: "
                                  f"{', '.join(left[:8])}{' ...' if len(left) > 8 else ''}")

    def clear(self) -> None:
        self.values.clear()
        self.deposits.clear()
        self.ndep.clear()

    def __len__(self) -> int:
        return len(self.values) + len(self.deposits)

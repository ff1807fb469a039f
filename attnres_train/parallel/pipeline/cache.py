"""The per-rank block cache and its gradient deposits (design note ``pipeline_cache.md`` §6.2–6.4).

Why: a block that a later chunk of the same rank reads must not travel again, and no stage's autograd graph may
reach into another's. One :class:`BlockCache` per rank and step holds detached aliases keyed by (microbatch,
block), hands every reader a FRESH LEAF, sums the readers' gradient deposits for the block's entry stage, and
(``strict``) checks that each key is taken once with one deposit per reader and that nothing is left.
docs/pipeline.md, "The runtime".
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
            raise BlockCacheError(
                f"rank {self.rank}: block {block} of microbatch {mb} is not cached (layout and schedule disagree)"
            ) from None
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
            raise BlockCacheError(
                f"rank {self.rank}: block {block} of microbatch {mb} has {got} gradient "
                f"deposit(s) at its entry stage's backward, expected {expected} (one per reader)"
            )
        return self.deposits.pop(key, None)

    # ------------------------------------------------------------------ lifetime
    def assert_empty(self) -> None:
        left = (
            [f"value{k}" for k in self.values]
            + [f"deposit{k}" for k in self.deposits]
            + [f"count{k}" for k, v in self.ndep.items() if v]
        )
        if left:
            raise BlockCacheError(
                f"rank {self.rank}: block cache not empty at the end of the step: "
                f"{', '.join(left[:8])}{' ...' if len(left) > 8 else ''}"
            )

    def clear(self) -> None:
        self.values.clear()
        self.deposits.clear()
        self.ndep.clear()

    def __len__(self) -> int:
        return len(self.values) + len(self.deposits)

"""A seeded bijection of ``[0, n)`` evaluated per index: the epoch shuffle without a permutation in RAM.

Why: ``rng.permutation(n)`` of a 10^8-sample source costs ~1 GB and seconds per rank at every epoch boundary.
A keyed Feistel network over ``[0, 4^h)`` restricted to ``[0, n)`` by cycle-walking needs only its round
keys, and position ``j`` of epoch ``e`` is a pure function of (key, e, j), so resume at any step is exact.
The exact rule (order version 2): docs/data.md "From documents to samples", epoch rule.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ROUNDS = 6
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """``perm(i)`` for integer arrays ``i`` in ``[0, n)``: a bijection of ``[0, n)`` chosen by ``key``."""

    def __init__(self, n: int, key: Sequence[int]):
        if n < 1:
            raise ValueError(f"cannot permute {n} elements")
        self.n = int(n)
        self.half = (max(2, (self.n - 1).bit_length()) + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.random.default_rng(list(key)).integers(0, 2**64, ROUNDS, dtype=np.uint64, endpoint=False)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, i) -> np.ndarray:
        i = np.asarray(i, dtype=np.int64)
        if i.size and (int(i.min()) < 0 or int(i.max()) >= self.n):
            raise IndexError(f"index outside [0, {self.n})")
        x = self._encrypt(i.astype(np.uint64).reshape(-1))
        out = x >= np.uint64(self.n)
        while out.any():  # cycle-walking: at most a few rounds, the domain is < 4n
            x[out] = self._encrypt(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64).reshape(i.shape)

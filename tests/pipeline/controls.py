"""Negative controls for the pipeline tests, kept out of production code: a runtime whose block cache forgets
the gradient deposits of cached blocks. Its runs must FAIL the gradient comparison (the control bites)."""

from __future__ import annotations

from attnres_train.parallel.pipeline.cache import BlockCache
from attnres_train.parallel.pipeline.runtime import PipelineRuntime


class DropDepositsCache(BlockCache):
    """Counts the deposits as usual (the strict invariants still hold) but hands back none of them."""

    def take(self, mb, block):
        super().take(mb, block)
        return None


class DropDepositsRuntime(PipelineRuntime):
    cache_class = DropDepositsCache

"""Wall time spent inside the depth mixing during real training steps (``attnres_overhead.py``'s in-step figure).

Why: on a shared CPU two full steps of the *same* model differ by several percent from one minute to the next
(the bench's ``prenorm_copy`` control shows it), so a 2 % question cannot be settled by comparing whole steps.
Timing the AttnRes work inside each step of the real model measures it under the same cache pressure the
sublayers create, and a slow phase of the machine scales it by the same few percent instead of swamping it.

What is timed (wall, ``perf_counter``): the forward and backward of the hand-differentiated depth-mixing
functions (``attnres_train.model.depth_ops``: source logits, combine, phase 1, phase 2, normalise) and
``SegmentLogits.phase1`` (its logits stack and slices). Nested calls count once. Not timed: autograd's own
gradient accumulation into the block tensors, Python bookkeeping of ``DepthState``; PreNorm's residual adds
(one pass per sublayer) are not subtracted. Only the ``impl=torch`` functions are timed: the reference
(``*_ref`` variants) and the Triton kernels report no in-step figure.
"""

from __future__ import annotations

import functools
import time

from attnres_train.model import depth, depth_ops

_FUNCTIONS = (
    depth_ops._SourceLogits,
    depth_ops._Combine,
    depth_ops._Phase1,
    depth_ops._Phase2,
    depth_ops._Normalise,
)


class DepthTimers:
    """Patch the depth-mixing entry points with wall-clock timers while the context is open.

    ``seconds`` accumulates over every timed call; read it before and after a step. ``calls`` counts the
    outermost timed calls, so a test or a reader can see the timers were hit at all. ``active=False`` patches
    nothing (GPU runs: host timers would time kernel launches, not the work).
    """

    def __init__(self, active: bool = True):
        self.active = active
        self.seconds = 0.0
        self.calls = 0
        self._depth = 0
        self._saved = []

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
                self._depth -= 1

        return timed

    def __enter__(self) -> "DepthTimers":
        if not self.active:
            return self
        for cls in _FUNCTIONS:
            for name in ("forward", "backward"):
                self._saved.append((cls, name, cls.__dict__[name]))
                setattr(cls, name, staticmethod(self._wrap(cls.__dict__[name].__func__)))
        self._saved.append((depth.SegmentLogits, "phase1", depth.SegmentLogits.__dict__["phase1"]))
        depth.SegmentLogits.phase1 = self._wrap(depth.SegmentLogits.__dict__["phase1"])
        return self

    def __exit__(self, *exc) -> None:
        for cls, name, original in reversed(self._saved):
            setattr(cls, name, original)
        self._saved.clear()

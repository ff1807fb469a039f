"""attnres_kernels: Triton kernels for Block AttnRes (phase 1, phase-2 merge, and their backward passes).

Installed under the name ``attnres_kernels`` because ``kernels`` collides with a PyPI package. This package
file stays import-light (no triton import): the model asks :func:`triton_importable` / :func:`interpreted`
to resolve ``model.residual.impl`` and only then imports the kernels (``attnres_kernels.attnres_ops``).

* ``attnres_triton``: the ``@triton.jit`` programs (compiled for CUDA, or interpreted on CPU when
  ``TRITON_INTERPRET=1`` is set when they are first imported: that is how CI tests them).
* ``attnres_ops``: autograd functions with the same contract as ``attnres_train.model.depth.phase1/phase2``
  that save only source references and per-token fp32 scalars (see docs/kernels.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache

__all__ = ["triton_importable", "interpreted", "phase1", "phase2"]


@lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether ``import triton`` works here (cached). Says nothing about a GPU being present."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install (e.g. missing libs) counts as absent
        return False
    return True


def interpreted() -> bool:
    """Whether the kernels run (or, once imported, will run) in Triton's CPU interpreter.

    Decided when ``attnres_kernels.attnres_triton`` is first imported (``TRITON_INTERPRET=1`` then); before
    that, the current environment variable says what the import will do.
    """
    mod = sys.modules.get(__name__ + ".attnres_triton")
    if mod is not None:
        return type(mod.p1_logits_kernel).__name__ == "InterpretedFunction"
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def phase1(blocks, q_sd, eps):
    """Kernel phase 1; see :func:`attnres_kernels.attnres_ops.phase1`."""
    from .attnres_ops import phase1 as _phase1

    return _phase1(blocks, q_sd, eps)


def phase2(stats, partial, q_d, eps, dtype):
    """Kernel phase-2 merge; see :func:`attnres_kernels.attnres_ops.phase2`."""
    from .attnres_ops import phase2 as _phase2

    return _phase2(stats, partial, q_d, eps, dtype)

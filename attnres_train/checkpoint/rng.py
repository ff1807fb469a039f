"""Capture and restore the torch / CUDA / numpy / python RNG states as plain tensors, ints and floats.

Why plain values: the per-rank RNG files are loaded with ``torch.load(weights_only=True)``, which refuses
arbitrary pickled objects. ``random.getstate()`` is ``(version, 625 ints, gauss_next)`` and numpy's legacy
state is ``("MT19937", uint32[624], pos, has_gauss, cached_gaussian)``; both become an int64 tensor plus
scalars, so nothing but tensors, ints, floats, strings and None is ever written.

CUDA states are captured only when CUDA is already initialised (capturing must not initialise a device).
"""

from __future__ import annotations

import random
from typing import Any, Dict

import torch

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None


def capture_rng() -> Dict[str, Any]:
    """This process's RNG states as a dict of tensors / ints / floats (``torch.save``-able, weights_only)."""
    version, py_state, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`. Parts that are absent (or no CUDA device here) are left unchanged."""
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to(torch.uint8))
    if "python" in state:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    if "torch_cuda" in state and torch.cuda.is_available():
        for i, dev_state in enumerate(state["torch_cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(dev_state.to(torch.uint8), i)
    if "numpy" in state and np is not None:
        s = state["numpy"]
        keys = s["keys"].numpy().astype("uint32")
        np.random.set_state((s["kind"], keys, int(s["pos"]), int(s["has_gauss"]), float(s["cached_gaussian"])))

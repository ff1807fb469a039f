"""What one pipeline step keeps and reports: step results, per-(stage, microbatch) records, the pack anchor.

Why a module of its own: the runtime (``runtime.py``) executes actions; these are the plain records it fills and
the one autograd function it needs, plus the counting behind ``PipelineRuntime.held_tensor_stats`` (bytes of
distinct storages, so a view and its base count once). See docs/pipeline.md, "Memory".
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch


class PipelineError(RuntimeError):
    """The pipeline was set up inconsistently (ranks disagree, wrong stages for this rank, bad inputs)."""


@dataclass
class CommStats:
    """What this rank sent in one step: elements per hop and direction, messages, and timing."""

    fwd_elems: Dict[int, int] = field(default_factory=lambda: defaultdict(int))  # hop s (s→s+1) → elements
    bwd_elems: Dict[int, int] = field(default_factory=lambda: defaultdict(int))  # hop s (s+1→s) → elements
    messages: int = 0
    bytes: int = 0
    compute_s: float = 0.0  # time inside F/B/I/W actions minus receive waits (this rank's "busy" time)
    wait_s: float = 0.0  # time blocked waiting for a received tensor
    step_s: float = 0.0  # wall time of the action loop, send completion included

    def as_dict(self) -> dict:
        return {
            "fwd_elems": dict(self.fwd_elems),
            "bwd_elems": dict(self.bwd_elems),
            "messages": self.messages,
            "bytes": self.bytes,
            "compute_s": self.compute_s,
            "wait_s": self.wait_s,
            "step_s": self.step_s,
        }


@dataclass
class StepResult:
    # Σ_m loss_m / M (fp64, detached, 0-dim, on the stages' device: no host sync inside the step; the caller
    # syncs once, e.g. float(loss)); on every rank if reduce=True, else meaningful on the last rank only
    loss: torch.Tensor
    aux_loss: Optional[torch.Tensor]  # Σ over stages and microbatches of aux / M (None if no MoE aux loss)
    stats: CommStats


class _GradSlot:
    """Where a stage's backward finds the gradient received for its outgoing pack (read by :class:`_Anchor`)."""

    __slots__ = ("grad",)

    def __init__(self):
        self.grad: Optional[torch.Tensor] = None


class _Anchor(torch.autograd.Function):
    """A 0-dim backward root that stands in for the sent pack ``stack([p.to(comm_dtype) for p in parts])``.

    Holding the pack itself as the root would keep a copy of every sent block alive until the backward. The
    anchor holds nothing but dtypes; its backward returns slice ``j`` of ``slot.grad`` (the received gradient,
    set right before the backward) cast to part ``j``'s dtype, which is exactly what Stack + ToCopy backward
    would have produced. Call backward on it with an implicit gradient of one.
    """

    @staticmethod
    def forward(ctx, slot: _GradSlot, *parts: torch.Tensor) -> torch.Tensor:
        ctx.slot = slot
        ctx.dtypes = [p.dtype for p in parts]
        return torch.zeros((), dtype=parts[0].dtype, device=parts[0].device)

    @staticmethod
    def backward(ctx, _unused):
        g = ctx.slot.grad
        if g is None:
            raise PipelineError("pipeline anchor: backward ran without the received gradient")
        need = ctx.needs_input_grad[1:]
        return (None, *[g[j].to(dt) if need[j] else None for j, dt in enumerate(ctx.dtypes)])


@dataclass
class _Saved:
    """What one (stage, microbatch) keeps between its forward and its backward (and W when split)."""

    leaf: Optional[torch.Tensor] = None  # the received payload (its .grad is the input gradient)
    cached: Dict[int, torch.Tensor] = field(default_factory=dict)  # fresh leaves read from the cache
    roots: List[torch.Tensor] = field(default_factory=list)
    grads: List[Optional[torch.Tensor]] = field(default_factory=list)
    anchor: Optional[torch.Tensor] = None  # stands in for the sent pack (None: nothing sent needs a gradient)
    slot: Optional[_GradSlot] = None  # received output gradient, read by the anchor's backward
    sends: bool = False  # the stage has an outgoing hop (its backward consumes a received gradient)
    own: Dict[int, torch.Tensor] = field(default_factory=dict)  # produced blocks a later chunk here reads
    pending: Optional[object] = None  # iw_split.PendingW: what I kept for W (split backward only)

    def tensors(self) -> List[torch.Tensor]:
        out = [t for t in (self.leaf, self.anchor) if t is not None]
        out += list(self.cached.values()) + list(self.own.values()) + list(self.roots)
        out += [g for g in self.grads if g is not None]
        if self.slot is not None and self.slot.grad is not None:
            out.append(self.slot.grad)
        return out + (self.pending.held() if self.pending is not None else [])


def _storage_key(t: torch.Tensor):
    try:
        st = t.untyped_storage()
        return (str(t.device), st.data_ptr(), st.nbytes())
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage (DTensor wrappers)
        return ("id", id(t), t.numel() * t.element_size())


def _tally(tensors) -> Dict[str, int]:
    """``tensors`` (count of tensor objects), ``storages`` and ``bytes`` (distinct storages, counted once)."""
    seen = {}
    n = 0
    for t in tensors:
        n += 1
        k = _storage_key(t)
        seen[k] = k[2]
    return {"tensors": n, "storages": len(seen), "bytes": sum(seen.values())}

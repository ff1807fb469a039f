"""Moves the pipeline's packed messages between stages for one rank: tagged c10d P2P, a local mailbox, bounded sends.

Why a module of its own: the runtime decides *what* a stage computes and sends; this class owns *how* a message
travels (tags ``1 + 2·(hop·M + mb) + backward``, same-rank mailbox, batched P2P on CUDA) and how long its buffer
lives (released once the send is known complete, at most ``send_cap`` in flight, ``safe_after`` waits from
:mod:`.send_plan`), so the memory rules can be read and changed in one place. docs/pipeline.md, "The runtime"
(Messages) and "Memory".
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from .actions import Action, Kind
from .layout import PipelineLayout
from .records import CommStats, PipelineError

MsgKey = Tuple[str, int, int]  # ("F" | "B", stage, microbatch)


class StageTransport:
    """Per-step message state of one pipeline rank (cleared by :meth:`release`)."""

    def __init__(
        self, layout: PipelineLayout, rank: int, group, device: torch.device, comm_dtype: torch.dtype, batch_p2p: bool
    ):
        self.layout, self.rank, self.group = layout, rank, group
        self.device, self.comm_dtype, self.batch_p2p = device, comm_dtype, batch_p2p
        self.recvs: Dict[MsgKey, Tuple[torch.Tensor, object]] = {}
        self.outbox: Dict[MsgKey, torch.Tensor] = {}
        self.mailbox: Dict[MsgKey, torch.Tensor] = {}
        self.sends: "OrderedDict[MsgKey, Tuple[object, torch.Tensor]]" = OrderedDict()  # oldest first
        self.safe_after: Dict[MsgKey, List[MsgKey]] = {}
        self.batch: List[Action] = []
        self.send_cap = 2
        self.stats = CommStats()
        self._M = self._B = self._T = 0

    def begin(
        self, M: int, B: int, T: int, send_cap: int, safe_after: Dict[MsgKey, List[MsgKey]], stats: CommStats
    ) -> None:
        """Start a step: message geometry ``[*, B, T, d]`` (T per sequence shard), the send bound and plan."""
        self._M, self._B, self._T = M, B, T
        self.send_cap, self.safe_after = send_cap, {k: list(v) for k, v in safe_after.items()}
        self.stats = stats

    # ------------------------------------------------------------------ actions
    def run(self, a: Action) -> None:
        """Post a SEND/RECV action (queued for one batch on the CUDA path)."""
        if self.batch_p2p:
            self.batch.append(a)  # posted together before the next compute action
            return
        self._post(a, post=None)

    def _post(self, a: Action, post) -> None:
        if a.kind == Kind.RECV_F:
            self._post_recv("F", a.stage, a.mb, hop=a.stage - 1, src_stage=a.stage - 1, post=post)
        elif a.kind == Kind.RECV_B:
            self._post_recv("B", a.stage, a.mb, hop=a.stage, src_stage=a.stage + 1, post=post)
        elif a.kind == Kind.SEND_F:
            self._send("F", a.stage, a.mb, hop=a.stage, dst_stage=a.stage + 1, post=post)
        elif a.kind == Kind.SEND_B:
            self._send("B", a.stage, a.mb, hop=a.stage - 1, dst_stage=a.stage - 1, post=post)
        else:
            raise PipelineError(f"not a transport action: {a}")

    def _tag(self, hop: int, mb: int, backward: bool) -> int:
        return 1 + 2 * (hop * self._M + mb) + int(backward)

    def _post_recv(self, kind: str, stage: int, mb: int, hop: int, src_stage: int, post=None) -> None:
        shape = self.layout.payload_shape(hop, self._B, self._T)
        buf = torch.empty(shape, dtype=self.comm_dtype, device=self.device)
        peer, tag = self.layout.rank_of(src_stage), self._tag(hop, mb, kind == "B")
        if post is not None:  # batched (CUDA) path: the work comes back from the batch
            post(dist.P2POp(dist.irecv, buf, group=self.group, group_peer=peer, tag=tag), ("R", (kind, stage, mb)))
            self.recvs[(kind, stage, mb)] = (buf, None)
            return
        work = dist.irecv(buf, group=self.group, group_src=peer, tag=tag)
        self.recvs[(kind, stage, mb)] = (buf, work)

    def _send(self, kind: str, stage: int, mb: int, hop: int, dst_stage: int, post=None) -> None:
        t = self.outbox.pop((kind, stage, mb))
        peer, tag = self.layout.rank_of(dst_stage), self._tag(hop, mb, kind == "B")
        key = (kind, stage, mb)
        if post is not None:
            post(dist.P2POp(dist.isend, t, group=self.group, group_peer=peer, tag=tag), ("S", key))
            self.sends[key] = (None, t)
        else:
            self.sends[key] = (dist.isend(t, group=self.group, group_dst=peer, tag=tag), t)
        (self.stats.bwd_elems if kind == "B" else self.stats.fwd_elems)[hop] += t.numel()
        self.stats.messages += 1
        self.stats.bytes += t.numel() * t.element_size()
        if post is None:
            self._cap_sends()

    # ------------------------------------------------------------------ send buffers: release early, bound
    def poll_sends(self) -> None:
        """Drop the sends that report completion (NCCL; gloo only reports it from ``wait()``)."""
        done = [k for k, (w, _) in self.sends.items() if w is not None and w.is_completed()]
        for k in done:
            del self.sends[k]

    def _finish_send(self, key: MsgKey) -> None:
        entry = self.sends.pop(key, None)
        if entry is not None and entry[0] is not None:
            entry[0].wait()

    def _cap_sends(self) -> None:
        """At most ``send_cap`` sends in flight: wait the oldest beyond it (module docstring: deadlock-free)."""
        while len(self.sends) > self.send_cap:
            self._finish_send(next(iter(self.sends)))

    def drain_sends(self) -> None:
        while self.sends:
            self._finish_send(next(iter(self.sends)))

    # ------------------------------------------------------------------ batched P2P (CUDA)
    def flush_batch(self) -> None:
        """Post the pending SEND/RECV actions as one ``batch_isend_irecv`` (NCCL: one group; the lowered
        order keeps the per-link order the same on both ends, which is what NCCL matches on)."""
        if not self.batch:
            return
        actions, self.batch = self.batch, []
        ops, keys = [], []

        def post(op, key):
            ops.append(op)
            keys.append(key)

        for a in actions:
            self._post(a, post=post)
        works = dist.batch_isend_irecv(ops) if ops else []
        if len(works) != len(ops):  # coalesced (NCCL): one work for the whole group
            works = [works[0] if works else None] * len(ops)
        for (side, key), work in zip(keys, works):
            if side == "R":
                self.recvs[key] = (self.recvs[key][0], work)
            else:
                self.sends[key] = (work, self.sends[key][1])
        self._cap_sends()

    # ------------------------------------------------------------------ what compute actions call
    def emit(self, kind: str, stage: int, mb: int, t: torch.Tensor) -> None:
        """Hand a message to the next (F) or previous (B) stage: the outbox for a SEND, the mailbox if local."""
        peer = stage + 1 if kind == "F" else stage - 1
        if self.layout.rank_of(peer) == self.rank:
            self.mailbox[(kind, peer, mb)] = t.detach().clone()
        else:
            self.outbox[(kind, stage, mb)] = t.detach().contiguous()

    def receive(self, kind: str, stage: int, mb: int) -> torch.Tensor:
        """The message for ``(kind, stage, mb)``: waits for its receive, then frees the sends it made safe."""
        key = (kind, stage, mb)
        if key in self.mailbox:
            return self.mailbox.pop(key)
        try:
            buf, work = self.recvs.pop(key)
        except KeyError:
            raise PipelineError(
                f"rank {self.rank}: no receive posted for {stage}{kind}{mb} (schedule and runtime disagree)"
            ) from None
        t0 = time.perf_counter()
        work.wait()
        self.stats.wait_s += time.perf_counter() - t0
        for send in self.safe_after.pop(key, ()):  # the peer posted these sends' receives before this message
            self._finish_send(send)
        return buf

    # ------------------------------------------------------------------ accounting and cleanup
    def held(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(send-side buffers, receive-side buffers) held right now."""
        sends = [t for _, t in self.sends.values()] + list(self.outbox.values())
        recvs = [b for b, _ in self.recvs.values()] + list(self.mailbox.values())
        return sends, recvs

    def leftovers(self) -> List[str]:
        return (
            [f"recv{k}" for k in self.recvs]
            + [f"outbox{k}" for k in self.outbox]
            + [f"mailbox{k}" for k in self.mailbox]
        )

    def release(self) -> None:
        self.recvs.clear()
        self.outbox.clear()
        self.mailbox.clear()
        self.sends.clear()
        self.safe_after = {}
        self.batch = []

    def is_empty(self) -> bool:
        return not (self.recvs or self.outbox or self.mailbox or self.sends or self.batch)


def resolve_group(group):
    """Accept ``None`` (the default group), a ProcessGroup, or a 1-D DeviceMesh."""
    if group is not None and hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise PipelineError(f"the pipeline needs a 1-D pp mesh, got a {group.ndim}-D DeviceMesh; pass mesh['pp']")
        return group.get_group()
    return group


__all__ = ["StageTransport", "resolve_group", "MsgKey"]

"""Executes a lowered schedule on one pipeline rank: what each stage computes, sends, caches and deposits.

Why a module of its own: what runs when is data (:mod:`.schedules`), how a message travels is
:class:`~.transport.StageTransport`, the block cache is :mod:`.cache`; this class gives each action its meaning:
a stage's forward with its packed hop, its backward with the gradient-routing rules (P, D, R), the I/W split,
loss and aux scaling, tied embeddings, and the per-step lifetime (everything freed in a ``finally``; what is held
is bounded by the schedule's in-flight depth, not by M). docs/pipeline.md, "The runtime" and "Memory";
derivation in the design note ``pipeline_cache.md`` §6.4.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ...model.depth import DepthState
from .actions import Action, Kind, Schedule
from .cache import BlockCache
from .checker import check
from .generators import forward_only, make_schedule
from .iw_split import backward_input, backward_weight
from .layout import PipelineLayout
from .lowering import lower
from .records import CommStats, PipelineError, StepResult, _Anchor, _GradSlot, _Saved, _tally
from .send_plan import inflight_depth, safe_send_waits
from .stage import PipelineStageModule
from .transport import StageTransport, resolve_group

Microbatch = Tuple[torch.Tensor, torch.Tensor]  # (input_ids [B,T], labels [B,T])


class PipelineRuntime:
    """Runs pipeline steps for this rank's stages.

    Args:
        stages: this rank's :class:`PipelineStageModule` s (any order; must be ``layout.stages_of(rank)``).
        layout: the shared :class:`PipelineLayout` (``layout.block_cache`` selects cached vs naive hops).
        schedule: ``gpipe`` | ``1f1b`` | ``interleaved_1f1b`` | ``zb_h1`` | ``zb_v`` or ``dualpipev`` (these two
            need ``layout.placement == "v"``), or a callable ``(P, V, M) -> Schedule`` (its ``placement`` must
            equal the layout's).
        group: the pipeline process group, a 1-D ``DeviceMesh``, or ``None`` for the default group.
        comm_dtype: dtype of the packed messages (default: the stages' parameter dtype).
        split_iw / w_delay: run backward as I + W (zero-bubble hook, see ``generators.split_backward``).
        max_pending_sends: at most this many sends in flight per rank (default: the rank's in-flight depth, the
            most chunk-forwards it holds at once in the schedule, at least 2); beyond it the oldest is waited.
        batch_p2p: post the SEND/RECV actions that are adjacent in the lowered order with one
            ``batch_isend_irecv`` (default: on when the stages are on CUDA; gloo keeps tagged ``isend``/``irecv``).
        track_held: record ``held_peak`` (sampled after every action; costs a scan of the held tensors).
        strict: check cache invariants (deposit counts, nothing left over) every step.
        seq_shards: the boundary tensors hold ``T / seq_shards`` positions (sequence parallelism: each tp
            rank sends its own sequence shard to the same tp rank of the next stage).
        before_last_backward: ``fn(stage)`` called right before the last backward action (B, or W when
            split) of each stage in a step (FSDP: turn gradient reduction back on for that stage).
    """

    cache_class = BlockCache  # the per-step block cache (a subclass can alter it, e.g. the tests' negative control)

    def __init__(
        self,
        stages: Sequence[PipelineStageModule],
        layout: PipelineLayout,
        schedule="interleaved_1f1b",
        group=None,
        *,
        comm_dtype: Optional[torch.dtype] = None,
        group_size: Optional[int] = None,
        split_iw: bool = False,
        w_delay: Optional[int] = None,
        strict: bool = True,
        seq_shards: int = 1,
        before_last_backward=None,
        max_pending_sends: Optional[int] = None,
        batch_p2p: Optional[bool] = None,
        track_held: bool = False,
    ):
        self.group = resolve_group(group)
        distributed = dist.is_available() and dist.is_initialized()
        self.P = dist.get_world_size(self.group) if distributed else 1
        self.rank = dist.get_rank(self.group) if distributed else 0
        if self.P != layout.num_ranks:
            raise PipelineError(f"layout is for {layout.num_ranks} pipeline ranks, the group has {self.P}")
        self.layout = layout
        self.stages = {st.stage: st for st in stages}
        expected = layout.stages_of(self.rank)
        if sorted(self.stages) != expected:
            raise PipelineError(f"rank {self.rank} must hold stages {expected}, got {sorted(self.stages)}")
        self.C = layout.num_stages
        self._last_stage = expected[-1]  # this rank's last chunk: after its forward, nothing here reads the cache
        self.schedule_name = schedule
        self.group_size = group_size
        self.split_iw = split_iw
        self.w_delay = w_delay
        self.strict = strict
        self.seq_shards = seq_shards
        self.before_last_backward = before_last_backward
        params = [p for st in stages for p in st.parameters()]
        self.device = params[0].device if params else torch.device("cpu")
        self.comm_dtype = comm_dtype or next((p.dtype for p in params if p.is_floating_point()), torch.float32)
        model = stages[0].full_model
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self._schedules: Dict[Tuple[int, bool], Schedule] = {}
        self._verified: set = set()
        self._send_plans: Dict[Tuple[int, bool], Tuple[int, Dict[tuple, List[tuple]]]] = {}
        self._global_has_aux: Dict[Tuple[bool, bool], bool] = {}
        self.max_pending_sends = max_pending_sends
        self.batch_p2p = (self.device.type == "cuda") if batch_p2p is None else bool(batch_p2p)
        self.track_held = track_held
        self.held_peak: Dict[str, Dict[str, int]] = {}
        self.held_at_end: Dict[str, Dict[str, int]] = {}
        # per-step state (always cleared in a finally)
        self._cache: Optional[BlockCache] = None
        self._saved: Dict[Tuple[int, int], _Saved] = {}
        self._tx = StageTransport(layout, self.rank, self.group, self.device, self.comm_dtype, self.batch_p2p)

    # ------------------------------------------------------------------ schedules
    def schedule_for(self, M: int, eval_mode: bool = False) -> Schedule:
        """The lowered, globally checked schedule for ``M`` microbatches (built once, then cached)."""
        key = (M, eval_mode)
        if key not in self._schedules:
            P, V = self.layout.num_ranks, self.layout.virtual_stages
            if eval_mode:
                sched = forward_only(P, V, M, self.layout.placement)
            elif callable(self.schedule_name):
                sched = self.schedule_name(P, V, M)
            else:
                sched = make_schedule(self.schedule_name, P, V, M, self.group_size, self.split_iw, self.w_delay)
            if sched.placement != self.layout.placement:
                raise PipelineError(
                    f"schedule {sched.name} places stages by {sched.placement!r} but the layout by "
                    f"{self.layout.placement!r}; build the layout with "
                    f"placement=schedules.schedule_placement(schedule)"
                )
            lowered = lower(sched)
            check(lowered, self.layout if not eval_mode else None)
            self._schedules[key] = lowered
        return self._schedules[key]

    def inflight_depth(self, M: int, eval_mode: bool = False) -> int:
        """The most (stage, microbatch) forwards this rank holds at once in the schedule (forwards run minus
        last backward passes, B or W), i.e. the schedule's in-flight depth on this rank."""
        return 0 if eval_mode else inflight_depth(self.schedule_for(M, eval_mode), self.rank)

    def _send_plan(self, M: int, eval_mode: bool) -> Tuple[int, Dict[tuple, List[tuple]]]:
        """(send cap, ``recv key -> sends now safe to wait``) for this step shape (``send_plan.safe_send_waits``)."""
        key = (M, eval_mode)
        if key not in self._send_plans:
            cap = self.max_pending_sends or max(2, self.inflight_depth(M, eval_mode))
            self._send_plans[key] = (cap, safe_send_waits(self.schedule_for(M, eval_mode), self.layout, self.rank))
        return self._send_plans[key]

    def _verify_agreement(self, M: int, B: int, T: int) -> None:
        """Fail fast if ranks disagree on the layout, microbatch geometry or message dtype (once per shape)."""
        key = (M, B, T)
        if key in self._verified or self.P == 1:
            return
        sched = (
            self.schedule_name
            if isinstance(self.schedule_name, str)
            else getattr(self.schedule_name, "__name__", "custom")
        )
        text = f"{self.layout.fingerprint()}|{M}|{B}|{T}|{self.comm_dtype}|{sched}|{self.split_iw}|{self.group_size}"
        h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "big")
        t = torch.tensor([h, -h], dtype=torch.int64, device=self._coll_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        if int(t[0]) != h or int(t[1]) != -h:
            raise PipelineError(
                f"pipeline ranks disagree on layout/microbatches/dtype (rank {self.rank}: {text}); "
                f"every rank must build the same layout and pass microbatches of the same shape"
            )
        self._verified.add(key)

    def _coll_device(self):
        backend = dist.get_backend(self.group)
        return self.device if backend == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ the step
    def step(self, microbatches: Sequence[Microbatch], eval_mode: bool = False, reduce: bool = True) -> StepResult:
        """Forward and backward of all microbatches (gradients accumulate into ``.grad``), or, with
        ``eval_mode``, forward only under ``no_grad``. Every pp rank passes the same microbatch list (middle
        ranks only read the shapes). Returns the mean loss (reduced over the pp group if ``reduce``)."""
        M = len(microbatches)
        if M == 0:
            raise PipelineError("need at least one microbatch")
        B, T = microbatches[0][0].shape
        if T % self.seq_shards:
            raise PipelineError(f"sequence length {T} does not split into {self.seq_shards} sequence shards")
        self._verify_agreement(M, B, T)
        sched = self.schedule_for(M, eval_mode)
        self._M, self._B, self._T, self._mbs = M, B, T // self.seq_shards, microbatches
        self._grad_left = defaultdict(int)
        for a in sched.ranks[self.rank]:
            if a.kind in (Kind.B, Kind.W):  # the passes that finish weight gradients (DualPipeV has both)
                self._grad_left[a.stage] += 1
        self._stats = CommStats()
        # accumulated on the device: no host sync per microbatch (the caller syncs once per step)
        self._loss = torch.zeros((), dtype=torch.float64, device=self.device)
        self._aux = torch.zeros((), dtype=torch.float64, device=self.device)
        self._has_aux = False
        send_cap, safe_after = self._send_plan(M, eval_mode)
        self._tx.begin(M, B, T // self.seq_shards, send_cap, safe_after, self._stats)
        self._cache = self.cache_class(self.layout, self.rank, strict=self.strict)
        self.held_peak, self.held_at_end = {}, {}
        t0 = time.perf_counter()
        try:
            ctx = torch.no_grad() if eval_mode else torch.enable_grad()
            with ctx:
                for action in sched.ranks[self.rank]:
                    self._run(action)
                    if self.track_held:
                        self._sample_held()
                self._tx.flush_batch()
            self._tx.drain_sends()
            self._stats.step_s = time.perf_counter() - t0
            self.held_at_end = self.held_tensor_stats()
            if self.strict:
                self._assert_clean()
        finally:
            self._release()
        if not eval_mode and self.tied and self.P > 1:
            self._sum_tied_grads()
        loss, aux = self._loss, self._aux
        if reduce and self.P > 1:
            flag = torch.full((), float(self._has_aux), dtype=torch.float64, device=loss.device)
            t = torch.stack([loss, aux, flag]).to(self._coll_device())
            dist.all_reduce(t, group=self.group)
            loss, aux = t[0].to(self.device), t[1].to(self.device)
            # whether any rank has an aux loss is a property of the model: sync on it once, not every step
            key = (eval_mode, self._has_aux)
            if key not in self._global_has_aux:
                self._global_has_aux[key] = bool(t[2] > 0)
            has = self._global_has_aux[key]
        else:
            has = self._has_aux
        return StepResult(loss=loss, aux_loss=aux if has else None, stats=self._stats)

    # ------------------------------------------------------------------ what the runtime holds
    def held_tensor_stats(self) -> Dict[str, Dict[str, int]]:
        """Tensors the runtime itself holds right now, by category, each ``{"tensors", "storages", "bytes"}``
        (bytes of distinct storages; a view and its base count once):

        * ``sends``: buffers of posted sends not yet known complete (plus unsent outbox entries);
        * ``recvs``: posted receive buffers not yet consumed (plus same-rank mailbox entries);
        * ``cache``: the block cache's values (aliases of saved tensors) and gradient deposits;
        * ``saved``: per (stage, microbatch) forward state kept for the backward; ``records`` counts them;
        * ``pending_w``: of ``saved``, what ``I`` passes keep for their ``W`` (the intermediate gradients);
        * ``total``: all of the above, every storage counted once.

        Autograd's own saved activations are not included (they hang off the saved roots). Between steps
        everything is 0.
        """
        sends, recvs = self._tx.held()
        cache = []
        if self._cache is not None:
            cache = list(self._cache.values.values()) + list(self._cache.deposits.values())
        saved = [t for rec in self._saved.values() for t in rec.tensors()]
        pending = [t for rec in self._saved.values() if rec.pending is not None for t in rec.pending.held()]
        out = {
            "sends": _tally(sends),
            "recvs": _tally(recvs),
            "cache": _tally(cache),
            "saved": _tally(saved),
            "pending_w": _tally(pending),
            "total": _tally(sends + recvs + cache + saved),
        }
        out["saved"]["records"] = len(self._saved)
        return out

    def _sample_held(self) -> None:
        now = self.held_tensor_stats()
        for cat, vals in now.items():
            peak = self.held_peak.setdefault(cat, {})
            for k, v in vals.items():
                peak[k] = max(peak.get(k, 0), v)

    def _release(self) -> None:
        if self._cache is not None:
            self._cache.clear()
        self._cache = None
        self._saved.clear()
        self._tx.release()
        self._mbs = None

    def _assert_clean(self) -> None:
        self._cache.assert_empty()
        left = [f"saved{k}" for k in self._saved] + self._tx.leftovers()
        if left:
            raise PipelineError(f"rank {self.rank}: state left at the end of the step: {left[:8]}")

    # ------------------------------------------------------------------ actions
    def _run(self, a: Action) -> None:
        k = a.kind
        self._tx.poll_sends()
        if k in (Kind.RECV_F, Kind.RECV_B, Kind.SEND_F, Kind.SEND_B):
            self._tx.run(a)
        else:
            self._tx.flush_batch()  # the CUDA path posts the queued SEND/RECV actions before compute
            t0, w0 = time.perf_counter(), self._stats.wait_s
            if k in (Kind.B, Kind.W):
                self._grad_left[a.stage] -= 1
                if self._grad_left[a.stage] == 0 and self.before_last_backward is not None:
                    self.before_last_backward(a.stage)
            if k == Kind.F:
                self._forward(a.stage, a.mb)
            elif k in (Kind.B, Kind.I):
                self._backward(a.stage, a.mb, split=(k == Kind.I))
            elif k == Kind.W:
                self._weight(a.stage, a.mb)
            self._stats.compute_s += time.perf_counter() - t0 - (self._stats.wait_s - w0)

    # ------------------------------------------------------------------ compute
    def _forward(self, s: int, m: int) -> None:
        L, cache, st = self.layout, self._cache, self.stages[s]
        ids, labels = self._mbs[m]
        rec = _Saved()
        grad = torch.is_grad_enabled()
        if s == 0:
            out = st(input_ids=ids.to(self.device), labels=labels.to(self.device) if st.is_last else None)
        else:
            x = self._tx.receive("F", s, m).requires_grad_(grad)
            delta_in = L.delta(s - 1)
            blocks: Dict[int, torch.Tensor] = {b: x[j] for j, b in enumerate(delta_in)}
            partial = x[len(delta_in)] if L.partial(s - 1) else None
            for b in L.have(s):
                rec.cached[b] = blocks[b] = cache.read(m, b)
            for j, b in enumerate(delta_in):
                cache.put(m, b, x[j])  # this stage is block b's entry on this rank
            state = DepthState(blocks=[blocks[b] for b in range(L.count(s - 1))], partial=partial)
            out = st(
                state,
                input_ids=ids.to(self.device),  # the ids: document masking on later stages
                labels=labels.to(self.device) if st.is_last else None,
            )
            rec.leaf = x
        aux_root = None
        if out.aux_loss is not None:
            self._has_aux = True
            self._aux += out.aux_loss.detach().to(self._aux.device, torch.float64) / self._M
            aux_root = out.aux_loss / self._M
        if st.is_last:
            self._loss += out.loss.detach().to(self._loss.device, torch.float64) / self._M
            root = out.loss / self._M
            rec.roots, rec.grads = [root if aux_root is None else root + aux_root], [None]
        else:
            state = st.wire_state(out.state)  # outside the stage's forward: its outputs stay the model's tensors
            for b in L.commits(s):
                cache.put(m, b, state.blocks[b])  # produced here: this stage is the entry
                if grad and cache.is_read(b):  # rule P needs it only if a later chunk here reads it
                    rec.own[b] = state.blocks[b]
            parts = [state.blocks[b] for b in L.delta(s)] + ([state.partial] if L.partial(s) else [])
            if len(parts) != L.payload_len(s):
                raise PipelineError(f"stage {s}: boundary state does not match the layout")
            with torch.no_grad():  # a detached copy: it lives only until its send completes
                pack = (
                    torch.stack([p.detach().to(self.comm_dtype) for p in parts])
                    if parts
                    else torch.zeros((0, self._B, self._T, L.hidden_size), dtype=self.comm_dtype, device=self.device)
                )
            self._tx.emit("F", s, m, pack)
            rec.sends = True
            if grad and any(p.requires_grad for p in parts):
                rec.slot = _GradSlot()
                rec.anchor = _Anchor.apply(rec.slot, *parts)
            if aux_root is not None:
                rec.roots, rec.grads = [aux_root], [None]
        if s == self._last_stage:
            cache.evict(m)  # this rank's last chunk has read everything it needs for microbatch m
        if grad:
            self._saved[(s, m)] = rec

    def _backward(self, s: int, m: int, split: bool) -> None:
        L, cache = self.layout, self._cache
        rec = self._saved[(s, m)] if split else self._saved.pop((s, m))
        roots, grads = list(rec.roots), list(rec.grads)
        if rec.sends:
            g = self._tx.receive("B", s, m)
            if rec.anchor is not None:
                rec.slot.grad = g
                roots.append(rec.anchor)
                grads.append(None)  # 0-dim root: implicit one; the anchor's backward reads slot.grad
            rec.anchor = None
            for b, t in rec.own.items():  # rule P: deposits of later readers of blocks produced here
                d = cache.take(m, b)
                if d is not None:
                    roots.append(t)
                    grads.append(d.to(t.dtype))
            rec.own = {}
        inputs = ([rec.leaf] if rec.leaf is not None else []) + list(rec.cached.values())
        if not roots:  # nothing on this stage depends on parameters or inputs (degenerate empty stage)
            gin, cached_grads = None, [None] * len(rec.cached)
            rec.roots, rec.grads = [], []
        elif split:  # I: input side only; W later runs only the weight branches (iw_split)
            params = [p for p in self.stages[s].parameters() if p.requires_grad]
            got, rec.pending = backward_input(roots, grads, inputs, params)
            gin = got[0] if rec.leaf is not None else None
            cached_grads = list(got[1:] if rec.leaf is not None else got)
            rec.roots, rec.grads = [], []  # PendingW keeps them only for unsplittable weights
        else:
            torch.autograd.backward(roots, grads)
            gin = rec.leaf.grad if rec.leaf is not None else None
            cached_grads = [c.grad for c in rec.cached.values()]
            rec.roots, rec.grads, rec.slot = [], [], None
        for b, cg in zip(rec.cached, cached_grads):  # rule D
            cache.deposit(m, b, cg)
        if s > 0:
            gin = torch.zeros_like(rec.leaf) if gin is None else gin.detach().clone()
            for j, b in enumerate(L.delta(s - 1)):  # rule R: deposits of blocks received here
                d = cache.take(m, b)
                if d is not None:
                    gin[j] += d.to(gin.dtype)
            self._tx.emit("B", s, m, gin)
        rec.leaf = None  # W (split) needs only the roots, their gradients and the anchor's slot
        rec.cached = {}

    def _weight(self, s: int, m: int) -> None:
        rec = self._saved.pop((s, m))
        if rec.pending is not None:
            backward_weight(rec.pending)
        rec.pending, rec.roots, rec.grads, rec.slot = None, [], [], None

    # ------------------------------------------------------------------ tied embeddings
    def _tied_param(self) -> Optional[torch.nn.Parameter]:
        if 0 in self.stages:
            return self.stages[0].model.embed_tokens.weight
        if self.C - 1 in self.stages:
            return self.stages[self.C - 1].lm_head.weight
        return None

    def _tied_peer(self) -> Optional[int]:
        if self.rank == 0:
            return self.layout.rank_of(self.C - 1)
        if self.rank == self.layout.rank_of(self.C - 1):
            return 0
        return None

    def _sum_tied_grads(self) -> None:
        """All-reduce (sum) of the embedding gradient between the first and the last pipeline rank."""
        p, peer = self._tied_param(), self._tied_peer()
        if p is None or peer is None or peer == self.rank:
            return
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = _local(p.grad)  # FSDP / TP shards: both ends hold the same shard of the same tensor
        mine = g.detach().clone()
        other = torch.empty_like(mine)
        tag = 2 * self.C * self._M + 7
        ops = [
            dist.P2POp(dist.isend, mine, group=self.group, group_peer=peer, tag=tag),
            dist.P2POp(dist.irecv, other, group=self.group, group_peer=peer, tag=tag),
        ]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        g.add_(other)

    def sync_tied_weights(self) -> None:
        """Copy the embedding from rank 0 to the last rank's head copy (call once after initialisation)."""
        if not self.tied or self.P == 1:
            return
        p, peer = self._tied_param(), self._tied_peer()
        if p is None or peer is None or peer == self.rank:
            return
        with torch.no_grad():
            local = _local(p.data)
            if self.rank == 0:
                dist.send(local.contiguous(), group=self.group, group_dst=peer, tag=3)
            else:
                buf = torch.empty_like(local)
                dist.recv(buf, group=self.group, group_src=peer, tag=3)
                local.copy_(buf)


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP / TP), or ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def pipeline_step(
    stages: Sequence[PipelineStageModule],
    microbatches: Sequence[Microbatch],
    layout: PipelineLayout,
    schedule="interleaved_1f1b",
    group=None,
    **kwargs,
) -> StepResult:
    """One-off convenience: build a :class:`PipelineRuntime` and run one training step. Keep a runtime around
    in a training loop (it caches the lowered schedules and the cross-rank layout check)."""
    return PipelineRuntime(stages, layout, schedule, group, **kwargs).step(microbatches)

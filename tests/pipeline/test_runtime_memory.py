"""What the pipeline runtime holds per rank is bounded by the schedule's in-flight depth, not by M.

Interleaved 1F1B (V = 2), M = 4, 8, 16, on 2 and 4 gloo ranks. Measured from the outside: every tensor handed to
``dist.isend``/``dist.irecv`` (monkeypatched in the rank process) is tracked by a weakref, and the live ones must
stay within bounds computed here from the lowered schedule alone: the send cap ``max(2, D_r)`` (``D_r``: the most
chunk-forwards of rank r without their backward, max over prefixes of #F - #B) and ``R_r`` (posted receives whose
stage has not run its backward). Also: end-of-step held bytes 0 for every M, the peak bound written out in
docs/pipeline.md ("Memory", tests), no host sync in ``runtime.py`` during a step, and batched P2P = tagged P2P.
"""

from __future__ import annotations

import gc
import sys
import weakref

import pytest
import torch

from attnres_train.parallel.pipeline.schedules import Kind, lower, make_schedule
from attnres_train.parallel.pipeline.send_plan import held_bytes_bound
from tests.distributed import run_distributed

MS = (4, 8, 16)
V = 2


# --------------------------------------------------------------------------------------------- schedule side
def schedule_depths(P: int, M: int, rank: int) -> dict:
    """D_r, R_r, Q_r of the interleaved 1F1B schedule, from the lowered action list only."""
    acts = lower(make_schedule("interleaved_1f1b", P, V, M)).ranks[rank]
    depth = D = 0
    live_recv, R = set(), 0  # posted receive buffers whose (stage, mb) backward has not run
    unconsumed, Q = set(), 0  # posted receives not yet consumed by their compute action
    for a in acts:
        if a.kind == Kind.F:
            depth += 1
            unconsumed.discard(("F", a.stage, a.mb))
        elif a.kind == Kind.B:
            depth -= 1
            unconsumed.discard(("B", a.stage, a.mb))
            live_recv -= {("F", a.stage, a.mb), ("B", a.stage, a.mb)}
        elif a.kind in (Kind.RECV_F, Kind.RECV_B):
            key = ("F" if a.kind == Kind.RECV_F else "B", a.stage, a.mb)
            live_recv.add(key)
            unconsumed.add(key)
        D, R, Q = max(D, depth), max(R, len(live_recv)), max(Q, len(unconsumed))
    return {"D": D, "R": R, "Q": Q}


# --------------------------------------------------------------------------------------------- rank side
class _Tracker:
    """Weakrefs to every tensor given to isend / irecv; the peak number alive at any send/receive call."""

    def __init__(self):
        self.sent, self.recv = [], []
        self.peak_sent = self.peak_recv = 0

    @staticmethod
    def _alive(refs) -> int:
        return sum(r() is not None for r in refs)

    def note(self) -> None:
        self.peak_sent = max(self.peak_sent, self._alive(self.sent))
        self.peak_recv = max(self.peak_recv, self._alive(self.recv))

    def alive(self):
        gc.collect()
        return self._alive(self.sent), self._alive(self.recv)


class _SyncCounter:
    """Counts host-sync tensor calls made from ``runtime.py`` (the caller's frame)."""

    NAMES = ("cpu", "item", "tolist", "__float__", "__int__", "__bool__")

    def __init__(self):
        self.count = 0
        self.where = []
        self._orig = {}

    def __enter__(self):
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)
            self._orig[name] = orig

            def wrapper(t, *a, _orig=orig, _name=name, **k):
                f = sys._getframe(1)
                if f.f_code.co_filename.replace("\\", "/").endswith("parallel/pipeline/runtime.py"):
                    self.count += 1
                    self.where.append(f"{_name}@{f.f_lineno}")
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, orig in self._orig.items():
            setattr(torch.Tensor, name, orig)


def _patch_p2p(tracker: _Tracker):
    """Wrap isend / irecv (both the ``torch.distributed`` names and the c10d module's, which P2POp checks)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    orig_isend, orig_irecv = c10d.isend, c10d.irecv

    def isend(tensor, *a, **k):
        tracker.note()
        tracker.sent.append(weakref.ref(tensor))
        return orig_isend(tensor, *a, **k)

    def irecv(tensor, *a, **k):
        tracker.note()
        tracker.recv.append(weakref.ref(tensor))
        return orig_irecv(tensor, *a, **k)

    for mod in (dist, c10d):
        mod.isend, mod.irecv = isend, irecv

    def restore():
        for mod in (dist, c10d):
            mod.isend, mod.irecv = orig_isend, orig_irecv

    return restore


def memory_body(P: int, Ms, batch_check: bool) -> dict:
    import torch.distributed as dist

    from attnres_train.parallel.pipeline import PipelineRuntime, build_stages
    from tests.pipeline.common import Case, make_microbatches, make_model, param_names

    rank = dist.get_rank()
    out = {"per_M": {}}
    for M in Ms:
        case = Case(f"mem-p{P}-m{M}", P, V, M, L=8, block_size=2)
        model = make_model(case.cfg(), torch.float64)
        layout = case.layout()
        stages = build_stages(model, layout, rank)
        rt = PipelineRuntime(stages, layout, "interleaved_1f1b", track_held=True)
        mbs = make_microbatches(M)
        rt.step(mbs)  # first step: the one-time layout check and aux-presence sync happen here
        for p in model.parameters():
            p.grad = None
        tracker = _Tracker()
        restore = _patch_p2p(tracker)
        try:
            with _SyncCounter() as syncs:
                res = rt.step(mbs)
        finally:
            restore()
        alive_sent, alive_recv = tracker.alive()
        out["per_M"][M] = {
            "peak_sent_alive": tracker.peak_sent,
            "peak_recv_alive": tracker.peak_recv,
            "alive_sent_after": alive_sent,
            "alive_recv_after": alive_recv,
            "n_sent": len(tracker.sent),
            "held_peak": rt.held_peak,
            "held_at_end": rt.held_at_end,
            "held_after": rt.held_tensor_stats(),
            "syncs": syncs.count,
            "sync_sites": syncs.where[:5],
            "loss_dtype": str(res.loss.dtype),
            "loss_dim": res.loss.dim(),
            "loss_device_ok": res.loss.device == next(model.parameters()).device,
        }
    if batch_check:  # the batched (CUDA-style) P2P path on gloo equals the tagged isend/irecv path
        M = Ms[0]
        case = Case("mem-batch", P, V, M, L=8, block_size=2)
        got = {}
        for batched in (False, True):
            model = make_model(case.cfg(), torch.float64)
            layout = case.layout()
            stages = build_stages(model, layout, rank)
            rt = PipelineRuntime(stages, layout, "interleaved_1f1b", batch_p2p=batched)
            res = rt.step(make_microbatches(M))
            names = param_names(model)
            got[batched] = (
                float(res.loss),
                {names[id(p)]: p.grad.clone() for st in stages for p in st.parameters() if p.grad is not None},
            )
        out["batch_same"] = (
            got[False][0] == got[True][0]
            and got[False][1].keys() == got[True][1].keys()
            and all(torch.equal(got[False][1][n], got[True][1][n]) for n in got[False][1])
        )
    return out


# --------------------------------------------------------------------------------------------- checks
def _check(P: int, results) -> None:
    from tests.pipeline.common import BATCH, HIDDEN, SEQ, Case

    layout = Case("x", P, V, 4, L=8, block_size=2).layout()
    u = BATCH * SEQ * HIDDEN * torch.finfo(torch.float64).bits // 8
    pmax = max(layout.payload_len(s) for s in range(layout.num_stages - 1))
    nb = layout.num_blocks
    for r, res in enumerate(results):
        if "batch_same" in res:
            assert res["batch_same"], f"rank {r}: batched P2P gives different loss/gradients"
        peaks = {}
        for M in MS:
            got, d = res["per_M"][M], schedule_depths(P, M, r)
            K = max(2, d["D"])
            where = f"P={P} rank {r} M={M} (D={d['D']}, R={d['R']}, Q={d['Q']}, K={K})"
            # outside view: tensors handed to isend / irecv
            assert got["peak_sent_alive"] <= K, f"{where}: {got['peak_sent_alive']} sent buffers alive at once"
            assert got["peak_recv_alive"] <= d["R"], f"{where}: {got['peak_recv_alive']} receive buffers alive"
            assert got["alive_sent_after"] == 0 and got["alive_recv_after"] == 0, f"{where}: buffers outlive step"
            # the runtime's introspection
            end, after, peak = got["held_at_end"], got["held_after"], got["held_peak"]
            assert end["total"]["bytes"] == 0 and end["total"]["tensors"] == 0, f"{where}: held at end {end}"
            assert after["total"]["bytes"] == 0 and after["total"]["tensors"] == 0, f"{where}: held after {after}"
            assert peak["saved"]["records"] <= d["D"], f"{where}: {peak['saved']['records']} saved records"
            assert peak["sends"]["tensors"] <= K + 1, f"{where}: {peak['sends']} pending sends"
            bound = u * ((K + 1) * pmax + d["Q"] * pmax + d["D"] * (pmax + 2 * nb)) + 64 * d["D"]
            # what attnres-plan --simulate-rank reports is this same bound
            assert held_bytes_bound(lower(make_schedule("interleaved_1f1b", P, V, M)), layout, r, u) == bound
            assert 0 < peak["total"]["bytes"] <= bound, f"{where}: peak {peak['total']['bytes']} > bound {bound}"
            # host syncs and the loss
            assert got["syncs"] == 0, f"{where}: host syncs inside runtime.py: {got['sync_sites']}"
            assert got["loss_dtype"] == "torch.float64" and got["loss_dim"] == 0 and got["loss_device_ok"]
            regime = tuple(schedule_depths(P, M, q)["D"] for q in range(P))
            peaks.setdefault(regime, []).append((M, peak))
        # independent of M: once every rank's in-flight depth has saturated (the same for all ranks' D), the
        # peak is identical for every M; the end-of-step bytes are 0 for every M (checked above)
        for regime, rows in peaks.items():
            first = rows[0][1]
            for M, peak in rows[1:]:
                assert peak == first, f"P={P} rank {r}: peak at M={M} differs from M={rows[0][0]} (D={regime})"
        assert len(peaks[regime]) >= 2, f"P={P}: fewer than two M values reach the saturated depth {regime}"
        sends = [res["per_M"][M]["n_sent"] for M in MS]
        assert sends == sorted(sends) and sends[-1] > sends[0], "the number of sends should grow with M"


def test_held_tensors_bounded_by_inflight_depth_p2():
    results = run_distributed(memory_body, 2, 2, MS, True, timeout=300.0)
    _check(2, results)


@pytest.mark.slow
def test_held_tensors_bounded_by_inflight_depth_p4():
    results = run_distributed(memory_body, 4, 4, MS, False, timeout=400.0)
    _check(4, results)

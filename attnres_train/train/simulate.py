"""Dry run of ONE rank of a huge layout in one CPU process: build, parallelise, materialise, count bytes.

Why: "does rank R of the 48B preset on 1,024 GPUs fit?" is answered by the code that will run (the trainer's
own ``build_train_module`` under torch's ``fake`` process group), not only by ``attnres-plan``'s formulas.
Lives in train/ because it builds the train module. Details and an example: docs/launch.md, "Dry run of one
rank".
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..model import build_model
from ..parallel.init import local_bytes
from ..parallel.mesh import build_parallel_context
from .train_module import build_train_module


@dataclass
class SimulatedRank:
    rank: int
    world_size: int
    pp_rank: int
    bytes: Dict[str, int] = field(default_factory=dict)  # parameters, gradients, optimizer
    largest_tensor_bytes: int = 0
    full_model_bytes: int = 0
    peak_rss_bytes: int = 0
    seconds: float = 0.0


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _tensor_bytes(t: torch.Tensor) -> int:
    loc = _local(t)
    return loc.numel() * loc.element_size()


def simulate_rank(cfg, rank: int, world_size: int) -> SimulatedRank:
    """Build rank ``rank`` of ``world_size`` for the root ``Config`` ``cfg`` (model, parallel, pipeline, optim,
    trainer, seed) under a fake process group and measure what it holds."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # torch-internal: only when simulating

    if dist.is_initialized():
        raise RuntimeError("simulate_rank needs a process without a process group (it installs a fake one)")
    t0 = time.perf_counter()
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    try:
        pctx = build_parallel_context(
            cfg.parallel, cfg.model, cfg.data.seq_len, world_size, "cpu", rank=rank, local_rank=0
        )
        model = build_model(cfg.model, device="meta")
        full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        module = build_train_module(model, cfg, pctx, max_steps=1)
        params = [p for p in module.model.parameters()]
        out = SimulatedRank(
            rank=rank, world_size=world_size, pp_rank=pctx.mesh("pp").get_local_rank() if pctx.dims.pp > 1 else 0
        )
        out.full_model_bytes = full_bytes
        out.bytes["parameters"] = local_bytes(module.model, include_buffers=False)
        out.largest_tensor_bytes = max((_tensor_bytes(p) for p in params), default=0)
        for p in params:  # what FSDP leaves in .grad after the reduce-scatter: the local shard's shape
            p.grad = torch.zeros_like(p)
        out.bytes["gradients"] = sum(_tensor_bytes(p.grad) for p in params)
        for opt in module.optimizers:
            opt.step()  # creates the state (moments) for real; the weights it leaves are not used
        seen, state = set(), 0
        for opt in module.optimizers:
            for st in opt.state.values():
                for v in st.values():
                    if isinstance(v, torch.Tensor) and v.numel() > 1 and id(v) not in seen:
                        seen.add(id(v))
                        state += _tensor_bytes(v)
        out.bytes["optimizer"] = state
        out.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.seconds = time.perf_counter() - t0
        return out
    finally:
        dist.destroy_process_group()


def render_simulation(sim: SimulatedRank, estimate: Optional[dict]) -> str:
    """Measured bytes next to the plan's estimate for this rank's pp stage group."""
    gib = 2.0**30
    lines = [
        f"simulated rank {sim.rank} of {sim.world_size} (pp rank {sim.pp_rank}; fake process group, CPU), "
        f"{sim.seconds:.0f} s, peak RSS {sim.peak_rss_bytes / gib:.2f} GiB",
        f"{'':14}{'measured GiB':>14}{'plan GiB':>12}{'ratio':>8}",
    ]
    for key, plan_key in (("parameters", "weights"), ("gradients", "grads"), ("optimizer", "optimizer")):
        if key not in sim.bytes:
            continue
        got = sim.bytes[key] / gib
        want = (estimate or {}).get(plan_key)
        if want:
            lines.append(f"{key:14}{got:14.3f}{want / gib:12.3f}{got / (want / gib):8.3f}")
        else:
            lines.append(f"{key:14}{got:14.3f}{'-':>12}{'-':>8}")
    lines.append(
        f"largest tensor this rank materialised: {sim.largest_tensor_bytes / gib:.3f} GiB "
        f"(whole model: {sim.full_model_bytes / gib:.1f} GiB)"
    )
    return "\n".join(lines)

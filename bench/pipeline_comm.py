"""Pipeline communication with and without the cross-stage block cache, and the measured pipeline bubble.

Part 1 (analytic, instant): for a sweep of P, V and block counts N (L = 64 decoder layers, blocks of L/N layers,
so blocks straddle stages whenever L/N does not divide the layers per stage), the tensors per microbatch per
direction and the bytes per step sent with and without the cache, next to

* the paper's per-token formulas (§4.1, units of d, N_p = N/(P·V) new blocks per stage):
  naive ``C(C−1)/2·N_p``, cached ``P(P−1)/2·N_p + (V−1)·P²·N_p``;
* our exact counts from :class:`PipelineLayout` (embedding and open partial sums included), and the same counts
  restricted to layer-blocks (what the paper counts).

Part 2 (measured, spawns gloo ranks on this machine): real pipeline steps of a small model; the bytes each rank
sent (from the runtime's counters; they must equal Part 1's exact formula) and the pipeline bubble measured as
``1 − Σ_r busy_r / (P · step time)`` (busy = time inside forward/backward actions), next to the simulator's
bubble for the same schedule and Megatron's ``(P−1)/(V·M+P−1)``. Ranks run one intra-op thread each: run
Part 2 on a machine with at least P free cores, otherwise the ranks steal each other's time and the measured
bubble is meaningless (it is printed anyway, with the core count).

Usage: python bench/pipeline_comm.py [--skip-measure] [--measure P,V,M ...] [--steps 3] [--hidden 256] [--seq 128]
Ends with ``RESULT <name> <value> <unit>`` lines.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from attnres_train.config.model import ModelConfig  # noqa: E402
from attnres_train.parallel.pipeline.layout import PipelineLayout, paper_volume  # noqa: E402
from attnres_train.parallel.pipeline.schedules import make_schedule  # noqa: E402
from attnres_train.parallel.pipeline.timing import ideal_bubble, timeline  # noqa: E402

D_48B, T_BENCH, B_BENCH, BF16 = 2304, 4096, 1, 2  # bytes per step for the 48B model's width, bf16 messages


def block_cfg(num_layers: int, block_size: int, hidden: int = 64, mode: str = "block") -> ModelConfig:
    cfg = ModelConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        vocab_size=256,
        mla_layers=[i for i in range(num_layers) if i % 2 == 1],
    )
    cfg.residual.mode = mode
    if mode == "block":
        cfg.residual.block_size = block_size
    return cfg


def layer_blocks(layout: PipelineLayout) -> int:
    """Layer-block tensors over all cross-rank hops (no embedding, no partial sums): the paper's accounting."""
    return sum(
        sum(1 for b in layout.delta(s) if b > 0)
        for s in range(layout.num_stages - 1)
        if layout.rank_of(s) != layout.rank_of(s + 1)
    )


def analytic(results: list) -> None:
    L = 64
    print("== Part 1: tensors per microbatch per direction (units: one [B,T,d] block) and bytes per step ==")
    print(f"   bytes: B={B_BENCH} T={T_BENCH} d={D_48B} bf16, M=2P microbatches, forward+backward, all links")
    hdr = (
        f"{'P':>2} {'V':>2} {'N':>3} {'Np':>5} | {'paper naive':>11} {'ours':>5} | {'paper cached':>12} {'ours':>5}"
        f" | {'exact naive':>11} {'exact cached':>12} {'ratio':>5} | {'peak n/c':>8} | "
        f"{'GiB/step naive':>14} {'cached':>7}"
    )
    print(hdr)
    for P in (2, 4, 8):
        for V in (1, 2, 4):
            for N in (4, 8, 16):
                cfg = block_cfg(L, L // N)
                naive = PipelineLayout.from_model_config(cfg, P, V, block_cache=False)
                cached = naive.with_cache(True)
                Np = N / (P * V)
                pn, pc = paper_volume(P, V, Np)
                en, ec = naive.tensors_per_microbatch(), cached.tensors_per_microbatch()
                M = 2 * P
                gn = naive.bytes_per_step(M, B_BENCH, T_BENCH, BF16) / 2**30
                gc = cached.bytes_per_step(M, B_BENCH, T_BENCH, BF16) / 2**30
                print(
                    f"{P:>2} {V:>2} {N:>3} {Np:>5.2f} | {pn:>11.2f} {layer_blocks(naive):>5} | {pc:>12.2f} "
                    f"{layer_blocks(cached):>5} | {en:>11} {ec:>12} {en / ec:>5.2f} | "
                    f"{max(naive.hop_tensors()):>3}/{max(cached.hop_tensors()):<4} | {gn:>14.2f} {gc:>7.2f}"
                )
                if (P, N) in ((4, 8), (8, 8)) and V in (2, 4):
                    tag = f"P{P}V{V}N{N}"
                    results += [
                        (f"pipeline_tensors_naive_{tag}", en, "tensors/microbatch"),
                        (f"pipeline_tensors_cached_{tag}", ec, "tensors/microbatch"),
                        (f"pipeline_comm_reduction_{tag}", round(en / ec, 3), "x"),
                        (f"pipeline_paper_cached_{tag}", round(pc, 2), "d/token"),
                        (f"pipeline_exact_cached_layerblocks_{tag}", layer_blocks(cached), "d/token"),
                    ]
    print(
        "   (paper cached counts P·N_p per later hop; the exact count is (P−1)·N_p: the receiving rank already holds"
        " its own previous chunk's blocks)"
    )


# ---------------------------------------------------------------------------------------------- measured
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, P, V, M, port, args, out_q):
    import torch.distributed as dist

    from attnres_train.model import build_model
    from attnres_train.parallel.pipeline import PipelineRuntime, build_stages

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P, timeout=datetime.timedelta(seconds=600)
    )
    try:
        rows = []
        for cache in (True, False):
            cfg = block_cfg(args.layers, args.block_size, args.hidden)
            cfg.vocab_size = 512
            cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.intermediate_size = 4, 2, args.hidden
            cfg.moe.dense_intermediate_size = 2 * args.hidden
            torch.manual_seed(0)
            model = build_model(cfg)
            layout = PipelineLayout.from_model_config(cfg, P, V, block_cache=cache)
            rt = PipelineRuntime(build_stages(model, layout, rank), layout, "interleaved_1f1b")
            g = torch.Generator().manual_seed(1)
            mbs = [
                (
                    torch.randint(0, 512, (args.batch, args.seq), generator=g),
                    torch.randint(0, 512, (args.batch, args.seq), generator=g),
                )
                for _ in range(M)
            ]
            rt.step(mbs)  # warm-up
            model.zero_grad(set_to_none=True)
            steps = []
            for _ in range(args.steps):
                dist.barrier()
                res = rt.step(mbs, reduce=False)
                model.zero_grad(set_to_none=True)
                steps.append((res.stats.compute_s, res.stats.step_s, res.stats.bytes))
            rows.append((cache, steps, layout.bytes_per_step(M, args.batch, args.seq, 4)))
        out_q.put((rank, rows))
    finally:
        dist.destroy_process_group()


def measure(P: int, V: int, M: int, args, results: list) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, P, V, M, port, args, q)) for r in range(P)]
    for p in procs:
        p.start()
    got = dict(q.get(timeout=1800) for _ in range(P))
    for p in procs:
        p.join()
    tag = f"P{P}V{V}M{M}"
    sim = timeline(make_schedule("interleaved_1f1b", P, V, M)).bubble_fraction
    for k, cache in enumerate((True, False)):
        bubbles, step_times = [], []
        for i in range(args.steps):
            busy = [got[r][k][1][i][0] for r in range(P)]
            wall = max(got[r][k][1][i][1] for r in range(P))
            bubbles.append(1 - sum(busy) / (P * wall))
            step_times.append(wall)
        sent = sum(got[r][k][1][-1][2] for r in range(P))
        expect = got[0][k][2]
        name = "cached" if cache else "naive"
        print(
            f"  {tag} {name:>6}: bytes sent {sent} (layout formula {expect}, {'OK' if sent == expect else 'MISMATCH'})"
            f"; step {statistics.median(step_times) * 1e3:.0f} ms; bubble measured "
            f"{statistics.median(bubbles):.3f}, simulated {sim:.3f}, (P-1)/(VM+P-1) {ideal_bubble(P, V, M):.3f}"
        )
        results += [
            (f"pipeline_bytes_measured_{name}_{tag}", sent, "bytes/step"),
            (f"pipeline_bytes_match_{name}_{tag}", int(sent == expect), "bool"),
            (f"pipeline_step_{name}_{tag}", round(statistics.median(step_times) * 1e3, 1), "ms"),
        ]
        if cache:
            results += [
                (f"pipeline_bubble_measured_{tag}", round(statistics.median(bubbles), 4), "fraction"),
                (f"pipeline_bubble_simulated_{tag}", round(sim, 4), "fraction"),
                (f"pipeline_bubble_formula_{tag}", round(ideal_bubble(P, V, M), 4), "fraction"),
            ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-measure", action="store_true")
    ap.add_argument("--measure", nargs="*", default=["2,2,4", "4,2,8", "4,1,8"], help="P,V,M triples")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    results: list = []
    analytic(results)
    if not args.skip_measure:
        print(
            f"== Part 2: measured on this machine ({os.cpu_count()} cores; torch {torch.__version__}; "
            f"{args.layers} layers, d={args.hidden}, B={args.batch}, T={args.seq}, blocks of {args.block_size}) =="
        )
        for triple in args.measure:
            P, V, M = (int(x) for x in triple.split(","))
            t0 = time.perf_counter()
            measure(P, V, M, args, results)
            print(f"  ({time.perf_counter() - t0:.0f} s)")
    for name, value, unit in results:
        print(f"RESULT {name} {value} {unit}")


if __name__ == "__main__":
    main()

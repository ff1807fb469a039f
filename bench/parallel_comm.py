"""Bytes moved per training step by each collective, per process group (dp, tp, ep, ...), for one layout.

How it counts: a ``TorchDispatchMode`` around one training step (forward + backward over the microbatches,
clipping, optimizer step, router-bias update; one untimed warm-up step first). In torch 2.13 every eager
``torch.distributed`` collective (``c10d.allreduce_``, ``_allgather_base_``, ``_reduce_scatter_base_``,
``alltoall_base_``, coalesced variants, ...) and every DTensor / functional collective
(``_c10d_functional.*``) is a dispatcher op whose arguments carry the tensors and the process group, so
the mode sees FSDP2's all-gathers / reduce-scatters, TP/SP's DTensor redistributions, EP's all-to-alls and the
train step's own all-reduces without touching any of them. Each call is attributed to the mesh dims whose
process group it ran on (``dp``, ``dp_shard``, ``tp``, ``ep``, ``edp_*``...; one group that serves several
dims is labelled ``a=b``).

Two numbers per call, for the calling rank: ``payload`` (bytes of the tensor being reduced / gathered /
exchanged: the full output of an all-gather, the input of an all-reduce / reduce-scatter / all-to-all) and
``sent`` (bytes this rank puts on the wire under the usual bandwidth-optimal algorithms: ring all-reduce
``2(n-1)/n``, all-gather / reduce-scatter ``(n-1)/n`` of the full tensor, all-to-all everything but the own
chunk). Size-1 groups move nothing. Rank 0's view is printed (the layouts are symmetric up to the routing
imbalance of the all-to-alls, which the per-rank EP line shows).

Usage (spawns ``--world`` gloo ranks on this machine; CPU, any core count):
    python bench/parallel_comm.py --world 4 --tp 2 --ep 2 [--dp-shard -1] [--dp-replicate 1] [--sp]
        [--model tiny] [--batch 8] [--micro 2] [--seq 64] [--dtype fp32]
Ends with ``RESULT <name> <value> <unit>`` lines (bytes sent per step by rank 0, per group and in total).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
GATHER = ("allgather", "all_gather", "_allgather_base")
SCATTER = ("reduce_scatter",)
REDUCE = ("allreduce", "all_reduce")
A2A = ("alltoall", "all_to_all")


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(y) for y in x)
    return 0


def _group_of(args):
    """The ProcessGroup of a c10d op (a ScriptObject argument) or a functional op (a group-name string)."""
    from torch.distributed.distributed_c10d import ProcessGroup, _resolve_process_group

    for a in args:
        if isinstance(a, torch.ScriptObject):
            try:
                return ProcessGroup.unbox(a)
            except Exception:  # noqa: BLE001 - e.g. a ReduceOp script object
                continue
    for a in args:
        if isinstance(a, str):
            try:
                return _resolve_process_group(a)
            except Exception:  # noqa: BLE001
                continue
    return None


class CommCounter(TorchDispatchMode):
    """Records (op kind, group, payload bytes, bytes sent) for every collective dispatched inside the mode."""

    def __init__(self):
        super().__init__()
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if ns in ("c10d", "_c10d_functional") and not any(
            k in func.__name__ for k in ("wait", "wrap", "barrier", "monitored")
        ):
            self._record(func, list(args) + list(kwargs.values()))
        return func(*args, **kwargs)

    def _record(self, func, args):
        name = func.__name__.split(".")[0]
        pg = _group_of(args)
        n = pg.size() if pg is not None else 1
        tensors = [a for a in args if isinstance(a, (torch.Tensor, list, tuple))]
        first = _nbytes(tensors[0]) if tensors else 0
        second = _nbytes(tensors[1]) if len(tensors) > 1 else first
        functional = func.namespace == "_c10d_functional"
        if any(k in name for k in A2A):
            inp = first if functional else second  # c10d: (out, in, ...); functional: (in, ...)
            kind, payload, sent = "all_to_all", inp, self._a2a_sent(args, inp, n, pg, functional)
        elif any(k in name for k in SCATTER):
            inp = first if functional else second
            kind, payload, sent = "reduce_scatter", inp, inp * (n - 1) // max(n, 1)
        elif any(k in name for k in GATHER):
            out = first * n if functional else first  # functional: (in, group_size, name)
            kind, payload, sent = "all_gather", out, out * (n - 1) // max(n, 1)
        elif any(k in name for k in REDUCE):
            kind, payload, sent = "all_reduce", first, 2 * first * (n - 1) // max(n, 1)
        elif "broadcast" in name:
            kind, payload, sent = "broadcast", first, first if n > 1 else 0
        else:
            kind, payload, sent = name, first, first if n > 1 else 0
        self.records.append((kind, pg, payload, sent))

    @staticmethod
    def _a2a_sent(args, inp, n, pg, functional):
        if n == 1:
            return 0
        splits = [a for a in args if isinstance(a, list) and all(isinstance(x, int) for x in a)]
        in_splits = (splits[-1] if not functional else splits[-1]) if splits else []
        if in_splits and sum(in_splits) > 0:
            me = dist.get_rank(pg)
            return inp - inp * in_splits[me] // sum(in_splits)
        return inp * (n - 1) // n


def _labels(pctx) -> dict:
    """group_name -> 'dp' / 'tp' / 'dp=dp_shard' ... for every 1-D mesh of the context."""
    names = defaultdict(list)
    for label in ("dp", "dp_shard", "dp_replicate", "tp", "dp_tp", "ep", "edp_shard", "edp_replicate", "pp"):
        mesh = pctx.mesh(label)
        if mesh is not None and mesh.ndim == 1:
            names[mesh.get_group().group_name].append(label)
    names[dist.group.WORLD.group_name].append("world")
    return {g: "=".join(v) for g, v in names.items()}


def _rank_body(args, port, world, out_q):
    os.environ.update(
        RANK=str(args["rank"]),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(args["rank"]),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=args["rank"], world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        out_q.put((args["rank"], measure(args)))
    except Exception as exc:  # noqa: BLE001
        import traceback

        out_q.put((args["rank"], {"error": f"{exc}\n{traceback.format_exc()}"}))
    finally:
        dist.destroy_process_group()


def measure(a) -> dict:
    from omegaconf import OmegaConf

    from attnres_train.config.model import as_model_config
    from attnres_train.config.parallel import ParallelConfig
    from attnres_train.config.run import TrainerConfig
    from attnres_train.config.train import OptimConfig
    from attnres_train.model import build_model
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.parallel.train_step import local_batch
    from attnres_train.train.train_module import TrainModule

    mcfg = as_model_config(OmegaConf.load(CONFIGS / f"{a['model']}.yaml"))
    mcfg.vocab_size = a["vocab"] or mcfg.vocab_size
    mcfg.residual.mode = a["mode"]
    if a["mode"] == "block":
        mcfg.residual.num_blocks = min(2, mcfg.num_layers)
    pcfg = ParallelConfig(dp_replicate=a["dp_replicate"], dp_shard=a["dp_shard"], tp=a["tp"], sp=a["sp"], ep=a["ep"])
    pctx = build_parallel_context(pcfg, mcfg, seq_len=a["seq"], world_size=dist.get_world_size())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a["dtype"]]
    torch.manual_seed(0)
    model = build_model(mcfg).to(dtype)
    tcfg = TrainerConfig(micro_batch_size=a["micro"], global_batch_size=a["batch"], precision="fp32")
    module = TrainModule(model, OptimConfig(warmup_steps=1), tcfg, pctx, max_steps=10)
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(0, mcfg.vocab_size, (a["batch"], a["seq"] + 1), generator=gen)
    mine = local_batch(batch, pctx)
    module.train_batch(mine, 0)  # warm-up: lazy FSDP init, first-touch allocations
    counter = CommCounter()
    with counter:
        module.train_batch(mine, 1)
    labels = _labels(pctx)
    rows = defaultdict(lambda: [0, 0, 0])  # (group label, kind) -> calls, payload, sent
    for kind, pg, payload, sent in counter.records:
        label = labels.get(pg.group_name, f"other({pg.size()})") if pg is not None else "unknown"
        if pg is not None and pg.size() == 1:
            label += "[size1]"
        r = rows[(label, kind)]
        r[0] += 1
        r[1] += payload
        r[2] += sent
    return {
        "rows": {f"{k[0]}|{k[1]}": v for k, v in rows.items()},
        "layout": pctx.describe(),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--dp-replicate", type=int, default=1)
    ap.add_argument("--dp-shard", type=int, default=-1)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--sp", action="store_true")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--model", default="tiny", help="a configs/model/*.yaml preset")
    ap.add_argument("--vocab", type=int, default=0, help="override the preset's vocab size")
    ap.add_argument("--mode", default="block", choices=("prenorm", "full", "block"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    a = ap.parse_args()
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    base = {k.replace("-", "_"): v for k, v in vars(a).items()}
    procs = [ctx.Process(target=_rank_body, args=({**base, "rank": r}, port, a.world, q)) for r in range(a.world)]
    for p in procs:
        p.start()
    results = dict(q.get(timeout=1200) for _ in procs)
    for p in procs:
        p.join()
    for r, res in results.items():
        if "error" in res:
            raise SystemExit(f"rank {r} failed: {res['error']}")
    res0 = results[0]
    print(
        f"layout: world {a.world}, {res0['layout']} | model {a.model} ({res0['params']:,} params on rank 0) "
        f"mode {a.mode} | global batch {a.batch} x seq {a.seq}, micro {a.micro} | {a.dtype} | torch "
        f"{torch.__version__} gloo"
    )
    print(f"{'group':<22}{'collective':<16}{'calls':>7}{'payload MB':>13}{'sent MB':>11}")
    per_group = defaultdict(int)
    total = 0
    for key in sorted(res0["rows"]):
        label, kind = key.split("|")
        calls, payload, sent = res0["rows"][key]
        print(f"{label:<22}{kind:<16}{calls:>7}{payload / 1e6:>13.3f}{sent / 1e6:>11.3f}")
        per_group[label] += sent
        total += sent
    ep_sent = [
        sum(v[2] for k, v in results[r]["rows"].items() if k.startswith("ep") and "all_to_all" in k)
        for r in sorted(results)
    ]
    if any(ep_sent):
        print("EP all-to-all bytes sent per rank: " + ", ".join(f"r{r}={b / 1e6:.3f}MB" for r, b in enumerate(ep_sent)))
    for label, sent in sorted(per_group.items()):
        if "[size1]" not in label:
            print(f"RESULT comm_sent_{label.replace('=', '_')} {sent} bytes")
    print(f"RESULT comm_sent_total {total} bytes")


if __name__ == "__main__":
    main()

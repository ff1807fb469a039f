"""The fused, chunked LM loss under vocab-parallel tensor parallelism equals one process (2 gloo ranks, fp64).

* The op (``tp_ops.vocab_parallel_fused_cross_entropy``): each rank holds half of the head's rows; loss, the
  weight-shard gradient and the hidden gradient summed over the ranks equal ``F.linear`` + ``F.cross_entropy``
  on the full weight, with ignored rows, a chunk size that does not divide the tokens, and an all-ignored batch.
* The whole model (tied embeddings, SP and not): TP with the fused loss over several chunks and TP with the
  unfused vocab-parallel loss (``lm_loss_chunk_tokens=0``) both equal the single-process unfused model, loss
  and every parameter gradient. (``test_tensor_parallel.py`` runs every mode with the default chunk.)
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.distributed import run_distributed
from tests.parallel.test_tensor_parallel import PRELOAD

TOL = 1e-10


def _rel(a, b) -> float:
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1e-30)


def _op_body():
    from attnres_train.parallel.tp_ops import vocab_parallel_fused_cross_entropy

    r, n = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(3)
    V, d = 24, 6
    h = torch.randn(3, 7, d, generator=g, dtype=torch.float64) * 2
    w = torch.randn(V, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, V, (3, 7), generator=g)
    y[1, 2:] = -100
    out = {}
    for name, labels in (("mixed", y), ("all ignored", torch.full_like(y, -100))):
        hf, wf = h.clone().requires_grad_(), w.clone().requires_grad_()
        want = F.cross_entropy(F.linear(hf, wf).flatten(0, 1), labels.flatten(), ignore_index=-100)
        (3.0 * want).backward()
        Vl = V // n
        hl, wl = h.clone().requires_grad_(), w[r * Vl : (r + 1) * Vl].clone().requires_grad_()
        got = vocab_parallel_fused_cross_entropy(hl, wl, labels, r * Vl, 4, dist.group.WORLD)
        (3.0 * got).backward()
        gh = hl.grad.clone()
        dist.all_reduce(gh)  # each rank's hidden gradient is its vocab shard's partial sum
        out[name] = {
            "loss": (float(got), float(want)),
            "grad_w": _rel(wl.grad, wf.grad[r * Vl : (r + 1) * Vl]) if wf.grad.any() else float(wl.grad.abs().max()),
            "grad_h": _rel(gh, hf.grad) if hf.grad.any() else float(gh.abs().max()),
        }
    return out


def _model_body():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from attnres_train.parallel.tensor import apply_tensor_parallel
    from tests.model.helpers import build, tiny_cfg

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cfg = tiny_cfg("prenorm", num_layers=2, tie_word_embeddings=True, vocab_size=64, hidden_size=32)
    cfg.mla_layers = [1]  # layer 0 KDA + dense FFN, layer 1 MLA + MoE
    cfg.lm_loss_chunk_tokens = 0
    ref = build(cfg)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (2, 10), generator=g)
    labels[0, :3] = -100
    out_ref = ref(ids, labels=labels)
    out_ref.loss.backward()
    ref_params = dict(ref.named_parameters())
    res = {}
    for sp in (False, True):
        for chunk in (0, 6):  # 20 tokens in chunks of 6: four chunks, the last one short
            model = copy.deepcopy(ref)
            model.zero_grad(set_to_none=True)
            model.config.lm_loss_chunk_tokens = chunk
            apply_tensor_parallel(model, mesh, sequence_parallel=sp)
            out = model(ids, labels=labels)
            out.loss.backward()
            errs = {
                n: _rel(p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad, ref_params[n].grad)
                for n, p in model.named_parameters()
                if p.grad is not None
            }
            res[f"sp={sp} chunk={chunk}"] = {
                "loss": _rel(out.loss.detach(), out_ref.loss.detach()),
                "grads": errs,
                "logits_none": out.logits is None,
                "n_ref": len(ref_params),
            }
    return res


def _body():  # one distributed run for both parts (process start-up dominates the cost)
    return _op_body(), _model_body()


def test_vocab_parallel_fused_loss_matches_single_process():
    results = run_distributed(_body, 2, timeout=180, preload=PRELOAD)
    for rank, (res, _) in enumerate(results):
        got, want = res["mixed"]["loss"]
        assert abs(got - want) <= TOL * abs(want), f"rank {rank}: loss {got} vs {want}"
        assert res["mixed"]["grad_w"] <= TOL and res["mixed"]["grad_h"] <= TOL, (rank, res["mixed"])
        ig = res["all ignored"]
        assert all(x != x for x in ig["loss"]), ig  # nan, as F.cross_entropy
        assert ig["grad_w"] == 0 and ig["grad_h"] == 0, ig
    for rank, (_, res) in enumerate(results):
        for tag, r in res.items():
            assert r["loss"] <= TOL, f"rank {rank} {tag}: loss rel err {r['loss']:.2e}"
            assert len(r["grads"]) == r["n_ref"], f"rank {rank} {tag}: {len(r['grads'])} of {r['n_ref']} grads"
            worst = max(r["grads"].items(), key=lambda kv: kv[1])
            assert worst[1] <= TOL, f"rank {rank} {tag}: worst gradient {worst}"
            assert r["logits_none"] == tag.endswith("chunk=6"), tag

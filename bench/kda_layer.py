"""CPU time of one KDA mixer forward + backward at f1 sizes: the code before issue 17.2's KDA pass vs now.

Why: the f1 KDA mixer spent ~half its CPU time outside its useful GEMM FLOPs (elementwise passes, layouts, small
ops). This bench times ``KimiDeltaAttention`` fwd + bwd (1 thread, CPU time, median of steps) against a frozen
copy of the previous forward (three ``F.conv1d`` short convs with transposes in and out, chunk 64), interleaved
round by round on the same module and input, checks both give the same output and gradients (fp64), and prints
where the time goes: CPU ms of the current layer's parts (its GEMMs, the chunked core, the short convs, the
rest) and the useful-FLOPs time at a 1024^3 matmul probe of the same run. ``--profile-rows N`` adds
torch.profiler tables (wall time: on a shared box only the proportions mean something). ``--chunks`` times the
current layer at several chunk sizes for T = 512 and 2048 (interleaved).

Usage: OMP_NUM_THREADS=1 python bench/kda_layer.py [--rounds 3] [--steps 5] [--T 512] [--chunk -1]
[--chunks 16,32,64] [--profile-rows 0]  (``--chunk``: -1 = f1.yaml's, 0 = null = the torch core's default)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from attnres_train.config.model import as_model_config
from attnres_train.model.flops import _kda_flops
from attnres_train.model.kda import KimiDeltaAttention, torch_default_chunk
from attnres_train.model.kda_intra import intra_chunk_products, sub_sizes
from attnres_train.model.kda_ops import kda_chunked, short_conv
from attnres_train.train.host_memory import keep_freed_host_memory

F1 = Path(__file__).resolve().parents[1] / "configs" / "model" / "f1.yaml"
BASELINE_CHUNK = 64  # f1's chunk before this change


# ------------------------------------------------------------------ the previous code (frozen copy)
def _old_kda_gate(raw_bthk, A_log_h, dt_bias_hk):
    H, K = raw_bthk.shape[-2], raw_bthk.shape[-1]
    dtype = torch.promote_types(raw_bthk.dtype, torch.float32)
    x = raw_bthk.to(dtype) + dt_bias_hk.to(dtype).reshape(H, K)
    return -A_log_h.to(dtype).reshape(H, 1).exp() * F.softplus(x)


def _old_l2norm(x, eps: float = 1e-6):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)).to(x.dtype)


def _old_short_conv(x_btc, weight_c1w):
    C, W = weight_c1w.shape[0], weight_c1w.shape[-1]
    x_bct = F.pad(x_btc.transpose(1, 2), (W - 1, 0))
    y_btc = F.conv1d(x_bct, weight_c1w.to(x_btc.dtype), groups=C).transpose(1, 2).contiguous()
    return F.silu(y_btc)


def _old_kda_chunked(q, k, v, g, beta, scale: float, chunk_size: int):
    B, T, H, K = q.shape
    V = v.shape[-1]
    C, dt = chunk_size, torch.promote_types(q.dtype, torch.float32)
    N = -(-T // C)
    pad = N * C - T

    def to_chunks(x):
        x = x.to(dt)
        if pad:
            x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q_c, k_c, g_c, v_c = to_chunks(q) * scale, to_chunks(k), to_chunks(g), to_chunks(v)
    beta_c = to_chunks(beta.unsqueeze(-1))
    G = g_c.cumsum(-2)
    P, Akk = intra_chunk_products(q_c, k_c, G, sub_sizes(C))
    eG = G.exp()
    L = (Akk * beta_c).tril(-1)
    eye = torch.eye(C, dtype=dt, device=q.device).expand_as(L)
    inv = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
    W = inv @ (beta_c * eG * k_c)
    U = inv @ (beta_c * v_c)
    G_last = G[..., -1:, :]
    Kd_t = ((G_last - G).exp() * k_c).transpose(-1, -2)
    decay = G_last.exp().transpose(-1, -2)
    S = q.new_zeros(B, H, K, V, dtype=dt)
    starts, pseudo = [], []
    for U_n, W_n, decay_n, Kd_n in zip(U.unbind(2), W.unbind(2), decay.unbind(2), Kd_t.unbind(2)):
        starts.append(S)
        v_n = U_n - W_n @ S
        pseudo.append(v_n)
        S = decay_n * S + Kd_n @ v_n
    o_c = (eG * q_c) @ torch.stack(starts, dim=2) + P @ torch.stack(pseudo, dim=2)
    return o_c.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T].to(v.dtype)


def old_forward(m: KimiDeltaAttention, x_btd: torch.Tensor, chunk: int = BASELINE_CHUNK) -> torch.Tensor:
    B, T, _ = x_btd.shape
    K = V = m.head_k_dim
    q = _old_short_conv(m.q_proj(x_btd), m.q_conv1d.weight).view(B, T, -1, K)
    k = _old_short_conv(m.k_proj(x_btd), m.k_conv1d.weight).view(B, T, -1, K)
    v = _old_short_conv(m.v_proj(x_btd), m.v_conv1d.weight).view(B, T, -1, V)
    g = _old_kda_gate(m.f_b_proj(m.f_a_proj(x_btd)).view(B, T, -1, K), m.A_log, m.dt_bias)
    beta = torch.sigmoid(m.b_proj(x_btd).to(g.dtype))
    o = _old_kda_chunked(_old_l2norm(q), _old_l2norm(k), v, g, beta, K**-0.5, chunk)
    gate = torch.sigmoid(m.g_b_proj(m.g_a_proj(x_btd))).view(B, T, -1, V)
    return m.o_proj((m.o_norm(o) * gate).reshape(B, T, -1).to(x_btd.dtype))


# ------------------------------------------------------------------------------------------ helpers
def m_cfg(m: KimiDeltaAttention):
    """The f1 config with the layer's chunk (the FLOPs count follows ``model.kda.chunk_size``)."""
    cfg = as_model_config(OmegaConf.load(F1))
    cfg.kda.chunk_size = m.chunk_size
    return cfg


def make_layer(chunk: Optional[int], T: int, dtype=torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    cfg = as_model_config(OmegaConf.load(F1))
    if chunk is not None:
        cfg.kda.chunk_size = chunk or None
    m = KimiDeltaAttention(cfg).to(dtype)
    for p in m.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=cfg.init_std)
    x = torch.randn(1, T, cfg.hidden_size, dtype=dtype, requires_grad=True)
    gy = torch.randn(1, T, cfg.hidden_size, dtype=dtype)
    return m, x, gy


def fwd_bwd(m, x, gy, fn) -> None:
    fn(m, x).backward(gy)
    m.zero_grad(set_to_none=True)
    x.grad = None


def cpu_ms(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        step()
        times.append((time.process_time() - t0) * 1e3)
    return statistics.median(times)


def check_same(chunk) -> float:
    """Max |old - new| over the output and all gradients, fp64 (the math is the same for any chunk)."""
    m, x, gy = make_layer(chunk, 200, torch.float64)
    outs = []
    for fn in (old_forward, lambda mm, xx: mm(xx, core="chunk")):
        y = fn(m, x)
        grads = torch.autograd.grad(y, [x, *m.parameters()], gy)
        outs.append([y, *grads])
    return max((a - b).abs().max().item() for a, b in zip(*outs))


def pieces_ms(m, x, gy, rounds: int, steps: int) -> dict:
    """CPU ms of the layer's parts, fwd + bwd, interleaved: its GEMMs, the chunked core, the short convs;
    ``rest`` = layer - those (gates, norms, l2norm, sigmoids, gradient sums)."""
    B, T, _ = x.shape
    H, K = m.num_heads, m.head_k_dim
    chunk = m.chunk_size or torch_default_chunk(K)
    torch.manual_seed(1)
    q, k = (F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_() for _ in range(2))
    v = torch.randn(B, T, H, K, requires_grad=True)
    g = (-0.1 * torch.rand(B, T, H, K)).requires_grad_()
    beta = torch.rand(B, T, H, requires_grad=True)
    hk = torch.randn(B, T, H * K, requires_grad=True)
    convs = (m.q_conv1d, m.k_conv1d, m.v_conv1d)

    def gemms():
        ys = [lin(x) for lin in (m.q_proj, m.k_proj, m.v_proj, m.b_proj)]
        ys += [m.f_b_proj(m.f_a_proj(x)), m.g_b_proj(m.g_a_proj(x)), m.o_proj(hk)]
        sum(y.sum() for y in ys).backward()

    parts = {
        "layer": lambda: fwd_bwd(m, x, gy, lambda mm, xx: mm(xx, core="chunk")),
        "gemms": gemms,
        "core": lambda: kda_chunked(q, k, v, g, beta, chunk_size=chunk)[0].sum().backward(),
        "convs": lambda: sum(short_conv(hk, c.weight, True).sum() for c in convs).backward(),
    }
    for f in parts.values():
        f()
    res = {name: [] for name in parts}
    for _ in range(rounds):
        for name, f in parts.items():
            res[name].append(cpu_ms(f, steps))
    out = {name: statistics.median(v) for name, v in res.items()}
    out["rest"] = out["layer"] - out["gemms"] - out["core"] - out["convs"]
    return out


def probe_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    t0 = time.process_time()
    for _ in range(5):
        a @ b
    return 5 * 2 * 1024**3 / (time.process_time() - t0) / 1e9


def profile_top(m, x, gy, fn, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fwd_bwd(m, x, gy, fn)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=7, help="timed fwd+bwd steps per variant per round (median)")
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=-1, help="new layer's chunk; -1: f1.yaml's, 0: null")
    ap.add_argument("--chunks", default="", help="also time the new layer at these chunks (T=512, 2048)")
    ap.add_argument("--profile-rows", type=int, default=0, help="torch.profiler tables (wall time) of N rows")
    a = ap.parse_args()
    keep_freed_host_memory()
    torch.set_num_threads(1)
    chunk = None if a.chunk < 0 else a.chunk
    m, x, gy = make_layer(chunk, a.T)
    eff = m.chunk_size or torch_default_chunk(m.head_k_dim)
    print(f"f1 KDA layer: B=1 T={a.T} d={m.hidden_size} H={m.num_heads} K=V={m.head_k_dim} fp32, 1 thread")
    print(f"before: frozen previous forward, chunk {BASELINE_CHUNK}; after: KimiDeltaAttention, chunk {eff}")
    print(f"fp64 max |before - after| over output and all gradients (T=200): {check_same(chunk):.2e}")

    variants = {"before": old_forward, "after": lambda mm, xx: mm(xx, core="chunk")}
    for fn in variants.values():  # warm-up
        for _ in range(2):
            fwd_bwd(m, x, gy, fn)
    per = {k: [] for k in variants}
    for r in range(a.rounds):  # steps alternate before/after inside a round: load changes hit both alike
        times = {k: [] for k in variants}
        for s in range(a.steps):
            order = list(variants) if (r + s) % 2 == 0 else list(variants)[::-1]
            for k in order:
                times[k].append(cpu_ms(lambda fn=variants[k]: fwd_bwd(m, x, gy, fn), 1))
        for k in variants:
            per[k].append(statistics.median(times[k]))
        print(f"round {r}: " + "  ".join(f"{k} {per[k][-1]:.1f} ms" for k in variants))
    ratios = [b / n for b, n in zip(per["before"], per["after"])]
    before, after, speedup = (statistics.median(v) for v in (per["before"], per["after"], ratios))
    print(
        f"median over {a.rounds} rounds: before {before:.1f} ms, after {after:.1f} ms, ratio {speedup:.2f}x "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f})"
    )

    gflops = probe_gflops()
    useful = 3 * _kda_flops(m_cfg(m)) * a.T / (gflops * 1e9) * 1e3
    parts = pieces_ms(m, x, gy, a.rounds, a.steps)
    print(
        f"\nafter, by part (CPU ms fwd+bwd, median of {a.rounds} interleaved rounds): "
        + "  ".join(f"{k} {v:.1f}" for k, v in parts.items())
    )
    print(
        f"useful FLOPs (flops._kda_flops x 3 x T) at this run's 1024^3 matmul rate ({gflops:.0f} GFLOP/s): "
        f"{useful:.1f} ms"
    )

    if a.profile_rows:  # wall time per op: on a loaded box only the proportions mean something
        for k, fn in variants.items():
            print(f"\n== {k}: top ops by self CPU time, one fwd+bwd ==")
            print(profile_top(m, x, gy, fn, a.profile_rows))

    if a.chunks:
        sizes = [int(c) for c in a.chunks.split(",")]
        for T in (512, 2048):
            layers = {c: make_layer(c, T) for c in sizes}
            res = {c: [] for c in sizes}
            for lm, lx, lg in layers.values():
                fwd_bwd(lm, lx, lg, variants["after"])
            for _ in range(a.rounds):
                for c, (lm, lx, lg) in layers.items():
                    res[c].append(cpu_ms(lambda lm=lm, lx=lx, lg=lg: fwd_bwd(lm, lx, lg, variants["after"]), 3))
            print(f"T={T}: " + "  ".join(f"chunk {c}: {statistics.median(v):.1f} ms" for c, v in res.items()))

    print(f"RESULT kda_layer_fwd_bwd_before_ms {before:.1f} ms")
    print(f"RESULT kda_layer_fwd_bwd_ms {after:.1f} ms")
    print(f"RESULT kda_layer_speedup {speedup:.2f} x")


if __name__ == "__main__":
    main()

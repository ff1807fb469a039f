"""The PNG figures of ``attnres-analyze`` (one run) and ``attnres-compare`` (several runs).

Why one module with plain functions: every figure takes already-computed numbers (lists, arrays, run
records) and a path, so the numerics stay testable without matplotlib and the CLIs stay thin. The Agg
backend is selected before pyplot is imported: no display is needed (clusters, CI, ssh).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, MaxNLocator  # noqa: E402

from .fit import PowerLaw  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_depth_weights(matrix, readers: Sequence[str], sources: Sequence[str], path: Path, title: str) -> Path:
    """Fig. 8 analogue: rows = reading sublayer (and the output head), columns = source, colour = mean weight."""
    mat = np.ma.masked_invalid(np.asarray(matrix, dtype=float))
    h = max(3.0, 0.28 * len(readers) + 1.5)
    w = max(4.0, 0.32 * len(sources) + 2.5)
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(len(sources)), sources, rotation=90 if len(sources) > 10 else 0, fontsize=7)
    ax.set_yticks(range(len(readers)), readers, fontsize=7)
    ax.set_xlabel("source (emb = token embedding)")
    ax.set_ylabel("reading sublayer")
    if mat.shape[0] * mat.shape[1] <= 160:
        for r in range(mat.shape[0]):
            for c in range(mat.shape[1]):
                if not np.ma.is_masked(mat[r, c]):
                    v = float(mat[r, c])
                    ax.text(
                        c, r, f"{v:.2f}", ha="center", va="center", fontsize=6, color="black" if v > 0.6 else "white"
                    )
    fig.colorbar(im, ax=ax, label="mean softmax weight over tokens")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_layer_profile(
    output_rms: Sequence[float], grad_norm: Sequence[float], block_starts: Sequence[float], path: Path, title: str
) -> Path:
    """Fig. 5b/c analogue: per decoder layer, output magnitude and gradient norm; dashed lines = block starts
    (through layer i's point when a block opens at its FFN: ``block_starts`` holds i + 0.5 then)."""
    x = np.arange(len(output_rms))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, y, label in (
        (axes[0], output_rms, "output RMS (stream after layer)"),
        (axes[1], grad_norm, "gradient norm of layer parameters"),
    ):
        ax.plot(x, y, marker="o")
        for b in block_starts:
            if b > 0:
                ax.axvline(b - 0.5, color="grey", ls="--", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if min(grad_norm, default=0) > 0:
        axes[1].set_yscale("log")
        for fmt in (axes[1].yaxis.set_major_formatter, axes[1].yaxis.set_minor_formatter):
            fmt(FormatStrFormatter("%.2g"))
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_loss_curves(
    curves: Dict[str, dict],
    path: Path,
    title: str = "loss",
    xlabel: str = "step",
    marks: Optional[Dict[str, float]] = None,
) -> Path:
    """``curves[name] = {"train": (xs, losses), "val": (xs, losses)}``; one colour and one legend entry per name.

    ``marks``: labelled vertical lines (e.g. the token count runs are compared at).
    """
    fig, ax = plt.subplots(figsize=(7, 4) if len(curves) <= 6 else (9, 4.5))
    for k, (name, c) in enumerate(curves.items()):
        color, ls = f"C{k % 10}", ("-", "--", ":")[k // 10 % 3]  # > 10 curves: a new line style per ten
        ts, tl = c.get("train", ([], []))
        vs, vl = c.get("val", ([], []))
        if len(ts):
            ax.plot(ts, tl, color=color, ls=ls, alpha=0.45 if len(vs) else 1.0, lw=1, label=f"{name} train")
        if len(vs):
            ax.plot(vs, vl, color=color, ls=ls, marker="o", ms=3, lw=1.5, label=f"{name} val")
    for name, x in (marks or {}).items():
        ax.axvline(x, color="grey", ls="--", lw=0.8, label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(
            fontsize=6 if len(curves) > 6 else 7,
            loc="center left" if len(curves) > 6 else "best",
            bbox_to_anchor=(1.01, 0.5) if len(curves) > 6 else None,
        )
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_expert_load(
    load: Optional[Sequence[Sequence[float]]],
    moe_layers: Sequence[int],
    imbalance: Optional[dict],
    path: Path,
    title: str,
) -> Path:
    """Left: token share per expert per MoE layer on the held-out batch; right: logged imbalance over steps."""
    panels = int(bool(load)) + int(bool(imbalance))
    fig, axes = plt.subplots(1, max(panels, 1), figsize=(5.2 * max(panels, 1), 3.6), squeeze=False)
    axes = list(axes[0])
    if load:
        ax = axes.pop(0)
        mat = np.asarray(load, dtype=float)
        im = ax.imshow(mat, aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
        ax.set_yticks(range(len(moe_layers)), [f"L{i}" for i in moe_layers], fontsize=7)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title(f"token share per expert (uniform = {1 / mat.shape[1]:.3f})", fontsize=8)
        fig.colorbar(im, ax=ax)
    if imbalance:
        ax = axes.pop(0)
        for key, (steps, vals) in imbalance.items():
            ax.plot(steps, vals, label=key)
        ax.axhline(1.0, color="grey", ls="--", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean tokens per expert")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if not load and not imbalance:
        axes[0].text(0.5, 0.5, "no MoE layers / no expert metrics", ha="center", va="center")
        axes[0].set_axis_off()
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_depth_entropy(
    steps: Sequence[int], entropy: Sequence[Sequence[float]], readers: Sequence[str], path: Path, title: str
) -> Path:
    """Logged depth-attention entropy (``kind: depth`` records) over training: steps × reading sublayer."""
    mat = np.asarray(entropy, dtype=float).T  # [readers, steps]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(steps) + 3), max(3.0, 0.25 * len(readers) + 1.5)))
    im = ax.imshow(mat, aspect="auto", cmap="cividis", interpolation="nearest", origin="upper")
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=90, fontsize=6)
    ax.set_yticks(range(mat.shape[0]), list(readers)[: mat.shape[0]], fontsize=7)
    ax.set_xlabel("step")
    fig.colorbar(im, ax=ax, label="entropy (nats); uniform over n sources = ln n")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_scaling(
    points: Dict[str, List[tuple]],
    fits: Dict[str, PowerLaw],
    path: Path,
    budget: Optional[float] = None,
    title: str = "",
) -> Path:
    """Final loss against compute (PFLOP/s-days, log-log) per variant, with the fitted power laws."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (variant, pts) in enumerate(points.items()):
        color = f"C{k % 10}"
        c = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        ax.scatter(c, y, color=color, s=22, zorder=3, label=variant if variant not in fits else None)
        law = fits.get(variant)
        if law is not None:
            lo, hi = c.min(), max(c.max(), budget or c.max())
            xs = np.geomspace(lo / 1.5, hi * 1.5, 100)
            ax.plot(xs, law.loss(xs), color=color, lw=1.3, label=f"{variant}: {law.describe()}")
    if budget:
        ax.axvline(budget, color="grey", ls=":", lw=1, label=f"budget {budget:.3g} PF-days")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for fmt in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        fmt(FormatStrFormatter("%.3g"))
    ax.set_xlabel("training compute (PFLOP/s-days)")
    ax.set_ylabel("loss at the compared tokens (seed mean)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title or "L = A·C^(−α) per variant", fontsize=9)
    return _save(fig, path)


def plot_loss_bars(
    labels: Sequence[str],
    means: Sequence[float],
    sds: Sequence[Optional[float]],
    points: Sequence[Sequence[float]],
    path: Path,
    title: str = "",
    ylabel: str = "loss",
) -> Path:
    """One labelled bar per (size, variant): mean over seeds, ± SD error bar, each seed as a dot, n under it."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(labels) + 2), 4.0))
    y = np.asarray(means, dtype=float)
    err = np.asarray([s if s is not None else 0.0 for s in sds], dtype=float)
    x = np.arange(len(labels))
    ax.bar(x, y, color=[f"C{i % 10}" for i in range(len(labels))], alpha=0.7)
    ax.errorbar(x, y, yerr=err, fmt="none", ecolor="black", capsize=3, lw=1)
    for i, pts in enumerate(points):
        ax.scatter([i] * len(pts), pts, color="black", s=10, zorder=3)
    ax.set_xticks(x, [f"{lab}\n(n={len(p)})" for lab, p in zip(labels, points)], rotation=30, ha="right", fontsize=7)
    allv = np.asarray([v for p in points for v in p], dtype=float)
    allv = allv[np.isfinite(allv)]
    if allv.size:
        span = max(float(allv.max() - allv.min()), 1e-3)
        ax.set_ylim(float(allv.min()) - span, float(allv.max()) + 0.5 * span)
        for i, (m, s) in enumerate(zip(y, sds)):
            ax.text(
                i,
                float(allv.max()) + 0.15 * span,
                f"{m:.4f}" + (f"\n±{s:.4f}" if s is not None else ""),
                ha="center",
                va="bottom",
                fontsize=6,
            )
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)

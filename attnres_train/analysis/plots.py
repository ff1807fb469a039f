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
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="mean softmax weight over tokens")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_layer_profile(output_rms: Sequence[float], grad_norm: Sequence[float], block_starts: Sequence[int],
                       path: Path, title: str) -> Path:
    """Fig. 5b/c analogue: per decoder layer, output magnitude and gradient norm; dashed lines = block starts."""
    x = np.arange(len(output_rms))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, y, label in ((axes[0], output_rms, "output RMS (stream after layer)"),
                         (axes[1], grad_norm, "gradient norm of layer parameters")):
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


def plot_loss_curves(curves: Dict[str, dict], path: Path, title: str = "loss") -> Path:
    """``curves[name] = {"train": (steps, losses), "val": (steps, losses)}``; one colour per name."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (name, c) in enumerate(curves.items()):
        color = f"C{k % 10}"
        ts, tl = c.get("train", ([], []))
        vs, vl = c.get("val", ([], []))
        if len(ts):
            ax.plot(ts, tl, color=color, alpha=0.45 if len(vs) else 1.0, lw=1, label=f"{name} train")
        if len(vs):
            ax.plot(vs, vl, color=color, marker="o", ms=3, lw=1.5, label=f"{name} val")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_expert_load(load: Optional[Sequence[Sequence[float]]], moe_layers: Sequence[int],
                     imbalance: Optional[dict], path: Path, title: str) -> Path:
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


def plot_depth_entropy(steps: Sequence[int], entropy: Sequence[Sequence[float]], readers: Sequence[str],
                       path: Path, title: str) -> Path:
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


def plot_scaling(points: Dict[str, List[tuple]], fits: Dict[str, PowerLaw], path: Path,
                 budget: Optional[float] = None, title: str = "") -> Path:
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
    ax.set_ylabel("final validation loss")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(title or "L = A·C^(−α) per variant", fontsize=9)
    return _save(fig, path)


def plot_final_loss(labels: Sequence[str], losses: Sequence[float], path: Path, title: str = "") -> Path:
    """Bar chart of final loss per run (the block-count sweep at a glance; Fig. 6 analogue)."""
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(labels) + 2), 3.8))
    y = np.asarray(losses, dtype=float)
    ax.bar(range(len(labels)), np.nan_to_num(y, nan=0.0), color=[f"C{i % 10}" for i in range(len(labels))])
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    finite = y[np.isfinite(y)]
    if finite.size:
        span = max(float(finite.max() - finite.min()), 1e-3)
        ax.set_ylim(float(finite.min()) - span, float(finite.max()) + 0.5 * span)
        for i, v in enumerate(y):
            if np.isfinite(v):
                ax.text(i, v, f"{v:.4f}", ha="center", va="bottom", fontsize=7)
    ax.set_ylabel("final loss")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)

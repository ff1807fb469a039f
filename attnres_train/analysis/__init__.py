"""Research tooling on top of finished runs: "does AttnRes help my model, and with how many blocks?".

* :mod:`.runs`  — read a run directory (config.yaml, metrics.jsonl, checkpoints) into one summary per run:
  residual variant, model size, tokens seen, training compute, final validation loss.
* :mod:`.matching` — fair comparisons: every run of a size read at the same token count, seeds aggregated,
  deltas paired by seed; refuses (one line naming the runs) what cannot be compared that way.
* :mod:`.fit`   — power-law fits ``L = A·C^(−α)`` and the compute advantage of one variant over another.
* :mod:`.depth` — diagnostics computed from a checkpoint on a held-out batch: depth-attention weights per
  sublayer over sources, per-layer output magnitude and gradient norm, expert load.
* :mod:`.plots` — the PNG figures (matplotlib, Agg backend) that ``attnres-analyze`` / ``attnres-compare`` write.

Nothing here trains or changes a run directory except the output folders the CLIs are given.
"""

from .fit import PowerLaw, compute_advantage, fit_power_law, pflops_days
from .runs import RunSummary, find_runs, load_run, summarize

__all__ = ["PowerLaw", "RunSummary", "compute_advantage", "find_runs", "fit_power_law", "load_run", "pflops_days",
           "summarize"]

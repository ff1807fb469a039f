"""Research tooling on top of finished runs: "does AttnRes help my model, and with how many blocks?".

:mod:`.runs` reads a run directory into one summary; :mod:`.matching` makes fair comparisons (matched tokens,
seeds paired) or refuses; :mod:`.fit` fits power laws and the compute advantage; :mod:`.depth` computes
checkpoint diagnostics; :mod:`.plots` draws the figures (matplotlib, optional). Nothing here trains or changes
a run directory except the output folders the CLIs are given. docs/analysis.md.
"""

from .fit import PowerLaw, compute_advantage, fit_power_law, pflops_days
from .runs import RunSummary, find_runs, load_run, summarize

__all__ = [
    "PowerLaw",
    "RunSummary",
    "compute_advantage",
    "find_runs",
    "fit_power_law",
    "load_run",
    "pflops_days",
    "summarize",
]

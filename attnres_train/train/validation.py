"""The validation metrics of one evaluation: the held-out slice as one pool, or each ``data.val_sources`` entry
on its own plus their token-weighted aggregate.

Why a function of its own: ``attnres-eval`` must report the loss the trainer logs on the same data, so the
rule (which batches, how sources are weighted) is written once here and mirrored there. docs/data.md,
"Validation".
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Iterator, Optional

import torch

from ..data.loader import ValidationSet
from ..model.lm_loss import IGNORE_INDEX


class _CountTargets:
    """Passes batches through and counts their supervised target tokens on this rank."""

    def __init__(self, batches: Iterable[torch.Tensor]):
        self.batches, self.tokens = batches, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            self.tokens += int((batch[:, 1:] != IGNORE_INDEX).sum())
            yield batch


def validation_metrics(
    module, val: ValidationSet, batch_size: int, dp_rank: int, dp_size: int, max_batches: Optional[int]
) -> Dict[str, float]:
    """``val_loss`` / ``val_ppl`` (and per val source ``val/<name>/loss``, ``/ppl``, ``/tokens``) through
    ``module.eval_loss`` (the dp-averaged token mean). ``max_batches`` caps the held-out slice as a whole, or
    each val source; None = every sample. The aggregate over val sources weights each by its tokens."""
    if not val.separate:
        return module.eval_loss(val.batches(batch_size, dp_rank, dp_size, max_batches=max_batches))
    out: Dict[str, float] = {}
    nats, tokens = 0.0, 0
    for name in val.names:
        counted = _CountTargets(val.batches(batch_size, dp_rank, dp_size, max_batches=max_batches, source=name))
        m = module.eval_loss(counted)
        if not m:
            continue
        n = counted.tokens * dp_size  # every rank gets the same number of samples of each batch
        out[f"val/{name}/loss"], out[f"val/{name}/ppl"], out[f"val/{name}/tokens"] = m["val_loss"], m["val_ppl"], n
        nats, tokens = nats + m["val_loss"] * n, tokens + n
    if not tokens:
        return {}
    loss = nats / tokens
    return {"val_loss": loss, "val_ppl": math.exp(loss) if loss < 700 else math.inf, **out}

"""Fair comparisons between runs: losses at matched tokens, seeds aggregated, deltas paired by seed.

Why: a table of "final" losses compares a 22-step run with a 3-step baseline as if they were the same
experiment. Here every run of one model size is read at the same token count (the largest at which every run of
that size logged a validation loss), a comparison that cannot be made that way is refused with one line naming
the runs, seeds are aggregated to mean ± SD and a variant's delta is paired by seed. docs/analysis.md, `attnres-compare`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..config.errors import UserInputError
from .fit import pflops_days
from .runs import Run, RunSummary, training_flops

SizeKey = Tuple[str, int, int]  # (model preset name, num_layers, hidden_size)


def size_key(s: RunSummary) -> SizeKey:
    return (s.model, s.num_layers, s.hidden_size)


def size_name(key: SizeKey) -> str:
    return f"{key[0]} {key[1]}L d{key[2]}"


def tokens_at_steps(run: Run) -> Dict[int, int]:
    """Tokens seen after each logged step: the train record's ``tokens_seen``, else steps × batch × seq_len."""
    per_step = _tokens_per_step(run.config)
    known = {r["step"]: int(r["tokens_seen"]) for r in run.kind("train") if isinstance(r.get("tokens_seen"), int)}
    steps = {r["step"] for r in run.records if isinstance(r.get("step"), int)}
    return {s: known.get(s, s * per_step) for s in steps}


def _tokens_per_step(config: dict) -> int:
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    return int(trainer.get("global_batch_size", 0) or 0) * int(data.get("seq_len", 0) or 0)


def loss_curve(run: Run, source: str) -> List[Tuple[int, float]]:
    """``[(tokens, loss)]`` by tokens: validation losses (``source="val"``) or per-batch train losses."""
    key = "val_loss" if source == "val" else "loss"
    tokens = tokens_at_steps(run)
    return [
        (tokens[r["step"]], float(r[key]))
        for r in run.kind(source)
        if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))
    ]


@dataclass
class Compared:
    """One run read at its size's matched token count."""

    summary: RunSummary
    label: str  # unique per run: variant, size, seed (and the run directory when those collide)
    tokens: int  # matched token count the loss is read at
    loss: float
    source: str  # "val" or "train" (mean of the train losses logged in the window)
    batches: int  # records averaged: 1 for a validation loss, the window's logged steps for train
    flops: float  # training compute up to ``tokens``
    delta: Optional[float] = None  # loss minus the reference run's of the same size and seed

    @property
    def pflops_days(self) -> float:
        return pflops_days(self.flops)


@dataclass
class Aggregate:
    """One (size, variant): the loss over seeds and the delta against the reference paired by seed."""

    size: SizeKey
    variant: str
    tokens: int
    seeds: List[int]
    losses: List[float]
    flops: List[float] = field(default_factory=list)  # training compute up to ``tokens``, per seed
    deltas: List[float] = field(default_factory=list)  # one per seed that has a reference run

    @property
    def mean(self) -> float:
        return statistics.fmean(self.losses)

    @property
    def sd(self) -> Optional[float]:
        return statistics.stdev(self.losses) if len(self.losses) > 1 else None

    @property
    def delta_mean(self) -> Optional[float]:
        return statistics.fmean(self.deltas) if self.deltas else None

    @property
    def delta_sd(self) -> Optional[float]:
        return statistics.stdev(self.deltas) if len(self.deltas) > 1 else None


def _names(runs: Sequence) -> str:
    return ", ".join(str(x) for x in runs)


def run_labels(summaries: Sequence[RunSummary]) -> List[str]:
    """Labels that tell every run apart: variant · size · seed, plus the run directory where those collide."""
    base = [f"{s.variant} · {size_name(size_key(s))} · seed {s.seed}" for s in summaries]
    return [b if base.count(b) == 1 else f"{b} · {s.run}" for b, s in zip(base, summaries)]


def match(
    runs: Sequence[Run], summaries: Sequence[RunSummary], source: str = "val", train_window: float = 0.1
) -> Tuple[List[Compared], List[str], Dict[SizeKey, int]]:
    """Read every run at its size's matched tokens. Returns (rows in input order, notes, matched tokens by size).

    ``source="val"``: the largest token count at which every run of the size logged a validation loss; a run
    without any, or a size without a common count, is a :class:`UserInputError` naming the runs.
    ``source="train"``: the shortest run's token count T of the size; the loss is the mean of the train losses
    logged in ``(T·(1 − train_window), T]`` (each record is one training batch, so one alone is noise).
    """
    if source not in ("val", "train"):
        raise UserInputError(f"--loss must be val or train, got {source!r}")
    if not 0 < train_window <= 1:
        raise UserInputError(f"--train-window must be in (0, 1], got {train_window}")
    curves = [loss_curve(r, source) for r in runs]
    if source == "val":
        missing = [s.run for s, c in zip(summaries, curves) if not c]
        if missing:
            raise UserInputError(
                f"no validation loss logged by {_names(missing)} (trainer.val_every=0 or no validation data); "
                "refusing to compare single training batches: rerun with validation, or pass --loss train to "
                "compare training losses averaged over the last --train-window of tokens"
            )
    labels = run_labels(summaries)
    groups: Dict[SizeKey, List[int]] = {}
    for i, s in enumerate(summaries):
        groups.setdefault(size_key(s), []).append(i)
    notes, matched, out = [], {}, [None] * len(runs)
    for key, idx in groups.items():
        reach = min(summaries[i].tokens for i in idx)
        if source == "val":
            common = set.intersection(*({t for t, _ in curves[i] if t <= reach} for i in idx))
            if not common:
                where = "; ".join(
                    f"{summaries[i].run} validated at {sorted(t for t, _ in curves[i])[-3:]} tokens "
                    f"(trained {summaries[i].tokens})"
                    for i in idx
                )
                raise UserInputError(
                    f"{size_name(key)}: no token count at which every run logged a validation loss ({where}); "
                    "use one trainer.val_every and compare runs that reached a common validation point"
                )
            tokens = max(common)
        else:
            tokens = reach
        matched[key] = tokens
        for i in idx:
            s = summaries[i]
            if source == "val":
                loss, n = dict(curves[i])[tokens], 1
            else:
                lo = tokens * (1.0 - train_window)
                window = [v for t, v in curves[i] if lo < t <= tokens]
                if not window:
                    raise UserInputError(
                        f"{s.run}: no train loss logged between {int(lo)} and {tokens} tokens "
                        "(raise --train-window or trainer.log_every frequency)"
                    )
                loss, n = statistics.fmean(window), len(window)
            out[i] = Compared(
                summary=s,
                label=labels[i],
                tokens=tokens,
                loss=loss,
                source=source,
                batches=n,
                flops=training_flops(runs[i].config, tokens),
            )
        longer = [summaries[i].run for i in idx if summaries[i].tokens > tokens]
        if longer:
            notes.append(
                f"{size_name(key)}: compared at {tokens:,} tokens; {_names(longer)} trained further "
                "(their later losses are not used)"
            )
        notes += setting_differences(key, [runs[i] for i in idx])
    _check_duplicates(out)
    return out, notes, matched


# What must be equal for a loss difference between runs of one size to be the residual variant's doing.
_IGNORED = ("model.residual.", "data.cache_dir", "data.num_workers")


def _flat(d, prefix: str = "") -> Dict[str, object]:
    out: Dict[str, object] = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def setting_differences(key: SizeKey, runs: Sequence[Run]) -> List[str]:
    """Notes for settings besides the residual variant and the seed that differ between runs of one size."""
    flats = [
        {
            k: v
            for k, v in _flat({s: r.config.get(s) for s in ("model", "data", "optim")}).items()
            if not k.startswith(_IGNORED)
        }
        for r in runs
    ]
    for f, r in zip(flats, runs):
        f["trainer.global_batch_size"] = (r.config.get("trainer") or {}).get("global_batch_size")
    keys = sorted({k for f in flats for k in f})
    differ = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
    notes = []
    if differ:
        shown = ", ".join(differ[:6]) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
        notes.append(
            f"{size_name(key)}: the runs differ in more than the residual variant and the seed ({shown}); "
            "a loss difference is not the variant's alone"
        )
    steps = {(r.config.get("trainer") or {}).get("max_steps") for r in runs}
    if len(steps) > 1:
        notes.append(
            f"{size_name(key)}: trainer.max_steps differs ({', '.join(map(str, sorted(steps, key=str)))}): "
            "a schedule that depends on it (warmup, decay) is at a different point at the compared tokens"
        )
    return notes


def _check_duplicates(rows: Sequence[Compared]) -> None:
    seen: Dict[tuple, str] = {}
    for r in rows:
        key = (size_key(r.summary), r.summary.variant, r.summary.seed)
        if key in seen:
            raise UserInputError(
                f"{seen[key]} and {r.summary.run} are the same variant ({r.summary.variant}), size and seed "
                f"({r.summary.seed}): a seed is counted once; pass one of them (or give repeats different seeds)"
            )
        seen[key] = r.summary.run


def pair_deltas(rows: Sequence[Compared], reference: str) -> List[str]:
    """Set each row's ``delta`` against the reference run of the same size and seed; notes for unpaired runs."""
    ref = {(size_key(r.summary), r.summary.seed): r.loss for r in rows if r.summary.variant == reference}
    unpaired = []
    for r in rows:
        base = ref.get((size_key(r.summary), r.summary.seed))
        r.delta = None if base is None else r.loss - base
        if base is None and r.summary.variant != reference:
            unpaired.append(r.label)
    if unpaired and ref:
        return [f"no {reference} run with the same size and seed, so no Δ for: {'; '.join(unpaired)}"]
    return []


def aggregate(rows: Sequence[Compared], order) -> List[Aggregate]:
    """One :class:`Aggregate` per (size, variant), sorted by size then ``order(variant)``."""
    by: Dict[tuple, Aggregate] = {}
    for r in sorted(rows, key=lambda r: r.summary.seed):
        key = (size_key(r.summary), r.summary.variant)
        agg = by.setdefault(key, Aggregate(size=key[0], variant=key[1], tokens=r.tokens, seeds=[], losses=[]))
        agg.seeds.append(r.summary.seed)
        agg.losses.append(r.loss)
        agg.flops.append(r.flops)
        if r.delta is not None:
            agg.deltas.append(r.delta)
    return sorted(by.values(), key=lambda a: (a.size[1], a.size[2], a.size[0], order(a.variant)))

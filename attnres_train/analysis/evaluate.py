"""Held-out evaluation of a checkpoint: loss, perplexity and bits per byte on validation sources.

Why it mirrors the trainer: a number from ``attnres-eval`` must be the number the run logged on the same data,
so the samples come from the same ``ValidationSet`` (data.val_sources, or the run's held-out slice), each
batch's mean token loss is weighted by its tokens, and val sources are aggregated by tokens
(train/validation.py). Bits per byte: docs/analysis.md, "attnres-eval".
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..config.data import DataSourceConfig, as_data_config, validate_data_config
from ..config.errors import ConfigError, UserInputError
from ..data.loader import ValidationSet, build_datasets, open_val_sources
from ..data.token_bytes import token_byte_lengths
from ..data.tokenizer import Tokenizer, load_tokenizer
from ..model.doc_mask import document_ids
from ..model.lm_loss import IGNORE_INDEX
from .runs import Run

HELD_OUT = "held-out"  # the name of the run's val_fraction slice (one pool, as the trainer evaluates it)


@dataclass
class SourceResult:
    name: str
    samples: int
    tokens: int  #: target tokens evaluated
    nats: float  #: their summed cross entropy
    bytes: Optional[int]  #: the UTF-8 bytes they decode to (None: the tokenizer is not byte-level)

    @property
    def loss(self) -> float:
        return self.nats / self.tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_byte(self) -> Optional[float]:
        return self.nats / (math.log(2) * self.bytes) if self.bytes else None

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "samples": self.samples,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "loss": self.loss,
            "ppl": self.ppl,
            "bits_per_byte": self.bits_per_byte,
        }


def total(results: Sequence[SourceResult], name: str = "all") -> SourceResult:
    """All sources together: nats over tokens (the trainer's ``val_loss`` over val sources)."""
    nbytes = None if any(r.bytes is None for r in results) else sum(r.bytes for r in results)
    return SourceResult(
        name,
        sum(r.samples for r in results),
        sum(r.tokens for r in results),
        sum(r.nats for r in results),
        nbytes,
    )


def eval_data(run: Run, sources: Optional[List[str]] = None) -> tuple:
    """``(ValidationSet, tokenizer, data config)`` for ``run``: the given source paths (read like val_sources,
    with the run's tokenizer and seq_len), else the run's ``data.val_sources``, else its held-out slice."""
    raw = copy.deepcopy(run.config.get("data") or {})
    raw["num_workers"] = 0
    where = run.path / "config.yaml"
    try:
        cfg = validate_data_config(as_data_config(raw))
        if sources:
            cfg.val_sources = [DataSourceConfig(path=p) for p in sources]
            cfg.val_fraction = None
            cfg = validate_data_config(cfg, prefix="data")
    except ConfigError as exc:
        raise UserInputError(f"{where}: {exc}") from None
    vocab = int(run.config["model"]["vocab_size"])
    if cfg.val_sources:
        tokenizer = load_tokenizer(cfg.tokenizer)
        return open_val_sources(cfg, tokenizer, progress=False, model_vocab_size=vocab), tokenizer, cfg
    data = build_datasets(cfg, model_vocab_size=vocab, progress=False)
    if data.val.num_samples == 0:
        raise UserInputError(
            f"{run.path}: the run has no validation data (no data.val_sources, and data.val_fraction holds out "
            "nothing); name sources to evaluate with --source"
        )
    return data.val, data.tokenizer, cfg


@torch.no_grad()
def evaluate(
    model,
    val: ValidationSet,
    tokenizer: Tokenizer,
    batch_size: int,
    max_batches: Optional[int] = None,
    doc_eos_id: Optional[int] = None,
    device="cpu",
) -> List[SourceResult]:
    """One result per val source (or one for the held-out slice, named :data:`HELD_OUT`). ``max_batches``
    caps each source (the slice as a whole) like ``trainer.val_batches``; None: every sample. ``doc_eos_id``:
    document masking on, as the run trained."""
    table = token_byte_lengths(tokenizer)
    table_t = torch.from_numpy(table) if table is not None else None
    groups = [(n, n) for n in val.names] if val.separate else [(HELD_OUT, None)]
    out = []
    for name, source in groups:
        samples = tokens = nbytes = 0
        nats = 0.0
        for batch in val.batches(batch_size, max_batches=max_batches, source=source):
            x, y = batch[:, :-1].to(device), batch[:, 1:].to(device)
            doc = {"doc_ids": document_ids(x, doc_eos_id)} if doc_eos_id is not None else {}
            loss = model(x, labels=y, **doc).loss
            keep = batch[:, 1:] != IGNORE_INDEX
            n = int(keep.sum())
            nats += float(loss) * n  # the batch's token mean, weighted by its tokens (as TrainModule.eval_loss)
            samples, tokens = samples + batch.shape[0], tokens + n
            if table_t is not None:
                nbytes += int(table_t[batch[:, 1:][keep]].sum())
        if tokens:
            out.append(SourceResult(name, samples, tokens, nats, nbytes if table is not None else None))
    if not out:
        raise UserInputError("no validation sample to evaluate")
    return out

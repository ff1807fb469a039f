"""Data config schema: where training text comes from, how it is tokenized, blended, split and cached.

These dataclasses are the Hydra structured-config schema for the ``data`` group. They are plain values (no
paths are opened here) so a sweep override like ``data.seq_len=0`` fails in :func:`validate_data_config`
with one :class:`ConfigError` naming the field, before any file is read or tokenized. Problems that need the
filesystem (a missing file, bad UTF-8) are raised later, by the data package, as ``UserInputError``.

The default config trains on the ``stdlib`` corpus (the installed Python standard library's ``.py`` files)
with the built-in byte tokenizer, so ``make train`` works on any machine with no download. See docs/data.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, List, Optional

from .errors import ConfigError
from .structured import as_structured

DATA_KINDS = ("auto", "hf", "text", "jsonl", "parquet", "arrow", "memmap", "megatron", "stdlib")
TEXT_UNITS = ("file", "paragraph")


@dataclass
class DataSourceConfig:
    """One corpus in the blend.

    ``path`` is a local file, directory or glob, a Megatron ``.bin/.idx`` prefix, a directory of our token
    shards (written by ``attnres-prepare``), the word ``stdlib``, or a Hugging Face hub dataset name.
    ``kind: auto`` infers the reader from the path (see docs/data.md, "Kinds").
    """

    # Local file, dir or glob, Megatron .bin/.idx prefix, attnres-prepare shards, "stdlib" or a hub dataset.
    path: str = "stdlib"
    # The reader: auto (inferred from the path) | hf | text | jsonl | parquet | arrow | memmap | megatron | stdlib.
    kind: str = "auto"
    # Optional stable name: shown in logs and seeds this source's split and shuffle. Unset, they are seeded
    # by the source's content, so the same corpus gives the same order wherever its files are.
    name: Optional[str] = None
    # Relative blend weight (> 0); weights are normalised over all sources.
    weight: float = 1.0
    # jsonl / parquet / arrow / hf: the column holding the document text.
    text_field: str = "text"
    # hf: which split to read (local files are always read whole).
    split: str = "train"
    # hf: hub dataset id; when set it replaces ``path``.
    hf_name: Optional[str] = None
    # hf: dataset configuration (subset) name, e.g. "wikitext-103-raw-v1"; passed as ``name=``.
    hf_config: Optional[str] = None
    # hf: a dataset revision (branch, tag or commit sha) passed as ``revision=``. It is part of the cache key,
    # so pin it to be sure a changed hub dataset never reuses a stale tokenized cache.
    hf_revision: Optional[str] = None
    # hf: stream rows instead of downloading the whole dataset first (best with max_docs/max_bytes).
    hf_streaming: bool = True
    # text: "file" = one document per file; "paragraph" = one per blank-line-separated paragraph.
    text_unit: str = "file"
    # Per-source overrides of DataConfig.max_docs / max_bytes (null = use the global value).
    max_docs: Optional[int] = None
    # Per-source override of DataConfig.max_bytes (null = use the global value).
    max_bytes: Optional[int] = None


@dataclass
class DataConfig:
    """The whole data pipeline. Defaults: byte tokenizer over a capped stdlib corpus."""

    sources: List[DataSourceConfig] = field(default_factory=lambda: [DataSourceConfig(path="stdlib", kind="stdlib")])
    # "byte" (built-in, 256 byte ids + specials, needs no files), a local tokenizer directory / tokenizer.json,
    # or a Hugging Face hub tokenizer name (loaded with transformers.AutoTokenizer).
    tokenizer: str = "byte"
    # Tokens per training sample; each sample holds seq_len + 1 tokens (inputs and shifted targets).
    seq_len: int = 256
    # Fraction of *documents* of every source held out for validation (0 = none). null (default): 0.01, or 0
    # when val_sources is set (a value > 0 together with val_sources is an error).
    val_fraction: Optional[float] = None
    # Held-out evaluation sources, same schema as ``sources`` (``weight`` unused): when set, validation reads
    # every document of each (logged as val/<name>/loss and, over all, val_loss) instead of a val_fraction
    # slice of ``sources``. docs/data.md, "Validation".
    val_sources: List[DataSourceConfig] = field(default_factory=list)
    # Seeds the validation split and the per-epoch shuffles. Changing it changes the data order.
    seed: int = 1234
    # Where tokenized shards of raw-text sources are cached, keyed by (source, tokenizer, limits).
    cache_dir: str = "data_cache"
    # Per-source limits on raw documents read (null = no limit). The stdlib source caps itself at
    # STDLIB_DEFAULT_MAX_BYTES when max_bytes is null.
    max_docs: Optional[int] = None
    # Per-source limit on raw bytes read (null = no limit; the stdlib source then caps itself).
    max_bytes: Optional[int] = None
    # Background threads that assemble upcoming batches (0 = assemble synchronously in next_batch()).
    num_workers: int = 1
    # Document masking: MLA attends only within a document and KDA restarts its state at every document start
    # (boundaries from the tokens: a document ends at its EOS), so each document trains as if alone. docs/data.md.
    document_masking: bool = False


DEFAULT_VAL_FRACTION = 0.01


def held_out_fraction(cfg: DataConfig) -> float:
    """The share of documents of ``sources`` held out for validation: ``val_fraction``, or when it is null
    0.01 (0 with ``val_sources``, which replace the held-out slice)."""
    if cfg.val_fraction is not None:
        return float(cfg.val_fraction)
    return 0.0 if cfg.val_sources else DEFAULT_VAL_FRACTION


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _optional_positive(value: Any, path: str) -> None:
    if value is not None and (not _is_int(value) or value <= 0):
        raise ConfigError(path, f"must be a positive integer or null, got {value!r}")


def coerce_source(src: Any, path: str) -> DataSourceConfig:
    """Accept a DataSourceConfig, a DictConfig or a plain dict (e.g. YAML without the schema)."""
    if isinstance(src, DataSourceConfig):
        return src
    if isinstance(src, str):
        return DataSourceConfig(path=src)
    try:
        items = dict(src.items())
    except AttributeError:
        raise ConfigError(path, f"must be a mapping with at least 'path', got {src!r}") from None
    known = {f.name for f in fields(DataSourceConfig)}
    unknown = sorted(set(items) - known)
    if unknown:
        raise ConfigError(f"{path}.{unknown[0]}", f"unknown source option; known options: {', '.join(sorted(known))}")
    return DataSourceConfig(**items)


def validate_source(src: Any, path: str) -> DataSourceConfig:
    s = coerce_source(src, path)
    if s.name is not None and (not isinstance(s.name, str) or not s.name.strip()):
        raise ConfigError(f"{path}.name", f"must be a non-empty string or null, got {s.name!r}")
    if s.kind not in DATA_KINDS:
        raise ConfigError(f"{path}.kind", f"unknown kind {s.kind!r}; choose one of {'|'.join(DATA_KINDS)}")
    if not s.hf_name and (not isinstance(s.path, str) or not s.path.strip()):
        raise ConfigError(f"{path}.path", "must be a non-empty path, glob, hub name or 'stdlib'")
    if s.hf_revision is not None and (not isinstance(s.hf_revision, str) or not s.hf_revision.strip()):
        raise ConfigError(f"{path}.hf_revision", f"must be a non-empty branch, tag or commit, got {s.hf_revision!r}")
    if s.hf_name is not None and s.kind not in ("auto", "hf"):
        raise ConfigError(f"{path}.hf_name", f"only used with kind hf (or auto), but kind is {s.kind!r}")
    w = s.weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
        raise ConfigError(f"{path}.weight", f"must be a finite number > 0, got {w!r}")
    if not isinstance(s.text_field, str) or not s.text_field:
        raise ConfigError(f"{path}.text_field", f"must be a non-empty column name, got {s.text_field!r}")
    if not isinstance(s.split, str) or not s.split:
        raise ConfigError(f"{path}.split", f"must be a non-empty split name, got {s.split!r}")
    if s.text_unit not in TEXT_UNITS:
        raise ConfigError(f"{path}.text_unit", f"must be one of {'|'.join(TEXT_UNITS)}, got {s.text_unit!r}")
    _optional_positive(s.max_docs, f"{path}.max_docs")
    _optional_positive(s.max_bytes, f"{path}.max_bytes")
    return s


def validate_data_config(cfg: DataConfig, prefix: str = "data") -> DataConfig:
    """Check every field; raise one ConfigError naming the first bad field. Returns ``cfg``.

    Sources given as plain dicts (YAML without the schema) are converted to DataSourceConfig in place
    when ``cfg`` is a dataclass.
    """
    p = prefix
    sources = list(cfg.sources) if cfg.sources is not None else []
    if not sources:
        raise ConfigError(f"{p}.sources", "needs at least one source (e.g. [{path: stdlib}])")
    checked = [validate_source(s, f"{p}.sources[{i}]") for i, s in enumerate(sources)]
    if isinstance(cfg, DataConfig):
        cfg.sources = checked
    if not isinstance(cfg.tokenizer, str) or not cfg.tokenizer.strip():
        raise ConfigError(f"{p}.tokenizer", "must be 'byte', a tokenizer directory, or a hub tokenizer name")
    if not _is_int(cfg.seq_len) or cfg.seq_len <= 0:
        raise ConfigError(f"{p}.seq_len", f"must be a positive integer, got {cfg.seq_len!r}")
    vf = cfg.val_fraction
    if vf is not None and (isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 <= vf < 1.0):
        raise ConfigError(f"{p}.val_fraction", f"must be in [0, 1) or null, got {vf!r}")
    val_sources = list(cfg.val_sources) if cfg.val_sources is not None else []
    checked_val = [validate_source(s, f"{p}.val_sources[{i}]") for i, s in enumerate(val_sources)]
    names = set()
    for i, s in enumerate(checked_val):
        if s.weight != 1.0:
            raise ConfigError(
                f"{p}.val_sources[{i}].weight",
                f"validation sources are not blended (each is evaluated and logged on its own); remove weight={s.weight!r}",
            )
        if s.name is not None and s.name in names:
            raise ConfigError(f"{p}.val_sources[{i}].name", f"{s.name!r} is already the name of another val source")
        names.add(s.name)
    if isinstance(cfg, DataConfig):
        cfg.val_sources = checked_val
    if checked_val and vf:
        raise ConfigError(
            f"{p}.val_fraction",
            f"is {vf!r}, but validation reads data.val_sources instead of a held-out slice of data.sources; "
            "set it to null or 0 (the training sources then keep every document)",
        )
    if not _is_int(cfg.seed) or cfg.seed < 0:
        raise ConfigError(f"{p}.seed", f"must be an integer >= 0, got {cfg.seed!r}")
    if not isinstance(cfg.cache_dir, str) or not cfg.cache_dir:
        raise ConfigError(f"{p}.cache_dir", f"must be a directory path, got {cfg.cache_dir!r}")
    _optional_positive(cfg.max_docs, f"{p}.max_docs")
    _optional_positive(cfg.max_bytes, f"{p}.max_bytes")
    if not _is_int(cfg.num_workers) or cfg.num_workers < 0:
        raise ConfigError(f"{p}.num_workers", f"must be an integer >= 0, got {cfg.num_workers!r}")
    if not isinstance(cfg.document_masking, bool):
        raise ConfigError(f"{p}.document_masking", f"must be true or false, got {cfg.document_masking!r}")
    return cfg


def as_data_config(cfg) -> DataConfig:
    """Accept a DataConfig, a plain dict or an OmegaConf DictConfig; return a typed DataConfig.

    Unknown keys or wrong types raise a ConfigError naming the field (e.g. ``data.sources.0.weight``).
    """
    return as_structured(DataConfig, cfg, "data")

"""Parallel layout schema (``parallel.*``) and its validation: a pure function of the configs, no process groups.

The layout is ``pp x dp_replicate x dp_shard x tp`` (= the world size), tp innermost, pp outermost; expert
parallelism is folded out of the data-parallel ranks, never over tp (docs/parallel.md, "The mesh").
:func:`resolve_parallel_dims` checks every rule and returns a frozen :class:`ParallelDims`, raising one
:class:`ConfigError` that names the field; ``attnres_train.parallel.mesh`` builds the DeviceMesh from it.
Field-by-field documentation: docs/parallel.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError


@dataclass
class ParallelConfig:
    """How the world's ranks are laid out (docs/parallel.md). Product of the degrees = world size."""

    # Data-parallel replicas: plain DDP degree (gradients all-reduced) or the replicate dimension of HSDP.
    dp_replicate: int = 1
    # FSDP2 (ZeRO-3) shard degree; -1 = whatever is left of the world after dp_replicate * tp * pp.
    dp_shard: int = -1
    # Tensor-parallel degree (Megatron-style column/row sharding of the attention and FFN projections).
    tp: int = 1
    # Sequence parallelism over the tp group (norms / residual stream sharded along the sequence); needs tp > 1.
    sp: bool = False
    # Pipeline-parallel degree. Not implemented yet (a later issue): must be 1.
    pp: int = 1
    # Virtual pipeline stages per pp rank (interleaved schedules); must be 1 while pp == 1.
    vpp: int = 1
    # Expert-parallel degree, folded out of the data-parallel ranks (innermost ep ranks of dp_replicate x
    # dp_shard; see the module docstring). Must divide moe.num_experts.
    ep: int = 1


@dataclass(frozen=True)
class ParallelDims:
    """Resolved degrees (every -1 filled in). ``dp = dp_replicate * dp_shard``; ``world = pp * dp * tp``.

    Expert region: the data-parallel ranks are re-split as ``dp = edp_replicate x edp_shard x ep``; expert
    weights are sharded over ``ep`` (whole experts), FSDP-sharded over ``edp_shard`` and replicated over
    ``edp_replicate`` (with ep == 1 that is the dense layout: ``edp_* = dp_*``).
    """

    world_size: int
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    sp: bool
    ep: int
    vpp: int = 1
    edp_replicate: int = 1
    edp_shard: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def edp(self) -> int:
        """Replicas of each expert (data-parallel degree of the expert weights)."""
        return self.dp // self.ep

    @property
    def fsdp(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp(self) -> bool:
        """Pure replication (no sharding of dense weights)."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def dense_shard_dims(self) -> tuple:
        return ("dp_shard",) if self.dp_shard > 1 else ()

    def describe(self) -> str:
        s = f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} tp={self.tp}{'+sp' if self.sp else ''}"
        if self.pp > 1:
            s = f"pp={self.pp} " + s
        if self.ep > 1:
            s += f" ep={self.ep} (experts: edp_replicate={self.edp_replicate} edp_shard={self.edp_shard})"
        return s


def _degree(value, path: str, allow_fill: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or (allow_fill and value == -1))
    if not ok:
        extra = " or -1 (fill the rest of the world)" if allow_fill else ""
        raise ConfigError(path, f"must be a positive integer{extra}, got {value!r}")


def resolve_parallel_dims(
    cfg: ParallelConfig, world_size: int, model_cfg=None, seq_len: Optional[int] = None, prefix: str = "parallel"
) -> ParallelDims:
    """Validate ``cfg`` against the world size (and, when given, the model and sequence length).

    Pure: no process groups, no tensors. Raises one :class:`ConfigError` naming the first bad field.
    """
    p = prefix
    for name in ("dp_replicate", "tp", "pp", "vpp", "ep"):
        _degree(getattr(cfg, name), f"{p}.{name}")
    _degree(cfg.dp_shard, f"{p}.dp_shard", allow_fill=True)
    if not isinstance(cfg.sp, bool):
        raise ConfigError(f"{p}.sp", f"must be true or false, got {cfg.sp!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(p, f"world size must be a positive integer, got {world_size!r}")
    if cfg.vpp != 1 and cfg.pp == 1:
        raise ConfigError(f"{p}.vpp", f"virtual pipeline stages need pipeline parallelism (pp > 1); got vpp={cfg.vpp}")

    fixed = cfg.dp_replicate * cfg.tp * cfg.pp
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % fixed:
            raise ConfigError(
                f"{p}.dp_shard",
                f"dp_shard=-1 cannot fill the world: world size {world_size} is not "
                f"divisible by dp_replicate*tp*pp = {cfg.dp_replicate}*{cfg.tp}*{cfg.pp} = {fixed}",
            )
        dp_shard = world_size // fixed
    if fixed * dp_shard != world_size:
        raise ConfigError(
            f"{p}.dp_shard",
            f"dp_replicate*dp_shard*tp*pp = {cfg.dp_replicate}*{dp_shard}*{cfg.tp}*"
            f"{cfg.pp} = {fixed * dp_shard} does not equal the world size {world_size} "
            f"(dp_shard=-1 fills the rest)",
        )
    if cfg.sp and cfg.tp == 1:
        raise ConfigError(
            f"{p}.sp", "sequence parallelism shards over the tensor-parallel group: needs parallel.tp > 1"
        )

    dp = cfg.dp_replicate * dp_shard
    ep = cfg.ep
    edp_replicate, edp_shard = cfg.dp_replicate, dp_shard  # without EP experts follow the dense layout
    if ep > 1:
        if dp % ep:
            raise ConfigError(
                f"{p}.ep",
                f"ep={ep} is folded out of the data-parallel ranks and must divide "
                f"dp_replicate*dp_shard = {cfg.dp_replicate}*{dp_shard} = {dp}",
            )
        if dp_shard % ep == 0:  # EP inside the FSDP dimension (torchtitan's dp_shard_in_ep)
            edp_replicate, edp_shard = cfg.dp_replicate, dp_shard // ep
        elif ep % dp_shard == 0:  # EP spans all of dp_shard and part of dp_replicate
            edp_replicate, edp_shard = dp // ep, 1
        else:
            raise ConfigError(
                f"{p}.ep",
                f"ep={ep} must divide dp_shard={dp_shard} or be a multiple of it (the "
                f"expert group is the innermost ep ranks of dp_replicate x dp_shard)",
            )

    if model_cfg is not None:
        _check_model(cfg, model_cfg, p)
    if seq_len is not None and cfg.sp and seq_len % cfg.tp:
        raise ConfigError(
            "data.seq_len",
            f"seq_len={seq_len} must be divisible by parallel.tp={cfg.tp} with "
            f"sequence parallelism (parallel.sp=true) on",
        )
    return ParallelDims(
        world_size=world_size,
        pp=cfg.pp,
        dp_replicate=cfg.dp_replicate,
        dp_shard=dp_shard,
        tp=cfg.tp,
        sp=cfg.sp,
        ep=ep,
        vpp=cfg.vpp,
        edp_replicate=edp_replicate,
        edp_shard=edp_shard,
    )


def check_tp_divisible(m, tp: int, field: str = "parallel.tp") -> None:
    """The tensor-parallel divisibility rule, in one place (config validation and ``parallel/tensor*.py``):
    every size TP splits must be a multiple of ``tp``; ConfigError on ``field`` naming the model field."""
    rules = [
        ("model.kda.num_heads", m.kda.num_heads, "KDA heads are split over the tp group"),
        ("model.mla.num_heads", m.mla.num_heads, "MLA heads are split over the tp group"),
        ("model.vocab_size", m.vocab_size, "the embedding and LM head are split along the vocabulary"),
        (
            "model.moe.dense_intermediate_size",
            m.moe.dense_intermediate_size,
            "the dense SwiGLU is split along its hidden dimension",
        ),
    ]
    if m.moe.num_shared_experts > 0:
        rules.append(
            (
                "model.moe.intermediate_size",
                m.moe.intermediate_size * m.moe.num_shared_experts,
                "the shared expert's SwiGLU (intermediate_size * num_shared_experts) is split",
            )
        )
    for field_name, value, why in rules:
        require_tp_divides(tp, field_name, value, why, field)


def require_tp_divides(tp: int, field_name: str, value: int, why: str, field: str = "parallel.tp") -> None:
    """One size split over tp: ``value`` (the model's ``field_name``) must be a multiple of ``tp``."""
    if value % tp:
        raise ConfigError(field, f"tp={tp} must divide {field_name}={value} ({why})")


def _check_model(cfg: ParallelConfig, m, p: str) -> None:
    tp, ep = cfg.tp, cfg.ep
    if tp > 1:
        check_tp_divisible(m, tp, f"{p}.tp")
    if ep > 1:
        if m.moe.num_experts % ep:
            raise ConfigError(
                f"{p}.ep",
                f"ep={ep} must divide model.moe.num_experts={m.moe.num_experts} "
                f"(each expert-parallel rank holds num_experts/ep whole experts)",
            )
        if m.moe.first_k_dense >= m.num_layers:
            raise ConfigError(
                f"{p}.ep",
                f"ep={ep} but the model has no MoE layer "
                f"(model.moe.first_k_dense={m.moe.first_k_dense} >= num_layers={m.num_layers})",
            )

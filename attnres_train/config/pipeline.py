"""Pipeline-parallel options (``pipeline.*``) and their validation. The degrees themselves are ``parallel.pp``
(pipeline ranks P) and ``parallel.vpp`` (model chunks V per rank); this group says how the stages are cut and
scheduled. Pure values: nothing here touches process groups (docs/pipeline.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .errors import ConfigError

# The one list of schedule names: the generators' registry (parallel/pipeline/generators.py GENERATORS) asserts
# it covers exactly these names.
PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zb_h1", "zb_v", "dualpipev")
# schedules with their own I/W split (zero bubble; DualPipeV splits part of its backwards) and the parallel.vpp they need
ZERO_BUBBLE = {"zb_h1": 1, "zb_v": 2, "dualpipev": 2}
SCHEDULE_CHUNKS = {"1f1b": 1, **ZERO_BUBBLE}  # schedules that fix V (parallel.vpp)
COMM_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class PipelineConfig:
    # gpipe | 1f1b (vpp = 1) | interleaved_1f1b (Megatron order; with vpp = 1 it is plain 1F1B) |
    # zb_h1 (zero bubble, vpp = 1) | zb_v (zero bubble, vpp = 2, V-shape placement: rank r holds stages r and
    # 2*pp-1-r) | dualpipev (DeepSeek's DualPipeV, vpp = 2, V placement, microbatches >= 2*pp). The zero-bubble
    # ones split every backward into I + W themselves, DualPipeV some of them (docs/pipeline.md).
    schedule: str = "interleaved_1f1b"
    # Megatron's microbatch_group_size_per_vp_stage G (null = pp). Interleaving needs pp <= G <= microbatches
    # and microbatches % G == 0 or >= pp; with the default that is "microbatches is a multiple of pp".
    microbatch_group_size: Optional[int] = None
    # Decoder layers per stage, pp*vpp entries in stage order (stage s on rank s % pp), summing to
    # model.num_layers; zeros allowed at the ends. null = balanced split (see embed_cost / head_cost).
    layers_per_stage: Optional[List[int]] = None
    # Cost of the embedding (stage 0) and of the output aggregation + head + loss (last stage), in decoder
    # layers, charged by the automatic split. 0 keeps an even split even.
    embed_cost: float = 0.0
    # Cost of the output aggregation + head + loss (last stage), in decoder layers, for the automatic split.
    head_cost: float = 0.0
    # Cross-stage block cache: each hop carries only the blocks the receiving rank does not hold yet
    # (false: every hop resends all accumulated blocks; for comparison).
    block_cache: bool = True
    # Zero-bubble hook: backward as I (input grads) + W (weight grads); W runs w_delay compute slots later
    # (null: at the end of the step). A correctness reference, not a faster schedule yet.
    split_backward: bool = False
    # With split_backward: W runs this many compute slots after its I (null: at the end of the step).
    w_delay: Optional[int] = None
    # dtype of the packed stage-to-stage messages; null = the compute dtype (bfloat16 under bf16 training, else
    # the parameters' dtype). Needs parallel.pp > 1.
    comm_dtype: Optional[str] = None


def validate_pipeline_config(
    cfg: PipelineConfig,
    pp: int = 1,
    vpp: int = 1,
    num_layers: Optional[int] = None,
    microbatches: Optional[int] = None,
    prefix: str = "pipeline",
) -> PipelineConfig:
    """Check every field (and, given the degrees, layer count and microbatch count, that they fit)."""
    p = prefix
    if cfg.schedule not in PIPELINE_SCHEDULES:
        raise ConfigError(
            f"{p}.schedule", f"unknown schedule {cfg.schedule!r}; choose one of {'|'.join(PIPELINE_SCHEDULES)}"
        )
    if cfg.schedule == "1f1b" and vpp != 1:
        raise ConfigError(f"{p}.schedule", f"1f1b runs one chunk per rank but parallel.vpp={vpp}; use interleaved_1f1b")
    if cfg.schedule in ZERO_BUBBLE:
        if vpp != ZERO_BUBBLE[cfg.schedule]:
            raise ConfigError(
                "parallel.vpp",
                f"pipeline.schedule={cfg.schedule} runs {ZERO_BUBBLE[cfg.schedule]} "
                f"chunk(s) per rank, got parallel.vpp={vpp}",
            )
        if cfg.schedule == "dualpipev" and microbatches is not None and microbatches < 2 * pp:
            raise ConfigError(
                "trainer.global_batch_size",
                f"dualpipev needs at least 2 x parallel.pp = {2 * pp} microbatches per step, got {microbatches}",
            )
        for name in ("split_backward", "w_delay", "microbatch_group_size"):
            if getattr(cfg, name) not in (None, False):
                raise ConfigError(
                    f"{p}.{name}",
                    f"has no effect with pipeline.schedule={cfg.schedule} (the "
                    f"zero-bubble order fixes the I/W split and the microbatch order); unset it",
                )
    if cfg.microbatch_group_size is not None and (
        not isinstance(cfg.microbatch_group_size, int) or cfg.microbatch_group_size < pp
    ):
        raise ConfigError(
            f"{p}.microbatch_group_size",
            f"must be null or an integer >= parallel.pp={pp}, got {cfg.microbatch_group_size!r}",
        )
    for name in ("embed_cost", "head_cost"):
        v = getattr(cfg, name)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{p}.{name}", f"must be a number >= 0, got {v!r}")
    if cfg.w_delay is not None and (not isinstance(cfg.w_delay, int) or cfg.w_delay < 0):
        raise ConfigError(f"{p}.w_delay", f"must be null or an integer >= 0, got {cfg.w_delay!r}")
    if cfg.comm_dtype is not None and cfg.comm_dtype not in COMM_DTYPES:
        raise ConfigError(f"{p}.comm_dtype", f"must be null or one of {'|'.join(COMM_DTYPES)}, got {cfg.comm_dtype!r}")
    if cfg.comm_dtype is not None and pp == 1:
        raise ConfigError(
            f"{p}.comm_dtype", f"{cfg.comm_dtype!r} has no effect with parallel.pp=1 (no stage hops); unset it"
        )
    C = pp * vpp
    if cfg.layers_per_stage is not None:
        split = list(cfg.layers_per_stage)
        if len(split) != C:
            raise ConfigError(
                f"{p}.layers_per_stage",
                f"has {len(split)} entries but parallel.pp x parallel.vpp = {pp} x {vpp} = {C} stages",
            )
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in split):
            raise ConfigError(f"{p}.layers_per_stage", f"entries must be integers >= 0, got {split}")
        if num_layers is not None and sum(split) != num_layers:
            raise ConfigError(f"{p}.layers_per_stage", f"sums to {sum(split)} but model.num_layers={num_layers}")
    elif num_layers is not None and C > num_layers:
        raise ConfigError("parallel.vpp", f"pp x vpp = {C} stages exceed model.num_layers={num_layers}")
    if microbatches is not None and pp > 1 and cfg.schedule == "interleaved_1f1b" and vpp > 1:
        G = cfg.microbatch_group_size or pp
        if interleaved_rule_broken(pp, microbatches, G):
            raise ConfigError(
                "trainer.global_batch_size",
                f"interleaved 1F1B needs the microbatch count ({microbatches}) to be a multiple of "
                f"parallel.pp={pp} (Megatron's rule with group size G={G}: pp <= G <= microbatches "
                f"and microbatches % G == 0 or >= pp)",
            )
    return cfg


def interleaved_rule_broken(P: int, M: int, G: int) -> Optional[str]:
    """Megatron's microbatch rule for interleaving (P ranks, M microbatches, group size G): ``"range"`` unless
    ``P <= G <= M``, ``"remainder"`` unless ``M mod G`` is 0 or >= P, else None (the rule holds)."""
    if not P <= G <= M:
        return "range"
    if M % G and M % G < P:
        return "remainder"
    return None


def check_pipeline_dp(cfg: PipelineConfig, dp: int) -> None:
    """The one rule for pipeline x data parallelism: a backward split into I/W (``split_backward`` or a
    zero-bubble schedule) does not compose with dp > 1 (FSDP reduces in the input-gradient pass)."""
    if dp <= 1:
        return
    if cfg.split_backward:
        raise ConfigError(
            "pipeline.split_backward",
            f"the I/W backward split does not compose with data "
            f"parallelism (FSDP reduces in the input-gradient pass); dp={dp}",
        )
    if cfg.schedule in ZERO_BUBBLE:
        raise ConfigError(
            "pipeline.schedule",
            f"{cfg.schedule} splits the backward into I/W, which does not "
            f"compose with data parallelism yet (FSDP reduces in the input-gradient pass); dp={dp}",
        )

"""Analytic per-rank memory and per-step communication of a parallel layout, without building anything.

Why: choosing ``parallel.*`` for a 48B model on 1024 GPUs must not need the GPUs. ``attnres-plan`` prints these
numbers; everything here is a pure function of the model config, the resolved :class:`ParallelDims`, the batch
geometry and (pp > 1) the pipeline layout and schedule. Parameter counts are exact (checked against meta-device
builds by ``tests/pipeline/test_plan_cli.py``); what the memory and traffic figures assume (precisions, FSDP
buffers, activations kept, block cache, ring collectives; about ±30 % on activations) is listed in
docs/launch.md, "Planning a layout".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..config.model import ModelConfig, block_starts, is_moe_layer
from ..config.parallel import ParallelDims
from ..model.flops import attnres_sources

GiB = float(2**30)
FP32 = 4


@dataclass(frozen=True)
class Params:
    """Parameter elements by how they are sharded: over tp, replicated over tp, routed experts (over ep)."""

    tp: int = 0
    rep: int = 0
    experts: int = 0
    muon: int = 0  # elements Muon owns (hidden weight matrices), for the optimizer-state estimate

    def __add__(self, o: "Params") -> "Params":
        return Params(self.tp + o.tp, self.rep + o.rep, self.experts + o.experts, self.muon + o.muon)

    @property
    def total(self) -> int:
        return self.tp + self.rep + self.experts


def layer_params(cfg: ModelConfig, i: int) -> Params:
    """Parameters of decoder layer ``i`` (mixer, norms, FFN or MoE, AttnRes queries)."""
    d, m = cfg.hidden_size, cfg.moe
    if i in set(cfg.mla_layers):
        a = cfg.mla
        qk, r = a.qk_nope_head_dim + a.qk_rope_head_dim, a.kv_lora_rank
        tp = (
            d * a.num_heads * qk
            + r * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
            + a.num_heads * a.v_head_dim * d
        )
        low = d * (r + a.qk_rope_head_dim)
        p = Params(tp=tp, rep=low + r, muon=tp + low)
    else:
        k = cfg.kda
        H, K, hk = k.num_heads, k.head_dim, k.num_heads * k.head_dim
        mats = 3 * d * hk + 2 * K * hk + d * H + hk * d  # q/k/v, f_b/g_b, b, o
        p = Params(tp=mats + 3 * hk * k.conv_size + H + hk, rep=2 * d * K + K, muon=mats + 2 * d * K)
    p = p + Params(rep=2 * d + (4 * d if cfg.residual.mode != "prenorm" else 0))  # norms, AttnRes queries
    if not is_moe_layer(cfg, i):
        ffn = 3 * d * m.dense_intermediate_size
        return p + Params(tp=ffn, muon=ffn)
    shared = 3 * d * m.intermediate_size * m.num_shared_experts
    experts = m.num_experts * 3 * d * m.intermediate_size
    router = d * m.num_experts
    return p + Params(tp=shared, rep=router, experts=experts, muon=shared + router + experts)


def embed_params(cfg: ModelConfig) -> Params:
    return Params(tp=cfg.vocab_size * cfg.hidden_size)


def head_params(cfg: ModelConfig) -> Params:
    """Final norm, untied LM head and the output AttnRes query (the last stage's extras)."""
    d = cfg.hidden_size
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * d
    return Params(tp=head, rep=d + (2 * d if cfg.residual.mode != "prenorm" else 0))


def model_params(cfg: ModelConfig) -> Params:
    total = embed_params(cfg) + head_params(cfg)
    for i in range(cfg.num_layers):
        total = total + layer_params(cfg, i)
    return total


@dataclass
class TrainShape:
    """Batch geometry and training options the estimates depend on."""

    micro_batch_size: int = 1
    seq_len: int = 4096
    microbatches: int = 1  # per optimizer step on each dp rank (gradient accumulation = pipeline microbatches)
    activation_checkpointing: bool = False
    optimizer: str = "adamw"
    act_bytes: int = 2  # bf16 autocast (4: fp32 training)
    comm_bytes: Optional[int] = None  # pipeline messages (None: pipeline.comm_dtype null = the compute dtype)
    param_bytes: Optional[int] = None  # FSDP2 layer-unit all-gathers (None: the compute dtype; the root stays fp32)

    def __post_init__(self):
        self.comm_bytes = self.act_bytes if self.comm_bytes is None else self.comm_bytes
        self.param_bytes = self.act_bytes if self.param_bytes is None else self.param_bytes


# ----------------------------------------------------------------------------------------- activations
def _stream_scale(dims: ParallelDims) -> float:
    return 1.0 / dims.tp if dims.sp else 1.0


def layer_activation_bytes(cfg: ModelConfig, i: int, dims: ParallelDims, shape: TrainShape) -> float:
    """Bytes one microbatch keeps for the backward of decoder layer ``i`` on one rank (no checkpointing)."""
    d, a, f, tp = cfg.hidden_size, shape.act_bytes, FP32, dims.tp
    tokens = shape.micro_batch_size * shape.seq_len
    per_tok = 2 * 2 * d * f * _stream_scale(dims)  # two RMSNorms: fp32 input + normalised output
    if i in set(cfg.mla_layers):
        m = cfg.mla
        H, qk, r = m.num_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.kv_lora_rank
        region = (
            a
            * (2 * H * qk + 2 * r + m.qk_rope_head_dim + H * (m.qk_nope_head_dim + m.v_head_dim) + 2 * H * m.v_head_dim)
            + H * f
        )
    else:
        k = cfg.kda
        hk = k.num_heads * k.head_dim
        region = 14 * hk * a + hk * f * (1 + k.head_dim / 64) + k.num_heads * f + 2 * k.head_dim * a
    per_tok += d * a + region / tp  # region input (gathered, bf16) + per-head internals
    e = cfg.moe
    if not is_moe_layer(cfg, i):
        per_tok += d * a + 4 * e.dense_intermediate_size * a / tp
    else:
        moe = d * a + 2 * e.num_experts * f + e.top_k * (2 * d * a + 4 * e.intermediate_size * a + d * f)
        per_tok += moe * _stream_scale(dims)  # routed experts see this rank's tokens (all of them without SP)
        if e.num_shared_experts:
            per_tok += d * a + 4 * e.intermediate_size * e.num_shared_experts * a / tp
    per_tok += _attnres_bytes_per_token(cfg, i) * _stream_scale(dims)
    return per_tok * tokens


def _attnres_bytes_per_token(cfg: ModelConfig, i: int) -> float:
    """fp32 copies the depth mixing keeps for the two reads of layer ``i`` (stacked sources, keys, merges)."""
    if cfg.residual.mode == "prenorm":
        return 0.0
    d, f = cfg.hidden_size, FP32
    all_sources, starts = _depth_layout(cfg)
    sources = all_sources[2 * i : 2 * i + 2]
    if cfg.residual.mode == "full":
        return sum(2 * n * d * f + d * f for n in sources)
    opens = sum(1 for j in (2 * i, 2 * i + 1) if j in starts)
    return opens * 2 * max(sources) * d * f + 2 * 4 * d * f  # phase 1 once per block, phase 2 per read


_DEPTH_LAYOUTS: Dict[tuple, Tuple[List[int], frozenset]] = {}


def _depth_layout(cfg: ModelConfig) -> Tuple[List[int], frozenset]:
    """(sources per AttnRes read, block starts), computed once per residual layout rather than once per layer:
    per layer it made an estimate O(num_layers^2), minutes for a 20,000-layer config in the pre-flight."""
    r = cfg.residual
    key = (r.mode, cfg.num_layers, r.num_blocks, r.block_size, r.partition)
    if key not in _DEPTH_LAYOUTS:
        if len(_DEPTH_LAYOUTS) > 64:
            _DEPTH_LAYOUTS.clear()
        _DEPTH_LAYOUTS[key] = (attnres_sources(cfg), frozenset(block_starts(cfg)))
    return _DEPTH_LAYOUTS[key]


def stage_activation_bytes(
    cfg: ModelConfig, layers: range, dims: ParallelDims, shape: TrainShape, embed: bool, head: bool
) -> float:
    """One microbatch's activations of a stage holding ``layers`` (plus the embedding / head)."""
    d, f = cfg.hidden_size, FP32
    tokens = shape.micro_batch_size * shape.seq_len
    scale = _stream_scale(dims)
    if shape.activation_checkpointing:  # each layer keeps its input state only
        total = len(layers) * d * f * scale * tokens
    else:
        total = sum(layer_activation_bytes(cfg, i, dims, shape) for i in layers)
    if cfg.residual.mode != "prenorm":  # completed blocks stay referenced by the depth state
        total += _blocks_after(cfg, layers.stop) * d * f * scale * tokens
    if embed:
        total += d * f * scale * tokens
    if head:
        total += (2 * d * f * scale + cfg.vocab_size / dims.tp * (shape.act_bytes + 2 * f)) * tokens
    return total


def _blocks_after(cfg: ModelConfig, layer_end: int) -> int:
    starts = block_starts(cfg)
    return 1 + sum(1 for s in starts if s < 2 * layer_end)


def recompute_bytes(cfg: ModelConfig, layers: range, dims: ParallelDims, shape: TrainShape) -> float:
    """Transient activations of the one layer recomputed during backward (activation checkpointing)."""
    if not shape.activation_checkpointing or not len(layers):
        return 0.0
    return max(layer_activation_bytes(cfg, i, dims, shape) for i in layers)


# ------------------------------------------------------------------------------------------- per rank
@dataclass
class RankEstimate:
    pp_rank: int
    layers: List[int]
    params: Params  # this pp rank's parameters before tp/ep/FSDP sharding
    local_dense: float  # elements this rank stores (after tp and dp_shard)
    local_experts: float
    memory: Dict[str, float] = field(default_factory=dict)  # bytes by category
    inflight: int = 1  # peak microbatch-chunks whose activations are held
    blocks_cached: int = 0  # blocks this rank's cache keeps per microbatch

    @property
    def local_params(self) -> float:
        return self.local_dense + self.local_experts

    @property
    def total_memory(self) -> float:
        return sum(self.memory.values())


def _local(p: Params, dims: ParallelDims) -> Tuple[float, float, float]:
    """(dense elements, expert elements, Muon elements) stored by one rank of this pp stage group."""
    dense = (p.tp / dims.tp + p.rep) / dims.dp_shard
    experts = p.experts / dims.ep / dims.edp_shard
    muon_frac = p.muon / max(p.total, 1)
    return dense, experts, muon_frac * (dense + experts)


def _unit(p: Params, dims: ParallelDims) -> float:
    """Elements of an FSDP unit once all-gathered on one rank (still tp / ep sharded)."""
    return p.tp / dims.tp + p.rep + p.experts / dims.ep


def _peak_inflight(schedule, stage_bytes: Dict[int, float], rank: int) -> Tuple[float, int]:
    held, peak, count, peak_count = 0.0, 0.0, 0, 0
    for act in schedule.ranks[rank]:
        kind = act.kind.value
        if kind == "F":
            held += stage_bytes[act.stage]
            count += 1
        elif kind in ("B", "I"):
            held -= stage_bytes[act.stage]
            count -= 1
        peak, peak_count = max(peak, held), max(peak_count, count)
    return peak, peak_count


def estimate_ranks(
    cfg: ModelConfig, dims: ParallelDims, shape: TrainShape, layout=None, schedule=None
) -> List[RankEstimate]:
    """One :class:`RankEstimate` per pipeline rank (a single one without pipeline parallelism)."""
    P = dims.pp
    if P > 1 and (layout is None or schedule is None):
        raise ValueError("pp > 1 needs the pipeline layout and (compute) schedule")
    C = layout.num_stages if P > 1 else 1
    stage_layers = {s: range(*layout.layer_range(s)) for s in range(C)} if P > 1 else {0: range(cfg.num_layers)}
    stage_bytes = {s: stage_activation_bytes(cfg, stage_layers[s], dims, shape, s == 0, s == C - 1) for s in range(C)}
    out = []
    for r in range(P):
        stages = layout.stages_of(r) if P > 1 else [0]
        layers = [i for s in stages for i in stage_layers[s]]
        p = Params()
        for i in layers:
            p = p + layer_params(cfg, i)
        if 0 in stages:
            p = p + embed_params(cfg)
        if C - 1 in stages:
            p = p + head_params(cfg)
        dense, experts, muon = _local(p, dims)
        est = RankEstimate(pp_rank=r, layers=layers, params=p, local_dense=dense, local_experts=experts)
        local = dense + experts
        opt_bytes = 2 * FP32 * local if shape.optimizer == "adamw" else FP32 * muon + 2 * FP32 * (local - muon)
        units = [_unit(layer_params(cfg, i), dims) for i in layers] or [0.0]
        root = _unit(
            (embed_params(cfg) if 0 in stages else Params()) + (head_params(cfg) if C - 1 in stages else Params()), dims
        )
        fsdp = 0.0
        if dims.dp_shard > 1:  # root gathered in fp32; layer units in the compute dtype; one fp32 unsharded grad
            # pipeline stages keep all their layer units gathered from F to B; else the current and next unit
            gathered = sum(units) if P > 1 else 2 * max(units)
            fsdp = FP32 * root + shape.param_bytes * gathered + FP32 * max(units)
        if P > 1:
            acts, est.inflight = _peak_inflight(schedule, stage_bytes, r)
            est.blocks_cached = _cached_blocks(layout, r)
        else:
            acts, est.inflight = stage_bytes[0], 1
        tokens = shape.micro_batch_size * shape.seq_len / (dims.tp if dims.sp else 1)
        recompute = max((recompute_bytes(cfg, stage_layers[s], dims, shape) for s in stages), default=0.0)
        cache = est.blocks_cached * min(est.inflight, shape.microbatches) * tokens * cfg.hidden_size * shape.comm_bytes
        est.memory = {
            "weights": FP32 * local,
            "grads": FP32 * local,
            "optimizer": opt_bytes,
            "fsdp_buffers": fsdp,
            "activations": acts + recompute,
            "block_cache": cache,
        }
        if P > 1:
            # The runtime keeps at most max(2, inflight) sends in flight (+1 pack between compute and SEND), each
            # at most the largest outgoing payload: bounded by the schedule's depth, not by M (docs/pipeline.md).
            out_hops = [layout.payload_len(s) for s in stages if s < C - 1 and layout.rank_of(s + 1) != r]
            packs = min((max(2, est.inflight) + 1) * max(out_hops, default=0), shape.microbatches * sum(out_hops))
            est.memory["pipeline_sends"] = packs * tokens * cfg.hidden_size * shape.comm_bytes
        out.append(est)
    return out


def _cached_blocks(layout, rank: int) -> int:
    if not layout.block_cache or not layout.has_blocks:
        return 0
    return sum(1 for b in range(layout.num_blocks) if layout.readers(rank, b))


# ---------------------------------------------------------------------------------------- communication
@dataclass
class CommRow:
    group: str
    collective: str
    bytes: float  # sent by one rank per optimizer step
    note: str = ""


def estimate_comm(
    cfg: ModelConfig, dims: ParallelDims, shape: TrainShape, rank: RankEstimate, layout=None
) -> List[CommRow]:
    """Bytes one rank of pipeline rank ``rank.pp_rank`` sends per optimizer step, per process group."""
    M, rows = shape.microbatches, []
    ring = lambda n: (n - 1) / n  # noqa: E731
    dense_shard = rank.local_dense * FP32  # this rank's fp32 shard of the dense parameters
    pb = shape.param_bytes
    # Layer units are gathered for every microbatch's forward and again for its backward, except in pipeline
    # stages (kept gathered from F to B); the root unit (embedding, head, final norm) once per microbatch, in fp32.
    # Gradients are reduce-scattered in fp32 every microbatch (sharded accumulation, docs/performance.md).
    gathers = M if dims.pp > 1 else 2 * M
    root = (embed_params(cfg) if 0 in _stages(rank, layout) else Params()) + (
        head_params(cfg) if _last(rank, layout) else Params()
    )
    root_full = root.tp / dims.tp + root.rep  # elements of a gathered unit (still tp sharded)
    layers_full = rank.local_dense * dims.dp_shard - root_full
    if dims.dp_shard > 1:
        rs = ring(dims.dp_shard)
        rows.append(
            CommRow(
                "dp_shard",
                "all-gather params",
                rs * (gathers * layers_full * pb + M * root_full * FP32),
                f"layers {gathers} per step ({pb}-byte), root {M} (fp32)",
            )
        )
        rows.append(
            CommRow(
                "dp_shard", "reduce-scatter grads", M * rs * (layers_full + root_full) * FP32, f"fp32, {M} per step"
            )
        )
    if dims.dp_replicate > 1:
        rows.append(
            CommRow(
                "dp_replicate",
                "all-reduce grads",
                2 * ring(dims.dp_replicate) * dense_shard,
                "HSDP replicas" if dims.dp_shard > 1 else "DDP",
            )
        )
    exp_shard = rank.local_experts * FP32
    if rank.params.experts:
        if dims.edp_shard > 1:
            full = rank.local_experts * dims.edp_shard  # elements
            rs = ring(dims.edp_shard)
            rows.append(CommRow("edp_shard", "expert all-gather", gathers * rs * full * pb, f"{gathers} per step"))
            rows.append(CommRow("edp_shard", "expert reduce-scatter", M * rs * full * FP32, f"fp32, {M} per step"))
        if dims.edp_replicate > 1:
            rows.append(CommRow("edp_replicate", "expert all-reduce", 2 * ring(dims.edp_replicate) * exp_shard))
    tokens = shape.micro_batch_size * shape.seq_len
    act = tokens * cfg.hidden_size * shape.act_bytes
    moe_layers = [i for i in rank.layers if is_moe_layer(cfg, i)]
    redo = 1.5 if shape.activation_checkpointing else 1.0  # the recomputed forward repeats its collectives
    if dims.tp > 1:
        regions = len(rank.layers) + sum(
            1 for i in rank.layers if not is_moe_layer(cfg, i) or cfg.moe.num_shared_experts
        )
        regions += (0 in _stages(rank, layout)) + (_last(rank, layout))
        kind = "all-gather + reduce-scatter (SP)" if dims.sp else "all-reduce"
        rows.append(
            CommRow(
                "tp",
                f"activations: {kind}",
                redo * M * regions * 4 * ring(dims.tp) * act,
                f"{regions} tp regions per microbatch, fwd + bwd",
            )
        )
        rep = rank.params.rep * FP32 / dims.dp_shard
        rows.append(
            CommRow(
                "tp",
                "replicated-param grad all-reduce",
                M * 2 * ring(dims.tp) * rep,
                "partial grads of tp-replicated weights",
            )
        )
    if dims.ep > 1 and moe_layers:
        moe_tokens = tokens / (dims.tp if dims.sp else 1)
        buf = moe_tokens * cfg.moe.top_k * cfg.hidden_size * shape.act_bytes
        rows.append(
            CommRow(
                "ep",
                "all-to-all dispatch + combine",
                redo * M * len(moe_layers) * 4 * ring(dims.ep) * buf,
                f"{len(moe_layers)} MoE layers, fwd + bwd",
            )
        )
    if dims.pp > 1:
        r, C = rank.pp_rank, layout.num_stages
        stages = layout.stages_of(r)
        fwd = sum(layout.payload_len(s) for s in stages if s < C - 1 and layout.rank_of(s + 1) != r)
        bwd = sum(layout.payload_len(s - 1) for s in stages if s > 0 and layout.rank_of(s - 1) != r)
        local_t = tokens / (dims.tp if dims.sp else 1)
        rows.append(
            CommRow(
                "pp",
                "send/recv hops",
                M * (fwd + bwd) * local_t * cfg.hidden_size * shape.comm_bytes,
                f"{fwd} block tensors forward + {bwd} backward per microbatch"
                + (" (block cache)" if layout.block_cache and layout.has_blocks else ""),
            )
        )
    return rows


def _stages(rank: RankEstimate, layout) -> List[int]:
    return layout.stages_of(rank.pp_rank) if layout is not None and layout.num_ranks > 1 else [0]


def _last(rank: RankEstimate, layout) -> bool:
    if layout is None or layout.num_ranks == 1:
        return True
    return layout.num_stages - 1 in layout.stages_of(rank.pp_rank)


def inflight_microbatches(schedule, rank: int) -> int:
    """Peak number of (chunk, microbatch) forwards whose backward has not run yet on ``rank``."""
    return _peak_inflight(schedule, {s: 0.0 for s in range(schedule.num_stages)}, rank)[1]


def summary(cfg: ModelConfig) -> Dict[str, Optional[int]]:
    """Totals for the header line: parameters, active parameters per token (from the exact categories)."""
    p = model_params(cfg)
    m = cfg.moe
    moe_layers = sum(is_moe_layer(cfg, i) for i in range(cfg.num_layers))
    inactive = moe_layers * (m.num_experts - m.top_k) * 3 * cfg.hidden_size * m.intermediate_size
    return {"total": p.total, "active": p.total - inactive, "experts": p.experts}

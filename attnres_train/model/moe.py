"""DeepSeek-V3 / Moonlight style MoE FFN (spec §6): sigmoid router, aux-loss-free bias, dropless experts.

Why it is split the way it is: ``MoE.forward`` runs ``route -> dispatch -> run_experts -> combine`` as separate
steps, and calls the routed experts (``experts``) and the aux loss's per-sequence sums (``sequence_stats``) as
child modules: plain seams that expert / sequence parallelism substitute without touching the routing math or
the expert FFN. ``GroupedExperts`` consumes rows already sorted by expert plus per-expert row counts.
Routing semantics, balancing and the fp32 counters: docs/model.md ("MoE"); precision: docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config.model import ModelConfig
from .mlp import SwiGLU


class _KeepFP32Buffers(nn.Module):
    """``.to(dtype)`` / ``.half()`` move the buffers named in ``_fp32_buffers`` but never change their dtype."""

    _fp32_buffers: tuple = ()

    def _apply(self, fn, recurse=True):
        saved = {n: self._buffers[n] for n in self._fp32_buffers if self._buffers.get(n) is not None}
        out = super()._apply(fn, recurse)
        for name, old in saved.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:  # a dtype cast: keep the exact fp32 values, follow only the device
                self._buffers[name] = old.to(device=new.device)
        return out


def _in_backward() -> bool:
    """True while the autograd engine runs (e.g. activation-checkpoint recomputation of this forward)."""
    return torch._C._current_graph_task_id() != -1


class Router(_KeepFP32Buffers):
    """Sigmoid top-k router with the aux-loss-free ``e_score_correction_bias`` (selection only, no gradient)."""

    _fp32_buffers = ("e_score_correction_bias",)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.num_experts = m.num_experts
        self.top_k = m.top_k
        self.renormalize = m.renormalize
        self.routed_scaling_factor = m.routed_scaling_factor
        self.bias_in_weights = m.bias_in_weights
        self.weight = nn.Parameter(torch.empty(m.num_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(m.num_experts, dtype=torch.float32))
        self.init_weights(cfg.init_std)

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        self.e_score_correction_bias.zero_()

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(topk_idx_TK long, topk_weight_TK fp32, scores_TE fp32)``; scores are unbiased."""
        # At least fp32 logits regardless of the model dtype or autocast (as transformers and DeepSeek-V3 do);
        # fp64 models stay fp64 so the fp64 equivalence tests are exact.
        cdt = torch.promote_types(x_TD.dtype, torch.float32)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.to(cdt), self.weight.to(cdt))
        scores_TE = logits_TE.sigmoid()
        biased_TE = scores_TE + self.e_score_correction_bias.float()  # bias is a buffer: no gradient
        topk_idx_TK = torch.topk(biased_TE.detach(), self.top_k, dim=-1, sorted=False).indices
        source_TE = biased_TE if self.bias_in_weights else scores_TE
        topk_weight_TK = source_TE.gather(1, topk_idx_TK)
        if self.renormalize:
            topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return topk_idx_TK, topk_weight_TK * self.routed_scaling_factor, scores_TE


_GROUPED_MM_OK: dict = {}


def expert_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the routed experts (and the expert-parallel all-to-all) run in for input ``x``.

    Under autocast an fp32 input is cast to the autocast dtype (bf16): ``F.grouped_mm`` has no autocast rule,
    so without this cast the experts, most of the model's FLOPs, would run in fp32 and expert parallelism
    would ship fp32 rows. fp64 stays fp64 (autocast never casts it); outside autocast ``x.dtype``.
    """
    if x.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``F.grouped_mm`` whose backward also accepts non-contiguous (e.g. expanded) output gradients."""
    out = F.grouped_mm(a, b, offs=offs)
    if out.requires_grad:
        out.register_hook(lambda g: g.contiguous())
    return out


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@torch.compiler.disable  # runs a backward: never traced (the result is cached before any compiled call needs it)
def _probe_grouped_mm(device: torch.device, dtype: torch.dtype, d: int, ffn_dim: int) -> bool:
    """Run ``F.grouped_mm`` forward + backward on known operands; True if it works and gives the right values.

    Operands of ones: every output is ``d`` and every ``a`` gradient ``ffn_dim``, compared with a relative
    tolerance (bf16 cannot represent every integer above 256 exactly, so ``==`` would wrongly reject it).
    """
    try:
        # Plain saved tensors (innermost hooks win): an enclosing activation checkpoint (composable, hook-based)
        # would otherwise capture the probe's graph and recompute its layer during the probe's backward.
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device.type, enabled=False),
            torch.autograd.graph.saved_tensors_hooks(_identity, _identity),
        ):
            a = torch.ones(3, d, device=device, dtype=dtype, requires_grad=True)
            b = torch.ones(2, ffn_dim, d, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([1, 3], device=device, dtype=torch.int32)
            out = _grouped_mm(a, b.transpose(-2, -1), offs)
            out.sum().backward()
        rtol = 1e-5 if dtype == torch.float32 else 1e-2
        return (
            out.shape == (3, ffn_dim)
            and torch.allclose(out.float(), torch.full_like(out.float(), d), rtol=rtol)
            and torch.allclose(a.grad.float(), torch.full_like(a.grad.float(), ffn_dim), rtol=rtol)
        )
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _grouped_mm_usable(x: torch.Tensor, ffn_dim: int) -> bool:
    """Whether ``F.grouped_mm`` works for these operands (probed once per device/dtype/shape, fwd + bwd).

    torch 2.13 runs it on CPU for fp32/bf16 (not fp64) when row strides are 16-byte aligned.
    """
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return False  # torch 2.13's CPU meta kernel for grouped_mm accepts bf16 only under torch.compile
    d = x.shape[-1]
    if (d * x.element_size()) % 16 or (ffn_dim * x.element_size()) % 16:
        return False
    key = (x.device.type, x.dtype, d, ffn_dim)
    if key not in _GROUPED_MM_OK:
        _GROUPED_MM_OK[key] = _probe_grouped_mm(x.device, x.dtype, d, ffn_dim)
    return _GROUPED_MM_OK[key]


class _PerExpertSwiGLU(torch.autograd.Function):
    """SwiGLU of each expert over its rows (sorted by expert; ``bounds[j]:bounds[j+1]``), one ``mm`` per weight.

    Why a Function: plain autograd over per-expert slices (``x[s:e]``, ``w1[j]``) gives each slice's backward a
    zero-filled gradient of the WHOLE ``[N, D]`` rows / ``[E, ff, d]`` weight to copy into, per expert: an f1
    layer's fallback took ~6x the grouped-GEMM time. Here the GEMMs write into one gradient per input, the
    elementwise SwiGLU runs once over all rows, and only ``x``, ``a = x w1^T``, ``b = x w3^T`` are saved.
    """

    @staticmethod
    def forward(ctx, x_ND, bounds, w1_EFD, w3_EFD, w2_EDF):
        n, ff = x_ND.shape[0], w1_EFD.shape[1]
        a_NF, b_NF = x_ND.new_empty(n, ff), x_ND.new_empty(n, ff)
        y_ND = x_ND.new_empty(n, w2_EDF.shape[1])
        spans = [(j, s, e) for j, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])) if e > s]
        for j, s, e in spans:
            torch.mm(x_ND[s:e], w1_EFD[j].t(), out=a_NF[s:e])
            torch.mm(x_ND[s:e], w3_EFD[j].t(), out=b_NF[s:e])
        h_NF = F.silu(a_NF) * b_NF
        for j, s, e in spans:
            torch.mm(h_NF[s:e], w2_EDF[j].t(), out=y_ND[s:e])
        ctx.save_for_backward(x_ND, a_NF, b_NF, w1_EFD, w3_EFD, w2_EDF)
        ctx.spans = spans
        return y_ND

    @staticmethod
    def backward(ctx, grad_ND):
        x_ND, a_NF, b_NF, w1_EFD, w3_EFD, w2_EDF = ctx.saved_tensors
        saved_w = (w1_EFD, w3_EFD, w2_EDF)
        spans, (need_x, _, need_w1, need_w3, need_w2) = ctx.spans, ctx.needs_input_grad
        dh_NF = torch.empty_like(a_NF)
        for j, s, e in spans:
            torch.mm(grad_ND[s:e], w2_EDF[j], out=dh_NF[s:e])
        silu_NF = F.silu(a_NF)
        db_NF = dh_NF * silu_NF
        # the ops autograd runs for silu(a) * b (ATen's silu_backward: fp32 math inside for bf16)
        da_NF = torch.ops.aten.silu_backward(dh_NF.mul_(b_NF), a_NF)
        h_NF = silu_NF.mul_(b_NF) if need_w2 else None
        gw1, gw3, gw2 = (torch.empty_like(w) if n else None for w, n in zip(saved_w, (need_w1, need_w3, need_w2)))
        idle = sorted(set(range(w1_EFD.shape[0])) - {j for j, _, _ in spans})
        for g in (gw1, gw3, gw2):
            if g is not None and idle:  # an expert without rows: a zero gradient, as a slice's backward gives it
                g[idle] = 0
        gx = torch.empty_like(x_ND) if need_x else None
        for j, s, e in spans:
            if need_x:
                torch.mm(da_NF[s:e], w1_EFD[j], out=gx[s:e]).addmm_(db_NF[s:e], w3_EFD[j])
            if need_w1:
                torch.mm(da_NF[s:e].t(), x_ND[s:e], out=gw1[j])
            if need_w3:
                torch.mm(db_NF[s:e].t(), x_ND[s:e], out=gw3[j])
            if need_w2:
                torch.mm(grad_ND[s:e].t(), h_NF[s:e], out=gw2[j])
        return gx, None, gw1, gw3, gw2


@torch.compiler.disable  # host-side counts: traced, every step's counts would be new constants (recompiles)
def _experts_loop(
    x_ND: torch.Tensor,
    counts: Union[torch.Tensor, Sequence[int]],
    w1_EFD: torch.Tensor,
    w3_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
) -> torch.Tensor:
    """One SwiGLU per expert over its rows (the fallback where ``F.grouped_mm`` is unusable: fp64, CPU compile)."""
    counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
    if sum(counts) != x_ND.shape[0]:
        raise ValueError(f"counts sum to {sum(counts)} but x has {x_ND.shape[0]} rows")
    if x_ND.shape[0] == 0:
        return x_ND.new_zeros(0, w2_EDF.shape[1])
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + int(c))
    return _PerExpertSwiGLU.apply(x_ND, bounds, w1_EFD, w3_EFD, w2_EDF)


class GroupedExperts(nn.Module):
    """``E`` SwiGLU experts as stacked weights: ``w1``/``w3`` ``[E, ff, d]`` (gate/up), ``w2`` ``[E, d, ff]``."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, init_std: float = 0.02, impl: str = "auto"
    ):
        super().__init__()
        if impl not in ("auto", "loop", "grouped_mm"):
            raise ValueError(f"GroupedExperts impl must be auto|loop|grouped_mm, got {impl!r}")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.init_weights(init_std)

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        for w in (self.w1, self.w2, self.w3):
            nn.init.normal_(w, mean=0.0, std=init_std)

    def forward(
        self, x_ND: torch.Tensor, counts_E: Union[torch.Tensor, Sequence[int]], expert_offset: int = 0
    ) -> torch.Tensor:
        """Rows of ``x_ND`` are sorted by expert; ``counts_E[j]`` rows go to expert ``expert_offset + j``.

        ``len(counts_E)`` may be smaller than ``num_experts`` (an expert-parallel rank's local slice). A tensor
        ``counts_E`` stays on the device (grouped GEMM offsets are computed there: no host sync, nothing for
        torch.compile to specialise on); a host list is checked against the row count here.
        """
        counts = counts_E if isinstance(counts_E, torch.Tensor) else [int(c) for c in counts_E]
        n_local = counts.numel() if isinstance(counts, torch.Tensor) else len(counts)
        if expert_offset < 0 or expert_offset + n_local > self.num_experts:
            raise ValueError(f"experts [{expert_offset}, {expert_offset + n_local}) outside 0..{self.num_experts}")
        if not isinstance(counts, torch.Tensor) and sum(counts) != x_ND.shape[0]:
            raise ValueError(f"counts sum to {sum(counts)} but x has {x_ND.shape[0]} rows")
        if expert_offset == 0 and n_local == self.num_experts:
            # The whole parameter, not a full-range slice: a slice's backward zero-fills and copies every
            # [E, ff, d] weight gradient once more (~15% of a CPU MoE layer).
            return self.compute(x_ND, counts, self.w1, self.w3, self.w2)
        sl = slice(expert_offset, expert_offset + n_local)
        return self.compute(x_ND, counts, self.w1[sl], self.w3[sl], self.w2[sl])

    def compute(
        self,
        x_ND: torch.Tensor,
        counts: Union[torch.Tensor, Sequence[int]],
        w1_EFD: torch.Tensor,
        w3_EFD: torch.Tensor,
        w2_EDF: torch.Tensor,
    ) -> torch.Tensor:
        """SwiGLU of ``len(counts)`` experts given their (plain tensor) weight slices; rows sorted by expert.

        Runs in :func:`expert_dtype` (bf16 under bf16 autocast: rows and weights are cast here, since
        ``F.grouped_mm`` has no autocast rule); returns rows in that dtype. The expert-parallel runner calls
        this with the local shard of the weights.
        """
        dt = expert_dtype(x_ND)
        x_ND = x_ND.to(dt)
        w1_EFD, w3_EFD, w2_EDF = (w.to(dt) for w in (w1_EFD, w3_EFD, w2_EDF))
        use_gmm = self.impl == "grouped_mm" or (
            self.impl == "auto" and x_ND.shape[0] > 0 and _grouped_mm_usable(x_ND, self.intermediate_size)
        )
        if use_gmm:
            counts_E = counts if isinstance(counts, torch.Tensor) else torch.tensor(counts)
            offs = counts_E.to(x_ND.device).cumsum(0).to(torch.int32)
            x_ND = x_ND.contiguous()
            h_NF = F.silu(_grouped_mm(x_ND, w1_EFD.transpose(-2, -1), offs)) * _grouped_mm(
                x_ND, w3_EFD.transpose(-2, -1), offs
            )
            return _grouped_mm(h_NF, w2_EDF.transpose(-2, -1), offs)
        return _experts_loop(x_ND, counts, w1_EFD, w3_EFD, w2_EDF)


class SequenceStats(nn.Module):
    """Per-sequence statistics of :meth:`MoE.sequence_aux_loss` over the tokens this process holds: routing
    hits ``[B, E]``, summed normalised scores ``[B, E]`` and the token count. Identity here; a seam that
    sequence parallelism substitutes with a module summing them over the ranks holding the sequence's shards."""

    def forward(self, hits_BE: torch.Tensor, share_BE: torch.Tensor, tokens: int):
        return hits_BE, share_BE, tokens


class _CombineRows(torch.autograd.Function):
    """``y[t] = sum_k w[t, k] * y_sorted[inverse[t*K + k]]`` as one ``[1, K] x [K, D]`` bmm per token.

    Why a Function: autograd's backward of the permutation (``index_select``) zero-fills an ``[N, D]`` gradient
    and scatters into it, after a ``[T, K, D]`` outer-product bmm. Here the rows' gradient is one gather of the
    (small, ``[T, D]``) output gradient and one multiply by the weights, in sorted order; the weights' gradient
    is the same bmm autograd would run. Both are bitwise the values autograd gives (each element is one product,
    or the same bmm). The output is allocated in its final shape: a tensor of its own, not a view (FSDP2 hook).
    """

    @staticmethod
    def forward(ctx, y_sorted_ND, weight_TK, inverse_N, order_N, lead):
        T, K = weight_TK.shape
        y_TKD = y_sorted_ND.index_select(0, inverse_N).view(T, K, -1)
        out = y_sorted_ND.new_empty(*lead, y_TKD.shape[-1])
        torch.bmm(weight_TK.view(T, 1, K), y_TKD, out=out.view(T, 1, -1))
        ctx.save_for_backward(y_TKD, weight_TK, order_N)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y_TKD, weight_TK, order_N = ctx.saved_tensors
        T, K = weight_TK.shape
        grad_TD = grad_out.reshape(T, -1)
        grad_y = grad_w = None
        if ctx.needs_input_grad[0]:  # sorted row r came from slot order_N[r] = t*K + k
            grad_y = grad_TD.index_select(0, order_N // K).mul_(weight_TK.reshape(-1, 1).index_select(0, order_N))
        if ctx.needs_input_grad[1]:
            grad_w = torch.bmm(grad_TD.view(T, 1, -1), y_TKD.transpose(1, 2)).view(T, K)
        return grad_y, grad_w, None, None, None


@dataclass
class DispatchPlan:
    """What ``combine`` needs to undo ``dispatch``: sorted row r came from flat slot ``order_N[r]`` = t*K + k."""

    order_N: torch.Tensor
    num_tokens: int
    top_k: int


class MoE(_KeepFP32Buffers):
    """Routed experts (dropless) + always-on shared expert. ``forward`` returns ``(y_BTD, aux_loss or None)``."""

    _fp32_buffers = ("tokens_per_expert", "last_tokens_per_expert")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.num_experts = m.num_experts
        self.top_k = m.top_k
        self.bias_update_speed = m.bias_update_speed
        self.bias_update_rule = m.bias_update_rule
        self.seq_aux_loss_coef = m.seq_aux_loss_coef
        self.gate = Router(cfg)
        self.experts = GroupedExperts(m.num_experts, cfg.hidden_size, m.intermediate_size, cfg.init_std)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, m.intermediate_size * m.num_shared_experts) if m.num_shared_experts > 0 else None
        )
        self.sequence_stats = SequenceStats()
        # Accumulated over training forwards since the last update_bias (all-reduced by the parallel engine).
        self.register_buffer("tokens_per_expert", torch.zeros(m.num_experts, dtype=torch.float32), persistent=False)
        # Counts of the most recent forward (train or eval), for metrics.
        self.register_buffer(
            "last_tokens_per_expert", torch.zeros(m.num_experts, dtype=torch.float32), persistent=False
        )

    def init_weights(self, init_std: float) -> None:
        """Router and routed experts; the shared expert's nn.Linear weights are initialised by the model."""
        self.gate.init_weights(init_std)
        self.experts.init_weights(init_std)

    # ------------------------------------------------------------------ steps
    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate(x_TD)

    def dispatch(
        self, x_TD: torch.Tensor, topk_idx_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """Copy each token once per selected expert, rows grouped by expert (stable: token order kept)."""
        T, K = topk_idx_TK.shape
        flat_idx_N = topk_idx_TK.reshape(-1)
        order_N = torch.argsort(flat_idx_N, stable=True)
        # Static-shape count (bincount's output length depends on the data: a graph break under compile).
        counts_E = flat_idx_N.new_zeros(self.num_experts).scatter_add_(0, flat_idx_N, torch.ones_like(flat_idx_N))
        x_sorted_ND = x_TD.index_select(0, order_N // K)
        return x_sorted_ND, counts_E, DispatchPlan(order_N, T, K)

    def run_experts(self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """The routed experts on rows sorted by expert, through the ``experts`` child module: the seam expert
        parallelism substitutes (``attnres_train.parallel.expert``: a module that exchanges the rows with the
        ranks owning the experts and returns the same ``[N, D]`` rows). ``counts_E`` is this process's own
        routing, recorded in ``tokens_per_expert`` before."""
        return self.experts(x_sorted_ND, counts_E)

    def combine(
        self,
        y_sorted_ND: torch.Tensor,
        topk_weight_TK: torch.Tensor,
        plan: DispatchPlan,
        out_dtype: torch.dtype,
        token_shape: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """Undo the permutation, weight each expert output (at least fp32), sum over k, cast to ``out_dtype``.

        Returns ``[*token_shape, D]`` (default ``[T, D]``), a tensor of its own, not a view: FSDP2 warns
        about a unit output that is a view (docs/parallel.md, "Data parallelism"). Same numbers either shape."""
        inverse_N = torch.empty_like(plan.order_N)
        inverse_N[plan.order_N] = torch.arange(plan.order_N.numel(), device=plan.order_N.device)
        lead = tuple(token_shape) if token_shape is not None else (plan.num_tokens,)
        acc = torch.promote_types(y_sorted_ND.dtype, torch.float32)
        if torch.is_autocast_enabled(y_sorted_ND.device.type):  # bmm would run in bf16 there (and in a compiled bwd)
            y_TKD = y_sorted_ND.index_select(0, inverse_N).view(*lead, plan.top_k, -1)
            return (y_TKD.to(acc) * topk_weight_TK.to(acc).view(*lead, plan.top_k, 1)).sum(dim=-2).to(out_dtype)
        y_TD = _CombineRows.apply(y_sorted_ND.to(acc), topk_weight_TK.to(acc), inverse_N, plan.order_N, lead)
        return y_TD if y_TD.dtype == out_dtype else y_TD.to(out_dtype)  # either way a tensor of its own

    # ---------------------------------------------------------------- forward
    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        topk_idx_TK, topk_weight_TK, scores_TE = self.route(x_TD)  # fp32 router whatever the compute dtype
        # Rows are permuted (and sent to other ranks under expert parallelism) in the experts' compute dtype:
        # bf16 under bf16 autocast, half the bytes of the fp32 residual-stream input.
        x_sorted_ND, counts_E, plan = self.dispatch(x_TD.to(expert_dtype(x_TD)), topk_idx_TK)
        self._record_load(counts_E)
        y_sorted_ND = self.run_experts(x_sorted_ND, counts_E)
        y_BTD = self.combine(y_sorted_ND, topk_weight_TK, plan, x_TD.dtype, (B, T))  # not a view (FSDP2 hook)
        if self.shared_experts is not None:
            y_BTD = y_BTD + self.shared_experts(x_TD).view(B, T, D)
        aux = None
        if self.seq_aux_loss_coef > 0:
            aux = self.sequence_aux_loss(topk_idx_TK, scores_TE, B)
        return y_BTD, aux

    def sequence_aux_loss(self, topk_idx_TK: torch.Tensor, scores_TE: torch.Tensor, batch_size: int) -> torch.Tensor:
        """DeepSeek-V3 sequence-wise balance loss, averaged over sequences (gradient flows through P only).

        Per sequence of S tokens: ``f_i = E/(K S) * #{t: i in TopK_t}``, ``P_i = mean_t s_it / sum_j s_jt``,
        ``loss = coef * sum_i f_i P_i``. The per-sequence sums go through the ``sequence_stats`` child (the
        seam sequence parallelism substitutes to sum them over a sequence's shards).
        """
        E, K = self.num_experts, self.top_k
        s_BSE = scores_TE.view(batch_size, -1, E)
        share_BE = (s_BSE / s_BSE.sum(dim=-1, keepdim=True)).sum(dim=1)
        idx_BN = topk_idx_TK.view(batch_size, -1)
        hits_BE = torch.zeros(batch_size, E, device=idx_BN.device, dtype=share_BE.dtype)
        hits_BE.scatter_add_(1, idx_BN, torch.ones_like(idx_BN, dtype=share_BE.dtype))
        hits_BE, share_BE, S = self.sequence_stats(hits_BE, share_BE, s_BSE.shape[1])
        P_BE = share_BE / S
        f_BE = hits_BE * (E / (K * S))
        return self.seq_aux_loss_coef * (f_BE * P_BE).sum(dim=-1).mean()

    # -------------------------------------------------------- load balancing
    @torch.compiler.disable  # eager: whether autograd is recomputing cannot be decided when a graph is traced
    @torch.no_grad()
    def _record_load(self, counts_E: torch.Tensor) -> None:
        if _in_backward():  # activation-checkpoint recompute: this forward was already counted
            return
        self.last_tokens_per_expert.copy_(counts_E)
        if self.training:
            self.tokens_per_expert.add_(counts_E.to(self.tokens_per_expert.dtype))

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing step (after the optimizer step): overloaded experts' bias goes down.

        ``sign``: ``b += speed * sign(mean_load - load)``; ``centered`` (Moonlight): the signs minus their
        mean. Then the counter is zeroed.
        """
        load_E = self.tokens_per_expert
        if self.bias_update_speed > 0 and load_E.sum() > 0:
            sign_E = torch.sign(load_E.mean() - load_E)
            if self.bias_update_rule == "centered":
                sign_E = sign_E - sign_E.mean()
            elif self.bias_update_rule != "sign":
                raise ValueError(f"unknown bias_update_rule {self.bias_update_rule!r}")
            bias = self.gate.e_score_correction_bias
            bias.add_((self.bias_update_speed * sign_E).to(bias.dtype))
        load_E.zero_()

    def load_imbalance(self, counts_E: Optional[torch.Tensor] = None) -> float:
        """max/mean of ``counts_E`` (default: the accumulated counter); 0.0 when nothing was counted."""
        c = self.tokens_per_expert if counts_E is None else counts_E
        mean = float(c.float().mean())
        return float(c.float().max()) / mean if mean > 0 else 0.0


def moe_layers(module: nn.Module) -> list:
    """Every :class:`MoE` inside ``module`` (a whole model, a pipeline stage or this rank's stages), in order."""
    return [m for m in module.modules() if isinstance(m, MoE)]

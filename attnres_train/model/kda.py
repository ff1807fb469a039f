"""Kimi Delta Attention (KDA) token mixer, laid out exactly like the released Kimi-Linear checkpoint.

Why: KDA is the linear-attention mixer of most Kimi-Linear layers (kimi_linear.md §3); names and shapes follow
the released checkpoint so HF conversion is rename-free (only ``A_log`` is ``[H]`` here, ``[1,1,H,1]`` there).
The core is fla's ``chunk_kda`` on CUDA when installed (``impl`` auto/fla), else the torch chunked form of
:mod:`.kda_ops`. Never silently: ``impl=fla`` without a usable fla or a ``chunk_size`` fla lacks (32/64 only)
is a ConfigError, ``impl=auto`` on CUDA without fla warns once; the fla call is fenced from torch.compile.
``forward(x, core="recurrent")`` selects the per-token reference for tests.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Optional

import torch
from torch import nn

from ..config.errors import ConfigError
from .kda_ops import kda_chunked, kda_gate, kda_recurrent, l2norm, short_conv
from .norms import RMSNorm

CORES = ("chunk", "recurrent", "fla")


#: Chunk sizes fla's Triton ``chunk_kda`` supports.
FLA_CHUNK_SIZES = (32, 64)
FLA_DEFAULT_CHUNK = 64
#: The torch chunked form's chunk when ``model.kda.chunk_size`` is null (fastest on CPU at the small presets,
#: head_dim 32) ...
TORCH_DEFAULT_CHUNK = 16
#: ... and for head_dim >= 128 (f1-f5): CPU fwd + bwd of the core at f1 sizes, chunk 16 / 32 / 64, T=512:
#: ~93 / 80 / 96-103 ms, T=2048: ~396 / 375 / 447 ms (bench/kda_layer.py --chunks). fla keeps its own 64.
TORCH_WIDE_HEAD_CHUNK = 32


def torch_default_chunk(head_dim: int) -> int:
    """The torch chunked core's chunk for ``model.kda.chunk_size: null`` (the CPU optimum depends on head_dim)."""
    return TORCH_WIDE_HEAD_CHUNK if head_dim >= 128 else TORCH_DEFAULT_CHUNK


_warned_fallback = False


def _fla_chunk_kda():
    """Import fla's Triton ``chunk_kda`` lazily (fla imports triton eagerly; never import it at module load)."""
    try:
        from fla.ops.kda import chunk_kda
    except Exception as exc:  # ImportError, or triton failing to initialise
        raise RuntimeError(
            "model.kda.impl='fla' needs flash-linear-attention (fla-core) with a working triton; "
            f"importing fla.ops.kda.chunk_kda failed: {exc!r}"
        ) from exc
    return chunk_kda


def _fla_import_error() -> Optional[str]:
    """None if fla's ``chunk_kda`` imports, else why not."""
    try:
        _fla_chunk_kda()
    except RuntimeError as exc:
        return str(exc.__cause__ or exc)
    return None


def fla_chunk_kwargs(chunk_kda, chunk_size: int) -> dict:
    """The ``chunk_size`` argument for fla's ``chunk_kda``, validated (``model.kda.chunk_size`` must take effect).

    fla supports 32 and 64 only; a version whose ``chunk_kda`` has no ``chunk_size`` parameter always uses 64.
    """
    if chunk_size not in FLA_CHUNK_SIZES:
        raise ConfigError(
            "model.kda.chunk_size",
            f"fla's chunk_kda (the CUDA KDA kernel) supports "
            f"{' or '.join(map(str, FLA_CHUNK_SIZES))}, got {chunk_size}; set one of them (or null: each core's "
            "own), or model.kda.impl=torch for the (much slower) torch chunked form",
        )
    try:
        params = inspect.signature(chunk_kda).parameters
    except (TypeError, ValueError):
        params = {}
    if "chunk_size" in params:
        return {"chunk_size": chunk_size}
    if chunk_size != FLA_DEFAULT_CHUNK:
        raise ConfigError(
            "model.kda.chunk_size",
            f"the installed fla's chunk_kda has no chunk_size argument "
            f"(it always uses {FLA_DEFAULT_CHUNK}), got {chunk_size}; set {FLA_DEFAULT_CHUNK} "
            "or upgrade fla",
        )
    return {}


@torch.compiler.disable  # fla's Triton autograd functions are not for dynamo to trace: a graph break instead
def _run_fla(chunk_size: int, **kw):
    chunk_kda = _fla_chunk_kda()
    return chunk_kda(**kw, **fla_chunk_kwargs(chunk_kda, chunk_size))


def _fla_doc_error() -> None:
    """Document masking through fla is fenced: fla's varlen ``chunk_kda(cu_seqlens=...)`` (batch flattened to 1)
    is the intended CUDA path, but it has not been checked against the torch forms on a GPU here, so it is an
    error rather than a guess."""
    raise ConfigError(
        "model.kda.impl",
        "document masking (data.document_masking=true) is implemented for the "
        "torch KDA cores only; fla's cu_seqlens (varlen) path is not wired yet. Set "
        "model.kda.impl=torch, or turn document masking off",
    )


_CORE_CACHE: dict = {}


@torch.compiler.disable  # imports and inspects fla: run once per (impl, device type, chunk size), never traced
def _resolve_core(impl: str, device_type: str, chunk_size: int) -> str:
    device = torch.device(device_type)
    if impl == "torch":
        return "chunk"
    if impl == "fla":
        if device.type != "cuda":
            raise RuntimeError(
                f"model.kda.impl='fla' needs CUDA tensors (fla's Triton kernels do not run on {device.type}); "
                "use impl='auto' or 'torch' on CPU"
            )
        err = _fla_import_error()
        if err is not None:
            raise ConfigError(
                "model.kda.impl",
                f"'fla' was requested but fla's chunk_kda is unavailable ({err}); "
                "install fla-core with a working triton, or set impl=auto|torch",
            )
        fla_chunk_kwargs(_fla_chunk_kda(), chunk_size or FLA_DEFAULT_CHUNK)  # model.kda.chunk_size must take effect
        return "fla"
    if impl == "auto":
        if device.type != "cuda":
            return "chunk"
        err = _fla_import_error()
        if err is None:
            fla_chunk_kwargs(_fla_chunk_kda(), chunk_size or FLA_DEFAULT_CHUNK)
            return "fla"
        global _warned_fallback
        if not _warned_fallback:  # once per process, whatever the chunk size
            _warned_fallback = True
            warnings.warn(
                f"model.kda.impl=auto on CUDA: fla's chunk_kda is unavailable ({err}); KDA falls back "
                "to the torch chunked form, many times slower. Install fla-core, or set "
                "model.kda.impl=torch to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        return "chunk"
    raise ValueError(f"unknown model.kda.impl {impl!r}; expected auto|torch|fla")


class KimiDeltaAttention(nn.Module):
    """KDA layer: short-conv'd q/k/v, per-channel forget gate, delta-rule core, gated head-wise RMSNorm.

    ``forward(x_btd)`` takes the already RMS-normed sublayer input ``[B,T,d]`` and returns ``[B,T,d]``.
    """

    def __init__(self, cfg):
        super().__init__()
        kc = cfg.kda
        d, H, K = cfg.hidden_size, kc.num_heads, kc.head_dim
        V = K  # Kimi Linear uses K = V per head
        self.hidden_size, self.num_heads, self.head_k_dim, self.head_v_dim = d, H, K, V
        self.conv_size, self.chunk_size, self.impl = kc.conv_size, kc.chunk_size, kc.impl
        self.q_proj = nn.Linear(d, H * K, bias=False)
        self.k_proj = nn.Linear(d, H * K, bias=False)
        self.v_proj = nn.Linear(d, H * V, bias=False)
        self.q_conv1d = nn.Conv1d(H * K, H * K, kc.conv_size, groups=H * K, bias=False)
        self.k_conv1d = nn.Conv1d(H * K, H * K, kc.conv_size, groups=H * K, bias=False)
        self.v_conv1d = nn.Conv1d(H * V, H * V, kc.conv_size, groups=H * V, bias=False)
        self.f_a_proj = nn.Linear(d, K, bias=False)  # low-rank forget-gate input (rank = head dim)
        self.f_b_proj = nn.Linear(K, H * K, bias=False)
        self.A_log = nn.Parameter(torch.empty(H))  # no weight decay: grouped by name in train/optim.py
        self.dt_bias = nn.Parameter(torch.empty(H * K))
        self.b_proj = nn.Linear(d, H, bias=False)
        self.g_a_proj = nn.Linear(d, K, bias=False)  # low-rank output gate (checkpoint has no bias)
        self.g_b_proj = nn.Linear(K, H * V, bias=False)
        self.o_norm = RMSNorm(V, eps=cfg.rms_norm_eps)  # weight [V] shared across heads
        self.o_proj = nn.Linear(H * V, d, bias=False)
        self._init_gate_params()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def _init_gate_params(self, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4) -> None:
        """A_log = log(U(1,16)) per head; dt_bias = inverse-softplus(dt), dt ~ logU(dt_min, dt_max) (Mamba)."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        u = torch.rand_like(self.dt_bias)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    @torch.no_grad()
    def init_weights(self, init_std: float) -> None:
        """Gate parameters, conv weights (PyTorch default kaiming-uniform) and o_norm (ones).

        Linear weights are left to the model (normal(0, init_std)); ``init_std`` is accepted for the common
        ``init_weights`` interface.
        """
        self._init_gate_params()
        for conv in (self.q_conv1d, self.k_conv1d, self.v_conv1d):
            conv.reset_parameters()
        self.o_norm.init_weights(init_std)

    # --------------------------------------------------------------- forward
    def resolve_core(self, device: torch.device) -> str:
        """Which core ``forward`` uses by default for inputs on ``device`` (from ``cfg.kda.impl``), decided once per
        process for each (impl, device type, chunk size)."""
        key = (self.impl, device.type, self.chunk_size)
        core = _CORE_CACHE.get(key)
        if core is None:
            core = _CORE_CACHE[key] = _resolve_core(*key)
        return core

    def forward(
        self, x_btd: torch.Tensor, core: Optional[str] = None, doc_ids: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``core``: None (from cfg.kda.impl), "chunk" (torch chunked), "recurrent" (reference) or "fla".

        ``doc_ids`` (``[B,T]``, :mod:`attnres_train.model.doc_mask`): document masking, the short convolutions
        and the recurrent state restart at every document start (torch cores only, see :func:`_fla_doc_error`).
        """
        # Head counts come from the tensors (``-1``), not from ``self.num_heads``: the parallel engine may hand
        # this module a head slice of every per-head weight (tensor parallelism) and the math is per head.
        B, T, _ = x_btd.shape
        K, V = self.head_k_dim, self.head_v_dim
        core = self.resolve_core(x_btd.device) if core is None else core
        if core not in CORES:
            raise ValueError(f"unknown KDA core {core!r}; expected one of {CORES}")
        if doc_ids is not None and core == "fla":
            _fla_doc_error()

        q_bthk = short_conv(self.q_proj(x_btd), self.q_conv1d.weight, True, doc_ids).view(B, T, -1, K)
        k_bthk = short_conv(self.k_proj(x_btd), self.k_conv1d.weight, True, doc_ids).view(B, T, -1, K)
        v_bthv = short_conv(self.v_proj(x_btd), self.v_conv1d.weight, True, doc_ids).view(B, T, -1, V)
        g_bthk = kda_gate(self.f_b_proj(self.f_a_proj(x_btd)).view(B, T, -1, K), self.A_log, self.dt_bias)
        beta_bth = torch.sigmoid(self.b_proj(x_btd).to(g_bthk.dtype))  # fp32 (fp64 stays fp64)

        if core == "fla":
            if x_btd.device.type != "cuda":
                raise RuntimeError("KDA core 'fla' needs CUDA tensors")
            o_bthv, _ = _run_fla(
                self.chunk_size or FLA_DEFAULT_CHUNK,
                q=q_bthk.contiguous(),
                k=k_bthk.contiguous(),
                v=v_bthv.contiguous(),
                g=g_bthk.contiguous(),
                beta=beta_bth.contiguous(),
                scale=K**-0.5,
                initial_state=None,
                output_final_state=False,
                use_qk_l2norm_in_kernel=True,
            )
        else:
            q_bthk, k_bthk = l2norm(q_bthk), l2norm(k_bthk)
            if core == "recurrent":
                o_bthv, _ = kda_recurrent(q_bthk, k_bthk, v_bthv, g_bthk, beta_bth, scale=K**-0.5, doc_ids=doc_ids)
            else:
                o_bthv, _ = kda_chunked(
                    q_bthk,
                    k_bthk,
                    v_bthv,
                    g_bthk,
                    beta_bth,
                    scale=K**-0.5,
                    chunk_size=self.chunk_size or torch_default_chunk(K),
                    doc_ids=doc_ids,
                )

        gate_bthv = torch.sigmoid(self.g_b_proj(self.g_a_proj(x_btd))).view(B, T, -1, V)
        y_bthv = self.o_norm(o_bthv) * gate_bthv  # norm first, then sigmoid gate (spec §3.2 step 6)
        return self.o_proj(y_bthv.reshape(B, T, -1).to(x_btd.dtype))

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, head_dim={self.head_k_dim}, conv={self.conv_size}, "
            f"chunk={self.chunk_size or 'auto'}, impl={self.impl}"
        )

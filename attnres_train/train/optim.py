"""Optimizers, parameter groups, LR schedules and gradient clipping.

Why here: which parameters get weight decay (and why not the gains, ``A_log``/``dt_bias``, AttnRes queries or
the embedding) and which go to Muon are training choices, made once for every layout. :class:`BatchedMuon` is
a ``torch.optim.Muon`` that also takes the ``[E, out, in]`` stacked experts (one orthogonalisation per slice).
:func:`build_optimizers` returns a list so one DCP state dict holds them all. docs/training.md, "Optimizer"
and "Muon", has the rules and the reasons.
"""

from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence

import torch
from torch import nn

from ..config.train import OptimConfig, wsd_decay_steps

try:  # torch >= 2.9 ships Muon; reuse its Newton-Schulz iteration and lr adjustment where importable.
    from torch.optim._muon import _adjust_lr as _torch_adjust_lr
    from torch.optim._muon import _zeropower_via_newtonschulz as _torch_newton_schulz
except ImportError:  # pragma: no cover - depends on the torch build
    _torch_adjust_lr = None
    _torch_newton_schulz = None

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic; torch.optim.Muon's default
NS_EPS = 1e-7


# -- parameter classification --------------------------------------------------------------------------
def no_decay_reason(name: str, p: torch.Tensor) -> Optional[str]:
    """Why parameter ``name`` is exempt from weight decay, or None if it is decayed (module docstring)."""
    if name.endswith("_res_proj.weight"):
        return "AttnRes pseudo-query (zero-initialised; decay would pull depth mixing back to uniform)"
    if name.endswith("_res_norm.weight"):
        return "AttnRes key-norm gain (RMSNorm gain)"
    if name.endswith("embed_tokens.weight"):
        return "token embedding (decay shrinks rarely-seen rows; OLMo-2)"
    if name.endswith("A_log") or name.endswith("dt_bias"):
        return "KDA forget-gate dynamics (A_log / dt_bias)"
    if p.ndim < 2:
        return "RMSNorm gain or bias (fewer than 2 dims)"
    return None


def is_muon_param(name: str, p: torch.Tensor) -> bool:
    """True for decayed hidden weight matrices: 2-D, or 3-D stacked experts. Not embedding / LM head."""
    if no_decay_reason(name, p) is not None or name.endswith("lm_head.weight"):
        return False
    return p.ndim == 2 or (p.ndim == 3 and "experts" in name.split("."))


def _named_trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # tied weights appear once


def _group(label: str, params: list, weight_decay: float, lr: float) -> dict:
    return {"params": params, "weight_decay": weight_decay, "group": label, "lr": lr, "base_lr": lr}


def param_groups(model: nn.Module, cfg: OptimConfig) -> List[dict]:
    """``[decay, no_decay]`` groups (empty ones dropped) with ``lr``/``base_lr`` = ``cfg.lr``."""
    named = _named_trainable(model)
    decay = [p for n, p in named if no_decay_reason(n, p) is None]
    no_decay = [p for n, p in named if no_decay_reason(n, p) is not None]
    groups = [_group("decay", decay, cfg.weight_decay, cfg.lr), _group("no_decay", no_decay, 0.0, cfg.lr)]
    return [g for g in groups if g["params"]]


def _fused_ok(params: Sequence[torch.Tensor]) -> bool:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover
        devices = {"cuda"}
    return all(p.device.type in devices and p.is_floating_point() for p in params)


def _adamw(groups: List[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for g in groups for p in g["params"]]
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=True if _fused_ok(params) else None,
    )


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> List[torch.optim.Optimizer]:
    """``[AdamW]`` for ``adamw``; ``[BatchedMuon, AdamW]`` for ``muon`` (module docstring for the split)."""
    if cfg.name == "adamw":
        return [_adamw(param_groups(model, cfg), cfg)]
    if cfg.name != "muon":
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    named = _named_trainable(model)
    muon = [p for n, p in named if is_muon_param(n, p)]
    rest = [(n, p) for n, p in named if not is_muon_param(n, p)]
    adam_groups = [
        _group("decay", [p for n, p in rest if no_decay_reason(n, p) is None], cfg.weight_decay, cfg.lr),
        _group("no_decay", [p for n, p in rest if no_decay_reason(n, p) is not None], 0.0, cfg.lr),
    ]
    adam_groups = [g for g in adam_groups if g["params"]]
    optimizers: List[torch.optim.Optimizer] = []
    if muon:
        muon_lr = cfg.muon_lr if cfg.muon_lr is not None else cfg.lr
        optimizers.append(
            BatchedMuon(
                [_group("muon", muon, cfg.weight_decay, muon_lr)],
                lr=muon_lr,
                weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum,
                nesterov=cfg.muon_nesterov,
                ns_steps=cfg.muon_ns_steps,
                adjust_lr_fn=cfg.muon_adjust_lr,
            )
        )
    if adam_groups:
        optimizers.append(_adamw(adam_groups, cfg))
    return optimizers


# -- Muon for 2-D and stacked 3-D matrices -----------------------------------------------------------------
def batched_newton_schulz(g: torch.Tensor, coefficients=NS_COEFFICIENTS, steps: int = 5, eps: float = NS_EPS):
    """torch.optim.Muon's Newton-Schulz orthogonalisation applied to every ``[m, n]`` matrix of ``[..., m, n]``.

    Same bf16 arithmetic and order of operations as ``torch.optim._muon._zeropower_via_newtonschulz``, with the
    Frobenius normalisation taken per matrix and ``addmm`` replaced by ``baddbmm``.
    """
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    a, b, c = coefficients
    shape = g.shape
    x = g.reshape(-1, shape[-2], shape[-1]).bfloat16()
    transpose = shape[-2] > shape[-1]
    if transpose:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    if transpose:
        x = x.mT
    return x.reshape(shape)


def _adjust_lr(lr: float, adjust_lr_fn: Optional[str], matrix_shape) -> float:
    if _torch_adjust_lr is not None:
        return _torch_adjust_lr(lr, adjust_lr_fn, matrix_shape)
    a, b = matrix_shape  # pragma: no cover - mirrors torch 2.13
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, a / b))
    return lr * 0.2 * math.sqrt(max(a, b)) if adjust_lr_fn == "match_rms_adamw" else lr


class BatchedMuon(torch.optim.Muon):
    """``torch.optim.Muon`` that also accepts 3-D ``[E, out, in]`` stacks, orthogonalising each slice.

    The update of a 3-D parameter equals running torch's Muon on each ``[out, in]`` slice as a separate
    parameter (same momentum, Newton-Schulz, weight decay and shape-based lr adjustment).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients=NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = 5,
        adjust_lr_fn: Optional[str] = None,
    ) -> None:
        # torch's Muon.__init__ rejects non-2-D params, so register through Optimizer.__init__ with the same
        # defaults (same keys => same state_dict layout) and repeat its hyper-parameter checks.
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "nesterov": nesterov,
            "ns_coefficients": ns_coefficients,
            "eps": eps,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
        }
        torch.optim.Optimizer.__init__(self, params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"BatchedMuon supports 2-D and 3-D (stacked) parameters, got {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)  # torch's: creates "momentum_buffer" state
            lr = float(group["lr"])
            wd, momentum = group["weight_decay"], group["momentum"]
            for p, grad, buf in zip(params, grads, bufs):
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                ns_args = (group["ns_coefficients"], group["ns_steps"], group["eps"])
                if update.ndim == 2 and _torch_newton_schulz is not None:
                    ortho = _torch_newton_schulz(update, *ns_args)
                else:
                    ortho = batched_newton_schulz(update, *ns_args)
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape[-2:]))
        return loss


# -- learning-rate schedule --------------------------------------------------------------------------------
def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based index ``step``.

    Warmup: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first step is not wasted at lr 0).
    Then ``constant``: 1; ``cosine``: from 1 down to ``min_lr_ratio`` reached at ``step == max_steps``;
    ``wsd``: 1 until the last ``round(decay_fraction * max_steps)`` steps, then linear down to
    ``min_lr_ratio`` reached at ``step == max_steps``. Steps past ``max_steps`` stay at the minimum.
    """
    warmup = cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max_steps - warmup
        if span <= 0:
            return 1.0
        progress = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay = wsd_decay_steps(cfg, max_steps)
        start = max_steps - decay
        if decay <= 0 or step < start:
            return 1.0
        return 1.0 - (1.0 - floor) * min(1.0, (step - start) / decay)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def set_lr(optimizers: Iterable[torch.optim.Optimizer], step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Set every group's lr to its ``base_lr`` (stored on first use) times ``lr_factor``; return the factor."""
    factor = lr_factor(step, cfg, max_steps)
    for opt in optimizers:
        for group in opt.param_groups:
            base = group.setdefault("base_lr", float(group["lr"]))
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(base * factor)
            else:
                group["lr"] = base * factor
    return factor

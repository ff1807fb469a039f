"""Layout-independent initialisation: every value is a function of (seed, parameter name, global row index).

Why: on 1,024 ranks the model is built on ``meta`` and each rank materialises only its shards, which must hold
exactly the numbers one process would draw, without ever holding the whole model. So row ``i`` of parameter
``name`` is drawn on the CPU, in the parameter's dtype, from a generator seeded with ``hash(seed, canonical
name, i)`` (tied weights share one name). The rules live in one place, :func:`init_rule` (no rule: an error);
``attnres_train.parallel.init`` supplies the rows a rank owns. docs/parallel.md "Initialisation".
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import nn

from .kda import KimiDeltaAttention
from .moe import GroupedExperts, MoE, Router
from .norms import RMSNorm

TIED_NAMES = {"lm_head.weight": "model.embed_tokens.weight"}
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # KDA's dt_bias: inverse-softplus of dt ~ logU(DT_MIN, DT_MAX)


@dataclass(frozen=True)
class InitRule:
    """``kind``: normal(0, a) | uniform(a, b) | zeros | ones | a_log (log U(1,16)) | dt_bias (Mamba's)."""

    kind: str
    a: float = 0.0
    b: float = 0.0


def init_rule(module: nn.Module, attr: str, full_name: str, init_std: float) -> InitRule:
    """What the tensor ``module.<attr>`` (called ``full_name`` in the model) starts as."""
    if full_name.endswith("_res_proj.weight"):
        return InitRule("zeros")  # AttnRes pseudo-queries start at zero (paper §5): PreNorm-equivalent start
    if isinstance(module, RMSNorm):
        return InitRule("ones")
    if isinstance(module, (nn.Linear, nn.Embedding, Router, GroupedExperts)) and attr in ("weight", "w1", "w2", "w3"):
        return InitRule("normal", init_std)
    if isinstance(module, nn.Linear) and attr == "bias":
        return InitRule("zeros")
    if isinstance(module, nn.Conv1d) and attr == "weight":  # torch's default kaiming_uniform(a=sqrt(5))
        fan_in = module.weight.shape[1] * module.weight.shape[2]
        bound = 1.0 / math.sqrt(fan_in)
        return InitRule("uniform", -bound, bound)
    if isinstance(module, KimiDeltaAttention) and attr in ("A_log", "dt_bias"):
        return InitRule(attr.lower())
    if isinstance(module, (Router, MoE)) and attr in (
        "e_score_correction_bias",
        "tokens_per_expert",
        "last_tokens_per_expert",
    ):
        return InitRule("zeros")
    raise KeyError(f"no initialisation rule for {full_name} ({type(module).__name__}.{attr})")


def resolve_seed(seed: Optional[int]) -> int:
    """``seed``, or one drawn from torch's global CPU RNG (so ``torch.manual_seed`` decides)."""
    if seed is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))
    return int(seed)


def canonical_name(name: str, tied: bool) -> str:
    """The name a tensor's values are keyed by: a tied head copy (pipeline) draws the embedding's values."""
    return TIED_NAMES.get(name, name) if tied else name


def _row_seed(seed: int, name: str, row: int) -> int:
    digest = hashlib.blake2b(f"{seed}|{name}|{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def draw_rows(
    rule: InitRule, seed: int, name: str, shape: Sequence[int], rows: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """Rows ``rows`` (along dim 0) of the ``shape`` tensor ``name`` would start as: ``[len(rows), *shape[1:]]``
    on the CPU. A 0-d / 1-d tensor is one row (drawn whole, indexed afterwards)."""
    shape = tuple(shape)
    if rule.kind in ("zeros", "ones"):
        fill = 0.0 if rule.kind == "zeros" else 1.0
        return torch.full((len(rows), *shape[1:]), fill, dtype=dtype)
    if len(shape) <= 1:
        return _draw(rule, torch.Generator().manual_seed(_row_seed(seed, name, 0)), shape, dtype)[list(rows)]
    out = torch.empty((len(rows), *shape[1:]), dtype=dtype)
    for j, r in enumerate(rows):
        out[j] = _draw(rule, torch.Generator().manual_seed(_row_seed(seed, name, int(r))), shape[1:], dtype)
    return out


def _draw(rule: InitRule, gen: torch.Generator, shape, dtype) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype)
    if rule.kind == "normal":
        return t.normal_(0.0, rule.a, generator=gen)
    if rule.kind == "uniform":
        return t.uniform_(rule.a, rule.b, generator=gen)
    if rule.kind == "a_log":
        return t.uniform_(1.0, 16.0, generator=gen).log_()
    if rule.kind == "dt_bias":
        u = t.uniform_(0.0, 1.0, generator=gen)
        dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
        return dt + torch.log(-torch.expm1(-dt))
    raise ValueError(f"unknown init rule {rule.kind!r}")


def named_init_targets(model: nn.Module) -> Iterator[Tuple[str, nn.Module, str, torch.Tensor]]:
    """``(full name, owning module, attribute, tensor)`` of every parameter and buffer, shared ones once."""
    seen = set()
    for mname, mod in model.named_modules():
        for attr, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            yield (f"{mname}.{attr}" if mname else attr), mod, attr, t


# (tensor, rule, seed, canonical name) -> fills the tensor (a plain tensor, or a shard the writer understands)
Writer = Callable[[torch.Tensor, InitRule, int, str], None]


def write_full(t: torch.Tensor, rule: InitRule, seed: int, name: str) -> None:
    """The single-process writer: all rows of a plain tensor."""
    if hasattr(t, "device_mesh"):
        raise TypeError(
            f"{name} is sharded (DTensor): initialise a parallelised model with "
            "attnres_train.parallel.init.materialize_and_init"
        )
    t.copy_(draw_rows(rule, seed, name, t.shape, range(t.shape[0]) if t.ndim else [0], t.dtype).reshape(t.shape))


@torch.no_grad()
def init_model_weights(
    model: nn.Module, model_cfg, seed: Optional[int] = None, write: Writer = write_full
) -> Dict[str, InitRule]:
    """Initialise every parameter and buffer of ``model`` (the whole model, or a module that registers parts of
    it under the full model's names, e.g. pipeline stages) of a model with config ``model_cfg`` from ``seed``
    (None: drawn from torch's global RNG, so ``torch.manual_seed`` still decides). Returns the rule per name."""
    seed = resolve_seed(seed)
    rules = {}
    for name, mod, attr, t in named_init_targets(model):
        full = canonical_name(name, model_cfg.tie_word_embeddings)
        rule = init_rule(mod, attr, full, model_cfg.init_std)
        if t.is_meta:
            raise RuntimeError(f"{full} is still on the meta device: materialise it (to_empty) before init")
        write(t, rule, seed, full)
        rules[full] = rule
    return rules

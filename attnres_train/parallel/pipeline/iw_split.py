"""A real input/weight split of one stage's backward: ``I`` runs only the input side, ``W`` only the weight side.

Why: a zero-bubble schedule gains only if ``W`` is cheap to postpone and does not redo ``I``'s work (a second
``autograd.backward(roots, inputs=params)`` after the input pass walks the whole input chain again). The method
is ``torch.distributed.pipelining._backward``'s, whose graph helpers we reuse: :func:`backward_input` keeps the
gradients flowing into the nodes where weight branches join the input side, :func:`backward_weight` runs only
those branches, :class:`PendingW` is what lies between. docs/pipeline.md, "The runtime" (``I``/``W``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge

try:  # private torch helpers (graph walks); without them the split falls back to the re-traversing W
    from torch.distributed.pipelining._backward import (
        _get_grad_fn_or_grad_acc,
        construct_reverse_graph,
        reverse_closure,
    )
except ImportError:  # pragma: no cover - older/newer torch
    construct_reverse_graph = None


@dataclass
class PendingW:
    """What one (stage, microbatch) keeps from ``I`` for its ``W``."""

    groups: List[dict] = field(default_factory=list)  # {"params": [node], "inters": [node], "grads": [tuple]}
    weights: dict = field(default_factory=dict)  # grad accumulator node -> parameter
    fallback: List[torch.nn.Parameter] = field(default_factory=list)  # weights computed from the roots
    roots: List[torch.Tensor] = field(default_factory=list)  # only kept when ``fallback`` is not empty
    grads: List[Optional[torch.Tensor]] = field(default_factory=list)

    def held(self) -> List[torch.Tensor]:
        out = [g for grp in self.groups for tup in grp.get("grads") or () for g in (tup or ()) if g is not None]
        return out + list(self.roots) + [g for g in self.grads if g is not None]


def backward_input(
    roots: Sequence[torch.Tensor],
    grads: Sequence[Optional[torch.Tensor]],
    inputs: Sequence[torch.Tensor],
    params: Sequence[torch.nn.Parameter],
):
    """Input gradients (``None`` where unused) and the :class:`PendingW` for :func:`backward_weight`."""
    roots, grads = list(roots), list(grads)
    if construct_reverse_graph is None:  # pragma: no cover
        got = torch.autograd.grad(roots, inputs, grads, retain_graph=True, allow_unused=True) if inputs else []
        return list(got), PendingW(fallback=list(params), roots=roots, grads=grads)
    root_nodes = [n for n in (_get_grad_fn_or_grad_acc(t) for t in roots) if n is not None]
    input_nodes = [n for n in (_get_grad_fn_or_grad_acc(t) for t in inputs if t.requires_grad) if n is not None]
    weights = {}
    for p in params:
        node = _get_grad_fn_or_grad_acc(p)
        if node is not None:
            weights[node] = p
    reverse = construct_reverse_graph(root_nodes)
    input_closure, _ = reverse_closure(input_nodes, set(), reverse)
    root_set = set(root_nodes)
    by_inter: dict = {}
    fallback = []
    for node, p in weights.items():
        if node not in reverse and node not in root_set:
            continue  # the weight is not in this graph (unused this microbatch): no gradient, as autograd
        closure, inters = reverse_closure([node], input_closure, reverse)
        if (closure & root_set) or not inters:  # a branch reaches a root outside the input side: not splittable
            fallback.append(p)
            continue
        grp = {"params": {node}, "inters": set(inters)}
        for i in inters:  # merge groups that share an intermediate (torch's get_param_groups)
            other = by_inter.get(i)
            if other is not None and other is not grp:
                grp["params"] |= other["params"]
                grp["inters"] |= other["inters"]
                for j in other["inters"]:
                    by_inter[j] = grp
            by_inter[i] = grp
        for i in grp["inters"]:
            by_inter[i] = grp
    groups = []
    for grp in by_inter.values():
        if all(g is not grp for g in groups):
            groups.append(grp)
    handles = []
    for grp in groups:
        grp["inters"] = list(grp["inters"])
        grp["params"] = list(grp["params"])
        grp["grads"] = [None] * len(grp["inters"])
        for k, inter in enumerate(grp["inters"]):

            def hook(grad_outputs, grp=grp, k=k):
                grp["grads"][k] = grad_outputs

            handles.append(inter.register_prehook(hook))
    try:
        want = [t for t in inputs if t.requires_grad]
        got = iter(torch.autograd.grad(roots, want, grads, retain_graph=True, allow_unused=True) if want else [])
        gin = [next(got) if t.requires_grad else None for t in inputs]
    finally:
        for h in handles:
            h.remove()
    pend = PendingW(groups=groups, weights=weights, fallback=fallback)
    if fallback:
        pend.roots, pend.grads = roots, grads
    return gin, pend


def backward_weight(pend: PendingW) -> None:
    """Accumulate the weight gradients into ``.grad`` from what :func:`backward_input` kept."""
    groups, pend.groups = pend.groups, []
    for i, grp in enumerate(groups):
        edges, outs = [], []
        for inter, tup in zip(grp["inters"], grp["grads"]):
            for j, g in enumerate(tup or ()):
                if g is not None:
                    edges.append(GradientEdge(inter, j))
                    outs.append(g)
        if not edges:
            continue
        handles = []
        if len(grp["inters"]) > 1:  # an intermediate downstream of another gets its kept gradient, once
            for inter, tup in zip(grp["inters"], grp["grads"]):
                handles.append(inter.register_prehook(lambda _g, saved=tup: saved))
        try:
            last = i == len(groups) - 1 and not pend.fallback
            dws = torch.autograd.grad(
                edges, [GradientEdge(n, 0) for n in grp["params"]], outs, retain_graph=not last, allow_unused=True
            )
        finally:
            for h in handles:
                h.remove()
        for node, dw in zip(grp["params"], dws):
            if dw is None:
                continue
            p = pend.weights[node]
            p.grad = dw if p.grad is None else p.grad + dw
    if pend.fallback and pend.roots:
        torch.autograd.backward(pend.roots, pend.grads, inputs=pend.fallback)
    pend.roots, pend.grads, pend.fallback = [], [], []

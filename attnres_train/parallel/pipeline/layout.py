"""Static pipeline layout: layer→stage map, stage placement, and which AttnRes blocks every hop carries.

Why static: everything here is a pure function of ``(P, V, layers per stage, block partition, residual mode,
placement, cache on/off)``, so every rank computes the same tables and no shape is ever negotiated on the wire.
:func:`placement_rank` is the one definition of which rank runs a stage. The notation (``commits``, ``c(s)``,
``π(s)``, ``have``, ``delta``), blocks counted in sublayers, the embedding/head placement and the balanced split:
docs/pipeline.md, "Layout"; derivation in the design note ``pipeline_cache.md`` §6.1.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from ...config.errors import ConfigError
from ...config.model import ModelConfig, block_starts

PLACEMENTS = ("loop", "v")


def placement_rank(stage: int, num_ranks: int, placement: str) -> int:
    """The rank that runs ``stage``: loop = ``s mod P``; v = ``s mod P`` on even chunks, ``P-1 - s mod P`` on odd."""
    v, i = divmod(stage, num_ranks)
    if placement == "loop":
        return i
    if placement == "v":
        return i if v % 2 == 0 else num_ranks - 1 - i
    raise ConfigError("pipeline.schedule", f"unknown stage placement {placement!r}; one of {'|'.join(PLACEMENTS)}")


def tie_order(num_stages: int) -> List[int]:
    """Stage preference for the extra layers of an uneven split: inner stages first, then 0, last C-1."""
    if num_stages <= 2:
        return list(range(num_stages))
    return list(range(1, num_stages - 1)) + [0, num_stages - 1]


def balanced_split(num_layers: int, num_stages: int, embed_cost: float = 0.0, head_cost: float = 0.0) -> List[int]:
    """Decoder layers per stage minimising the most expensive stage (contiguous, in stage order).

    Stage cost = its decoder layers + ``embed_cost`` on stage 0 + ``head_cost`` on stage C-1 (both in units of
    one decoder layer). Water-filling: each layer goes to the currently cheapest stage; ties go to the inner
    stages first (1..C-2, in order), then stage 0, then stage C-1. With zero costs and ``L = q·C + r`` this
    gives ``q+1`` layers to the first ``r`` stages of that preference order and ``q`` to the others, so an
    even split stays even.
    """
    if num_stages <= 0:
        raise ConfigError("pipeline.virtual_stages", f"need at least one stage, got {num_stages}")
    if embed_cost < 0 or head_cost < 0:
        raise ConfigError("pipeline.embed_cost", "embed_cost and head_cost must be >= 0")
    cost = [0.0] * num_stages
    cost[0] += embed_cost
    cost[-1] += head_cost
    counts = [0] * num_stages
    rank_of = {s: i for i, s in enumerate(tie_order(num_stages))}
    for _ in range(num_layers):
        s = min(range(num_stages), key=lambda k: (cost[k], rank_of[k]))
        counts[s] += 1
        cost[s] += 1.0
    return counts


@dataclass(frozen=True)
class PipelineLayout:
    """The static tables of one pipeline configuration (see the module docstring for the notation).

    Build it with :meth:`from_model_config`; all fields are plain values so a layout prints, hashes and
    compares. ``starts`` are the block-opening sublayer indices (``block_starts(cfg)``).
    """

    num_ranks: int
    virtual_stages: int
    layers_per_stage: Tuple[int, ...]
    mode: str
    starts: Tuple[int, ...]
    hidden_size: int
    block_cache: bool = True
    placement: str = "loop"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pipeline_config(
        cls, cfg: ModelConfig, pcfg, num_ranks: int, virtual_stages: int, placement: str
    ) -> "PipelineLayout":
        """The trainer's layout: ``pcfg``'s (``pipeline.*``) split, cache and costs; ``placement`` from the
        schedule (``schedules.schedule_placement(pcfg.schedule)``)."""
        return cls.from_model_config(
            cfg,
            num_ranks,
            virtual_stages,
            layers_per_stage=pcfg.layers_per_stage,
            block_cache=pcfg.block_cache,
            embed_cost=pcfg.embed_cost,
            head_cost=pcfg.head_cost,
            placement=placement,
        )

    @classmethod
    def from_model_config(
        cls,
        cfg: ModelConfig,
        num_ranks: int,
        virtual_stages: int = 1,
        layers_per_stage: Optional[Sequence[int]] = None,
        block_cache: bool = True,
        embed_cost: float = 0.0,
        head_cost: float = 0.0,
        placement: str = "loop",
    ) -> "PipelineLayout":
        """Layout for ``cfg`` on ``num_ranks`` ranks × ``virtual_stages`` chunks, stages placed by ``placement``
        (``"loop"`` or ``"v"``; the schedule decides, see ``schedules.schedule_placement``).

        ``layers_per_stage`` (length P·V, summing to ``cfg.num_layers``; zeros allowed) overrides the automatic
        :func:`balanced_split`.
        """
        if not isinstance(num_ranks, int) or num_ranks < 1:
            raise ConfigError("pipeline.size", f"must be a positive integer, got {num_ranks!r}")
        if not isinstance(virtual_stages, int) or virtual_stages < 1:
            raise ConfigError("pipeline.virtual_stages", f"must be a positive integer, got {virtual_stages!r}")
        C = num_ranks * virtual_stages
        L = cfg.num_layers
        if layers_per_stage is None:
            if C > L:
                raise ConfigError(
                    "pipeline.virtual_stages",
                    f"{num_ranks} ranks x {virtual_stages} chunks = {C} stages but the model has only "
                    f"{L} decoder layers (give pipeline.layers_per_stage explicitly for empty stages)",
                )
            split = balanced_split(L, C, embed_cost, head_cost)
        else:
            split = list(layers_per_stage)
            if len(split) != C:
                raise ConfigError(
                    "pipeline.layers_per_stage",
                    f"has {len(split)} entries but there are {num_ranks} x {virtual_stages} = {C} stages",
                )
            if any((not isinstance(n, int)) or isinstance(n, bool) or n < 0 for n in split):
                raise ConfigError("pipeline.layers_per_stage", f"entries must be integers >= 0, got {split}")
            if sum(split) != L:
                raise ConfigError(
                    "pipeline.layers_per_stage", f"sums to {sum(split)} but the model has {L} decoder layers"
                )
        layout = cls(
            num_ranks=num_ranks,
            virtual_stages=virtual_stages,
            layers_per_stage=tuple(split),
            mode=cfg.residual.mode,
            starts=tuple(block_starts(cfg)),
            hidden_size=cfg.hidden_size,
            block_cache=block_cache,
            placement=placement,
        )
        layout.validate()
        return layout

    def validate(self) -> None:
        """Reject layouts whose hops would carry nothing (a real pipeline needs a message per hop)."""
        if self.placement not in PLACEMENTS:
            raise ConfigError(
                "pipeline.schedule", f"unknown stage placement {self.placement!r}; one of {'|'.join(PLACEMENTS)}"
            )
        for s in range(self.num_stages - 1):
            if self.rank_of(s) != self.rank_of(s + 1) and self.payload_len(s) == 0:
                raise ConfigError(
                    "pipeline.layers_per_stage",
                    f"hop {s}->{s + 1} would carry no tensor (empty stages around it); "
                    f"move a layer into stage {s} or {s + 1}",
                )

    def with_cache(self, block_cache: bool) -> "PipelineLayout":
        return PipelineLayout(
            self.num_ranks,
            self.virtual_stages,
            self.layers_per_stage,
            self.mode,
            self.starts,
            self.hidden_size,
            block_cache,
            self.placement,
        )

    # ------------------------------------------------------------------ geometry
    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.virtual_stages

    @property
    def num_layers(self) -> int:
        return sum(self.layers_per_stage)

    @property
    def has_blocks(self) -> bool:
        return self.mode != "prenorm"

    @property
    def num_blocks(self) -> int:
        """Block tensors in the network, embedding included (0 in prenorm mode)."""
        return len(self.starts) + 1 if self.has_blocks else 0

    def rank_of(self, stage: int) -> int:
        return placement_rank(stage, self.num_ranks, self.placement)

    def chunk_of(self, stage: int) -> int:
        """Local chunk index of ``stage`` on its rank (its position in :meth:`stages_of`)."""
        return stage // self.num_ranks

    def stages_of(self, rank: int) -> List[int]:
        """The stages ``rank`` runs, in increasing order (chunk 0 first)."""
        return [s for s in range(self.num_stages) if self.rank_of(s) == rank]

    def prev_on_rank(self, stage: int) -> Optional[int]:
        """The latest stage before ``stage`` on the same rank (None for a rank's first chunk)."""
        earlier = [t for t in self.stages_of(self.rank_of(stage)) if t < stage]
        return earlier[-1] if earlier else None

    def layer_range(self, stage: int) -> Tuple[int, int]:
        start = sum(self.layers_per_stage[:stage])
        return start, start + self.layers_per_stage[stage]

    # ------------------------------------------------------------------ block tables
    def _boundary_count(self, sub: int) -> int:
        """Blocks completed once ``sub`` sublayers have run (embedding included)."""
        if not self.has_blocks:
            return 0
        ends = list(self.starts[1:]) + [2 * self.num_layers]  # block b (1-based) ends before ends[b-1]
        return 1 + sum(1 for e in ends if e <= sub)

    def _boundary_open(self, sub: int) -> bool:
        if not self.has_blocks:
            return True
        return 0 < sub < 2 * self.num_layers and sub not in self.starts

    def count(self, stage: int) -> int:
        """``c(s) = |D(s)|``: blocks that exist after stage ``s`` (a prefix ``0..c(s)-1``)."""
        if stage < 0:
            return 0
        return self._boundary_count(2 * self.layer_range(stage)[1])

    def partial(self, stage: int) -> int:
        """``π(s)``: 1 if the hop ``s → s+1`` also carries the open block's partial sum (hidden state)."""
        return int(self._boundary_open(2 * self.layer_range(stage)[1]))

    def commits(self, stage: int) -> Tuple[int, ...]:
        return tuple(range(self.count(stage - 1), self.count(stage)))

    def have(self, stage: int) -> Tuple[int, ...]:
        """Blocks stage ``s`` reads from its rank's cache (``D[prev(s)]``; empty without the cache)."""
        prev = self.prev_on_rank(stage) if self.block_cache else None
        if prev is None:
            return ()
        return tuple(range(self.count(prev)))

    def delta(self, stage: int) -> Tuple[int, ...]:
        """Block ids carried by the hop ``stage → stage+1`` (in this order in the packed message)."""
        lo = len(self.have(stage + 1))
        return tuple(range(lo, self.count(stage)))

    def payload_len(self, stage: int) -> int:
        """Leading dimension of the hop's packed message: ``len(delta[s]) + π(s)``."""
        return len(self.delta(stage)) + self.partial(stage)

    def payload_shape(self, stage: int, batch: int, seq: int) -> Tuple[int, int, int, int]:
        return (self.payload_len(stage), batch, seq, self.hidden_size)

    def inputs(self, stage: int) -> Tuple[int, ...]:
        """All blocks stage ``s`` reads (``D[s-1]``): received ones plus cached ones."""
        return tuple(range(self.count(stage - 1)))

    def entry(self, rank: int, block: int) -> Optional[int]:
        """First stage on ``rank`` that holds ``block`` (its producer, or the stage that received it)."""
        for s in self.stages_of(rank):
            if block in self.commits(s) or (s > 0 and block in self.delta(s - 1)):
                return s
        return None

    def readers(self, rank: int, block: int) -> Tuple[int, ...]:
        """Stages on ``rank`` that read ``block`` from the cache (they deposit its gradient)."""
        return tuple(s for s in self.stages_of(rank) if block in self.have(s))

    # ------------------------------------------------------------------ volumes
    def hop_tensors(self) -> List[int]:
        """Block tensors (partials included) per microbatch on every hop, forward direction."""
        return [self.payload_len(s) for s in range(self.num_stages - 1)]

    def tensors_per_microbatch(self, cross_rank_only: bool = True) -> int:
        """Σ over hops of the packed length (one direction). The backward volume is identical."""
        return sum(
            self.payload_len(s)
            for s in range(self.num_stages - 1)
            if not cross_rank_only or self.rank_of(s) != self.rank_of(s + 1)
        )

    def bytes_per_step(self, microbatches: int, batch: int, seq: int, bytes_per_elem: int) -> int:
        """Point-to-point bytes of one step, forward + backward, all links."""
        u = batch * seq * self.hidden_size
        return 2 * microbatches * self.tensors_per_microbatch() * u * bytes_per_elem

    # ------------------------------------------------------------------ identity and printing
    def fingerprint(self) -> str:
        """Stable hash of everything that decides message shapes; ranks compare it at start-up."""
        key = repr(
            (
                self.num_ranks,
                self.virtual_stages,
                self.layers_per_stage,
                self.mode,
                self.starts,
                self.hidden_size,
                self.block_cache,
            )
            + ((self.placement,) if self.placement != "loop" else ())
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def table(self) -> List[dict]:
        """One row per stage: rank, chunk, layers, commits, cached reads and the outgoing hop."""
        rows = []
        for s in range(self.num_stages):
            start, end = self.layer_range(s)
            last = s == self.num_stages - 1
            rows.append(
                {
                    "stage": s,
                    "rank": self.rank_of(s),
                    "chunk": self.chunk_of(s),
                    "layers": (start, end),
                    "embed": s == 0,
                    "head": last,
                    "commits": self.commits(s),
                    "cached": self.have(s),
                    "send": None if last else self.delta(s),
                    "partial": None if last else bool(self.partial(s)),
                    "payload": None if last else self.payload_len(s),
                }
            )
        return rows

    def describe(self) -> str:
        lines = [
            f"PipelineLayout P={self.num_ranks} V={self.virtual_stages} C={self.num_stages} "
            f"layers={self.num_layers} mode={self.mode} block_cache={self.block_cache} "
            f"placement={self.placement} "
            f"fingerprint={self.fingerprint()}",
            "stage rank chunk layers   commits      cached(read)  hop->next: blocks + partial = payload",
        ]
        for r in self.table():
            lo, hi = r["layers"]
            extra = ("E" if r["embed"] else "") + ("H" if r["head"] else "")
            hop = (
                "(last stage: aggregation, norm, head, loss)"
                if r["head"]
                else f"{_ids(r['send'])}{' + partial' if r['partial'] else ''} = {r['payload']}"
            )
            lines.append(
                f"{r['stage']:>5} {r['rank']:>4} {r['chunk']:>5} [{lo:>2},{hi:>2}){extra:<2} "
                f"{_ids(r['commits']):<12} {_ids(r['cached']):<13} {hop}"
            )
        return "\n".join(lines)


def _ids(ids) -> str:
    ids = tuple(ids or ())
    if not ids:
        return "-"
    if len(ids) > 2 and ids == tuple(range(ids[0], ids[-1] + 1)):
        return f"{ids[0]}..{ids[-1]}"
    return ",".join(map(str, ids))


# ---------------------------------------------------------------------------- closed forms
def paper_volume(P: int, V: int, blocks_per_stage: float) -> Tuple[float, float]:
    """The paper's per-token volumes in units of ``d`` (§4.1): naive ``C(C−1)/2·N_p``, cached
    ``P(P−1)/2·N_p + (V−1)·P²·N_p`` (N_p = new blocks per stage; no embedding, no partial sums)."""
    C = P * V
    naive = C * (C - 1) / 2 * blocks_per_stage
    cached = P * (P - 1) / 2 * blocks_per_stage + (V - 1) * P * P * blocks_per_stage
    return naive, cached


def aligned_closed_form(P: int, V: int, N: int) -> Tuple[float, float]:
    """Exact tensors per microbatch per direction for aligned blocks (N layer-blocks, m = N/(PV) per stage),
    embedding included (design note §6.6): naive ``(PV−1)(1+N/2)``, cached ``(P−1)(1+N(1−1/(2V)))``."""
    naive = (P * V - 1) * (1 + N / 2)
    cached = (P - 1) * (1 + N * (1 - 1 / (2 * V)))
    return naive, cached

"""The whole causal LM as a cuttable composition: embed → decoder layers → output aggregation + head.

Why cuttable: the pipeline engine (attnres_train.parallel.pipeline) cuts the network between any two decoder
layers. Everything a stage needs is the explicit :class:`DepthState` returned by :meth:`embed` /
:meth:`forward_layers`, so ``head(forward_layers(embed(x), 0, k) → forward_layers(·, k, L))`` equals
``forward(x)``. The model holds no parallel code; ``parallel/`` applies TP/EP/FSDP/PP from outside.

Two-phase scheduling lives in :meth:`forward_layers`: before the first layer of every block (and of a segment
that starts mid-block) the phase-1 statistics of the block's sublayers in the segment are computed in one batched
call and handed to the layers through ``DepthState.phase1`` (FFN-opened blocks: docs/model.md "Block partition").
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple, Optional, Tuple

import torch
from torch import nn

from ..config.model import ModelConfig, as_model_config, block_starts, validate_model_config
from .depth import DepthState, DepthViews, SegmentLogits, depth_read, depth_weights, phase1, resolve_impl
from .init import init_model_weights
from .layers import DecoderLayer, fold_query, make_depth_query
from .lm_loss import LMLoss
from .moe import moe_layers
from .norms import RMSNorm


class LMOutput(NamedTuple):
    loss: torch.Tensor  # mean next-token cross entropy (fp32)
    aux_loss: Optional[torch.Tensor]  # summed MoE auxiliary losses, None if disabled
    logits: Optional[torch.Tensor]  # None with the fused head (model.lm_loss_chunk_tokens > 0): never built


class AttnResModel(nn.Module):
    """Embedding, decoder layers, output AttnRes aggregation and final norm (HF ``model.*`` names)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.residual.mode != "prenorm":
            self.output_attn_res_norm, self.output_attn_res_proj = make_depth_query(cfg.hidden_size, cfg.rms_norm_eps)


class AttnResForCausalLM(nn.Module):
    #: What ``attnres_train.parallel.parallelize_model`` applied (its ``ParallelPlan``); None on a plain model.
    parallel_plan = None

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model_config(cfg)
        self.config = cfg
        self.mode = cfg.residual.mode
        self.eps = cfg.rms_norm_eps
        self.two_phase = cfg.residual.two_phase
        self.residual_impl = cfg.residual.impl
        self._starts = set(block_starts(cfg))
        self.model = AttnResModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_loss = LMLoss()  # a module seam (mean CE over labels != IGNORE_INDEX), no parameters
        self.depth_views = DepthViews()  # a module seam (how depth mixing sees its sources), no parameters
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: Optional[int] = None) -> None:
        """(Re)initialise every parameter and buffer from ``seed`` (None: drawn from torch's global RNG).

        Layout independent (``model.init``): each value depends only on (seed, parameter name, row), so a
        sharded or pipelined build that materialises only its own shards gets exactly these numbers. AttnRes
        pseudo-queries start at zero (paper §5: uniform depth weights, the PreNorm-equivalent function).
        """
        init_model_weights(self, self.config, seed)

    # -- the cuttable forward -----------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> DepthState:
        """Token embedding as the initial depth state (block 0 in AttnRes modes)."""
        x_btd = self.model.embed_tokens(input_ids)
        if self.mode == "prenorm":
            return DepthState(blocks=[], partial=x_btd)
        return DepthState(blocks=[x_btd], partial=None)

    def forward_layers(
        self, state: DepthState, start: int = 0, end: Optional[int] = None, doc_ids: Optional[torch.Tensor] = None
    ) -> DepthState:
        """Run decoder layers ``[start, end)`` on ``state`` and return the new state.

        ``doc_ids``: ``[B,T]`` document ids for document masking (:mod:`attnres_train.model.doc_mask`), or None.
        """
        end = len(self.model.layers) if end is None else end
        batch_phase1 = self.mode == "block" and self.two_phase
        cache, head_row = None, False
        views = self.depth_views
        fused = resolve_impl(self.residual_impl, views.local(state.sources()[0])) == "torch"
        if self.mode == "full" and self.two_phase and fused:
            queries, head_row = self._segment_queries(start, end)
            # Not while the queries are still sharded outside their layers' forward (an FSDP2 unit per whole
            # layer; the framework keeps them in the root unit, data_parallel.layer_unit): each sublayer reads alone
            if not any(p.is_shard() for p in getattr(queries, "placements", ())):
                cache = SegmentLogits(queries, 0, self.eps, views)
        for i in range(start, end):
            layer = self.model.layers[i]
            opened_mid_layer = i > start and self.model.layers[i - 1].opens_block[1]
            if cache is not None and self.mode == "full":
                state = replace(state, phase1=self._full_phase1(state, layer, cache))
            elif batch_phase1 and (i == start or layer.opens_block[0] or opened_mid_layer):
                if cache is None and fused:
                    queries, head_row = self._segment_queries(start, end)
                    cache = SegmentLogits(queries, 0, self.eps, views)
                state = replace(state, phase1=self._block_phase1(state, layer, end, cache))
            state = layer(state) if doc_ids is None else layer(state, doc_ids=doc_ids)
        head = {}
        if cache is not None and head_row:
            # The output head reads the same sources: its phase 1 from the cached logits (row 2·num_layers of
            # the segment's queries), not a fused phase 1 that recomputes every source's norm and logit.
            head = {2 * end: cache.phase1(state.blocks, [2 * end])[0]}
        return replace(state, phase1=head)

    def _segment_queries(self, start: int, end: int) -> Tuple[torch.Tensor, bool]:
        """``[2·num_layers + 1, d]``: the queries of layers ``[start, end)`` at their sublayer rows and, when the
        segment ends the model, the output head's at row 2·num_layers; zeros elsewhere. The flag says whether
        the head's row is there: not when its query is held unlike the layers' (e.g. one plain, the other
        still a sharded distributed tensor: one FSDP2 unit per layer); the head then reads on its own.

        Always the full model's width, so the logits matmul has the same shape however the model is cut
        (pipeline stages): same summation order, same fp32 rounding as one process.
        """
        own = [q for j in range(start, end) for q in self.model.layers[j].queries()]
        zero = own[0].new_zeros(own[0].shape)
        num_layers = len(self.model.layers)
        last, head_row = zero, False
        if end == num_layers:
            q_out = self.output_query()
            head_row = type(q_out) is type(own[0]) and all(
                getattr(q_out, a, None) == getattr(own[0], a, None) for a in ("placements", "device_mesh")
            )
            last = q_out if head_row else zero
        return torch.stack([zero] * (2 * start) + own + [zero] * (2 * (num_layers - end)) + [last]), head_row

    def _block_phase1(
        self, state: DepthState, first: DecoderLayer, end: int, cache: Optional[SegmentLogits] = None
    ) -> dict:
        """Phase-1 stats for the sublayers of the current block from ``first``'s token mixer up to the next
        block start or the segment end.

        A block that opens at an FFN sublayer (``opens_block[1]``) is not in here: its blocks exist only once
        that layer's mixer ran. That FFN reads on its own (``depth_read`` computes its phase 1 inside the
        layer), and the block's later sublayers get theirs at the next layer (``forward_layers``).
        """
        prepared = first.prepare(state, 0)  # after closing the block the first layer opens
        blocks = prepared.blocks
        subs = [2 * first.layer_idx]
        while subs[-1] + 1 < 2 * end and subs[-1] + 1 not in self._starts:
            subs.append(subs[-1] + 1)
        if cache is not None:  # the cache holds the segment's queries already
            if len(blocks) == 1 and prepared.partial is None:  # the first sublayer reads the embedding as is
                subs = subs[1:]
                return dict(zip(subs, cache.phase1(blocks, subs))) if subs else {}
            return dict(zip(subs, cache.phase1(blocks, subs, first_reads_alone=prepared.partial is None)))
        layers = self.model.layers
        queries = torch.stack([q for j in range(subs[0] // 2, subs[-1] // 2 + 1) for q in layers[j].queries()])
        if subs[-1] % 2 == 0:  # the block ends after a token mixer: drop that layer's FFN query
            queries = queries[:-1]
        return dict(zip(subs, phase1(blocks, queries, self.eps, self.residual_impl, self.depth_views)))

    def _full_phase1(self, state: DepthState, layer: DecoderLayer, cache: SegmentLogits) -> dict:
        """Full AttnRes: phase-1 stats of ``layer``'s two sublayers over the sources completed before each,
        without the open partial, which the layer merges by phase 2 (``DecoderLayer.sublayer``). Both exist
        before the layer runs: its token mixer reads the blocks + the previous output, its FFN also the mixer's
        output (the partial then). Each source's logits are computed once for all later queries (the cache)
        instead of once per reading sublayer (O(L) key passes per step instead of O(L²))."""
        mixer, ffn = 2 * layer.layer_idx, 2 * layer.layer_idx + 1
        if state.partial is None:  # only the embedding so far: the mixer reads it alone (no stats needed)
            return {ffn: cache.phase1(state.blocks, [ffn])[0]}
        return {
            mixer: cache.phase1(state.blocks, [mixer])[0],
            ffn: cache.phase1(state.blocks + [state.partial], [ffn])[0],
        }

    def output_query(self) -> torch.Tensor:
        return fold_query(self.model.output_attn_res_norm, self.model.output_attn_res_proj)

    def final_hidden(self, state: DepthState) -> torch.Tensor:
        """Output aggregation (AttnRes over all blocks) followed by the final norm: ``[B,T,d]``."""
        if self.mode == "prenorm":
            return self.model.norm(state.partial)
        h = depth_read(
            state,
            2 * len(self.model.layers),
            self.output_query(),
            self.eps,
            self.two_phase,
            self.residual_impl,
            self.depth_views,
        )
        return self.model.norm(h)

    def head(self, state: DepthState) -> torch.Tensor:
        return self.lm_head(self.final_hidden(state))

    def forward(
        self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, doc_ids: Optional[torch.Tensor] = None
    ):
        """``input_ids [B,T]`` → logits ``[B,T,V]``; with ``labels`` an :class:`LMOutput` with the losses
        (and ``logits=None`` when the fused head computes the loss: ``model.lm_loss_chunk_tokens > 0``).

        ``doc_ids [B,T]`` turns document masking on (``document_ids(input_ids, eos_id)`` in
        :mod:`attnres_train.model.doc_mask`): every document is computed as if it were alone."""
        state = self.forward_layers(self.embed(input_ids), doc_ids=doc_ids)
        if labels is None:
            return self.head(state)
        chunk = self.config.lm_loss_chunk_tokens
        if chunk:
            loss = self.fused_lm_loss(self.final_hidden(state), self.lm_head.weight, labels, chunk)
            return LMOutput(loss=loss, aux_loss=state.aux_loss, logits=None)
        logits = self.head(state)
        return LMOutput(loss=self.lm_loss(logits, labels), aux_loss=state.aux_loss, logits=logits)

    def fused_lm_loss(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_tokens: int
    ) -> torch.Tensor:
        """``lm_loss(F.linear(hidden, weight), labels)`` chunked over ``chunk_tokens`` tokens, never building the
        ``[tokens, vocab]`` logits: ``self.lm_loss.fused`` (the ``lm_loss`` child is the seam tensor parallelism
        substitutes; :class:`~attnres_train.model.lm_loss.LMLoss`)."""
        return self.lm_loss.fused(hidden, weight, labels, chunk_tokens)

    # -- training conveniences (no parallel code) --------------------------------------------------
    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor):
        """Mean next-token cross entropy (fp32) and the summed MoE aux loss (or None)."""
        out = self.forward(input_ids, labels)
        return out.loss, out.aux_loss

    def moe_layers(self):
        return moe_layers(self)

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Aux-loss-free balancing step for every MoE layer; call after ``optimizer.step()``."""
        for moe in self.moe_layers():
            moe.update_bias()

    @torch.no_grad()
    def depth_attention(self, input_ids: torch.Tensor, doc_ids: Optional[torch.Tensor] = None) -> list:
        """Per-sublayer AttnRes weights over sources (list of ``[n, B, T]``, last entry = output head);
        ``doc_ids``: document masking, as in :meth:`forward`."""
        if self.mode == "prenorm":
            return []
        weights = []
        state = self.embed(input_ids)
        for layer in self.model.layers:
            for k, q in enumerate(layer.queries()):
                weights.append(depth_weights(layer.prepare(state, k), q, self.eps))
                state = layer.sublayer(state, k, q, doc_ids)
        weights.append(depth_weights(state, self.output_query(), self.eps))
        return weights


def build_model(
    model_cfg, device=None, dtype: Optional[torch.dtype] = None, seed: Optional[int] = None
) -> AttnResForCausalLM:
    """Build the plain model from a ``ModelConfig`` (or a dict/DictConfig of one).

    Always constructed on ``meta`` first (no memory, no random draws), then — unless ``device="meta"`` —
    allocated on ``device`` (default CPU) in ``dtype`` and initialised from ``seed`` (None: drawn from torch's
    global RNG, so ``torch.manual_seed`` decides). A ``meta`` model is what ``parallelize_model`` /
    ``parallelize_pipeline`` take at scale: they materialise only this rank's shards with the same values.
    """
    cfg = as_model_config(model_cfg)
    with torch.device("meta"):
        model = AttnResForCausalLM(cfg)
    if dtype is not None:
        model.to(dtype)
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":
        return model
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty gives each owner its own tensor: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    model.init_weights(seed)
    return model

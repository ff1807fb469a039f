"""Document masking: per-position document ids from the tokens, and the masks the token mixers need.

Why: packed samples concatenate documents (every document is followed by exactly one EOS, see
``attnres_train/data/packing.py``). With document masking on, MLA attends only within a document and KDA
restarts its recurrent state (and its short causal convolution) at each document start, so every document is
computed exactly as if it were run alone. The boundaries are derived from the tokens themselves (a document
ends at its EOS), so the data loader needs no change. AttnRes depth mixing is per position and needs no mask.

Conventions: ``doc_ids_BT`` is a ``[B, T]`` int64 tensor, non-decreasing along T, equal for positions of the
same document (ids of different rows are unrelated). ``None`` everywhere means "no masking" (today's path).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def document_ids(input_ids_BT: Tensor, eos_id: int) -> Tensor:
    """``[B, T]`` document ids: 0 at the first position, +1 after every EOS (the EOS closes its document)."""
    starts_BT = torch.zeros_like(input_ids_BT, dtype=torch.long)
    starts_BT[:, 1:] = (input_ids_BT[:, :-1] == eos_id).long()
    return starts_BT.cumsum(1)


def document_starts(doc_ids_BT: Tensor) -> Tensor:
    """``[B, T]`` bool: True where a new document begins after position 0 (the state must be reset there)."""
    starts_BT = torch.zeros_like(doc_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = doc_ids_BT[:, 1:] != doc_ids_BT[:, :-1]
    return starts_BT


def causal_document_mask(doc_ids_BT: Tensor) -> Tensor:
    """``[B, 1, T, T]`` bool attention mask (True = attend): key <= query and same document.

    The diagonal is always allowed, so no row is fully masked (no NaN from an all ``-inf`` softmax row).
    """
    T = doc_ids_BT.shape[1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=doc_ids_BT.device).tril()
    same_BTT = doc_ids_BT[:, :, None] == doc_ids_BT[:, None, :]
    return (same_BTT & causal_TT).unsqueeze(1)

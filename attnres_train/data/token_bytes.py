"""UTF-8 bytes per token id, for bits per byte: a loss that compares runs with different tokenizers.

Why a per-token table: with a byte-level tokenizer each id stands for a fixed byte string and a text is the
concatenation of its tokens' bytes, so the bytes of any run of tokens (even one a sample boundary cuts inside
a character) are the sum of its tokens' counts: exact. Tokenizers whose decoding is not such a concatenation
(SentencePiece's word markers, normalizers, an added prefix space) get no table (None). docs/analysis.md,
"attnres-eval".
"""

from __future__ import annotations

import json
from typing import Dict, Optional

import numpy as np

from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def byte_level_alphabet() -> Dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte -> the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_byte_lengths(tokenizer: Tokenizer) -> Optional[np.ndarray]:
    """``int64 [vocab]``: the UTF-8 bytes each token id decodes to (0 for special tokens such as EOS: they are
    no text), or None when the tokenizer is not byte-level (no exact per-token count)."""
    if isinstance(tokenizer, ByteTokenizer):
        out = np.zeros(tokenizer.vocab_size, dtype=np.int64)
        out[:256] = 1
        return out
    if not isinstance(tokenizer, HFTokenizer) or tokenizer.backend is None:
        return None
    spec = json.loads(tokenizer.backend.to_str())
    decoder = spec.get("decoder") or {}
    if (
        decoder.get("type") != "ByteLevel"
        or spec.get("normalizer") is not None
        or _adds_prefix_space(spec.get("pre_tokenizer"))
    ):
        return None
    alphabet = byte_level_alphabet()
    added = {a["id"]: a for a in spec.get("added_tokens") or []}
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    out = np.zeros(max(tokenizer.vocab_size, max(vocab.values(), default=-1) + 1), dtype=np.int64)
    for text, i in vocab.items():
        if i in added:  # added tokens are literal text (not byte-level coded); special ones are no text
            out[i] = 0 if added[i].get("special") else len(text.encode("utf-8"))
        elif all(c in alphabet for c in text):
            out[i] = len(text)  # one alphabet character per byte
        else:
            return None
    return out


def _adds_prefix_space(node) -> bool:
    """Whether a pre-tokenizer (or one of a sequence) adds a space before the text (decoded != source text)."""
    if isinstance(node, dict):
        return bool(node.get("add_prefix_space")) or any(_adds_prefix_space(v) for v in node.values())
    if isinstance(node, list):
        return any(_adds_prefix_space(v) for v in node)
    return False

"""Tokenizers behind one tiny interface, so the rest of the data layer never touches transformers directly.

Why a wrapper: the packer needs only ``encode`` / ``eos_id`` / ``vocab_size`` and a stable ``fingerprint``
for the shard cache key. The built-in :class:`ByteTokenizer` (UTF-8 bytes 0..255 plus two specials) needs
no files and no network, which keeps the default config and the tests hermetic. Anything else is loaded
with ``transformers.AutoTokenizer`` (imported lazily: it costs seconds at import time).

:func:`train_bpe_tokenizer` trains a byte-level BPE with the ``tokenizers`` library and saves it in Hugging
Face format, so ``data.tokenizer=<out_dir>`` (or ``AutoTokenizer.from_pretrained(out_dir)``) loads it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Iterable, List, Sequence

import numpy as np

from attnres_train.config.errors import UserInputError

from .shards import make_staging_dir

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")


class Tokenizer:
    """What the data layer needs from a tokenizer."""

    name: str
    eos_id: int
    vocab_size: int
    fingerprint: str  # changes whenever the id mapping changes; part of the shard cache key

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        """Encode many documents at once (no special tokens added); used by the packer."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then ``<|endoftext|>`` = 256 and ``<|pad|>`` = 257 (vocab 258)."""

    name = "byte"
    eos_id = 256
    pad_id = 257
    vocab_size = 258
    fingerprint = "byte-v1"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                buf.append(i)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append({256: EOS_TOKEN, 257: PAD_TOKEN}.get(i, f"<|{i}|>"))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer(Tokenizer):
    """A ``transformers`` tokenizer. Encodes through the Rust backend when it is a fast tokenizer."""

    def __init__(self, tok, name: str):
        self.tok = tok
        self.name = name
        self.vocab_size = len(tok)
        eos = tok.eos_token_id
        if eos is None:
            vocab = tok.get_vocab()
            eos = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise UserInputError(
                f"tokenizer {name!r} defines no end-of-sequence token (looked for eos_token and "
                f"{', '.join(_EOS_CANDIDATES)}); documents need one between them. Set eos_token in its tokenizer_config.json."
            )
        self.eos_id = int(eos)
        self.backend = getattr(tok, "backend_tokenizer", None)
        if self.backend is not None:
            blob = self.backend.to_str().encode("utf-8")
        else:  # slow tokenizer: the vocab is the best available identity
            blob = repr(sorted(tok.get_vocab().items())).encode("utf-8")
        self.fingerprint = "hf-" + hashlib.sha256(blob).hexdigest()[:16]

    def encode(self, text: str) -> List[int]:
        return [int(i) for i in self.encode_batch([text])[0]]

    def encode_batch(self, texts: List[str]) -> List[np.ndarray]:
        if self.backend is not None:
            encs = self.backend.encode_batch(texts, add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int64) for e in encs]
        return [np.asarray(self.tok.encode(t, add_special_tokens=False), dtype=np.int64) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def _looks_like_path(spec: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else path-shaped is treated as a (missing) local path."""
    if spec.startswith(("/", "./", "../", "~", ".\\")):
        return True
    if spec.count("/") > 1 or spec.endswith(".json"):
        return True
    return False


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``, a local tokenizer directory / ``tokenizer.json`` file, or a hub name → :class:`Tokenizer`."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"tokenizer must be 'byte', a directory, or a hub name, got {spec!r}")
    spec = spec.strip()
    if spec == "byte":
        return ByteTokenizer()
    local = os.path.expanduser(spec)
    if os.path.exists(local):
        return _load_local(local)
    if _looks_like_path(spec):
        raise UserInputError(f"tokenizer path {spec!r} does not exist (data.tokenizer / --tokenizer)")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec)
    except Exception as e:  # hub errors come in many types (OSError, HTTP, validation)
        raise UserInputError(
            f"tokenizer {spec!r} is not a local path and could not be loaded from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass a local directory or 'byte'"
        ) from None
    return HFTokenizer(tok, spec)


def _load_local(path: str) -> Tokenizer:
    name = os.path.abspath(path)
    try:
        if os.path.isfile(path):
            if not path.endswith(".json"):
                raise UserInputError(f"tokenizer file {path!r} is not a tokenizer.json; pass its directory instead")
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=path)
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
    except UserInputError:
        raise
    except Exception as e:
        raise UserInputError(
            f"could not load a tokenizer from {path!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "expected a directory written by save_pretrained (tokenizer.json + tokenizer_config.json)"
        ) from None
    return HFTokenizer(tok, name)


def train_bpe_tokenizer(
    texts_iter: Iterable[str],
    vocab_size: int,
    out_dir: str,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE on ``texts_iter`` and save it (Hugging Face format) to ``out_dir``.

    Specials: ``<|endoftext|>`` (id 0, the EOS) and ``<|pad|>`` (id 1). ``out_dir`` must not exist or be
    empty; the files are written to a temporary sibling and moved into place only on success.
    """
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    min_vocab = len(alphabet) + 2
    if not isinstance(vocab_size, int) or vocab_size < min_vocab:
        raise UserInputError(
            f"BPE vocab size must be an integer >= {min_vocab} (256 bytes + 2 specials), got {vocab_size!r}"
        )
    _check_empty_target(out_dir, "tokenizer output directory")

    tok = RawTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    errors: List[BaseException] = []

    def guarded():  # keep the source's own UserInputError instead of whatever the Rust side makes of it
        try:
            yield from texts_iter
        except BaseException as e:
            errors.append(e)
            raise

    try:
        tok.train_from_iterator(guarded(), trainer=trainer)
    except BaseException:
        if errors:
            raise errors[0] from None
        raise
    if errors:
        raise errors[0]
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, bos_token=EOS_TOKEN)

    tmp = make_staging_dir(os.path.dirname(os.path.abspath(out_dir)), ".tmp-tokenizer-")
    try:
        fast.save_pretrained(tmp)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return HFTokenizer(fast, os.path.abspath(out_dir))


def _check_empty_target(path: str, what: str) -> None:
    if os.path.isfile(path):
        raise UserInputError(f"{what} {path!r} is an existing file; refusing to overwrite it")
    if os.path.isdir(path) and os.listdir(path):
        raise UserInputError(f"{what} {path!r} is not empty; refusing to overwrite it (choose a new directory)")


def _move_into_place(tmp: str, dest: str) -> None:
    """Rename a finished temp dir onto ``dest`` (which may exist as an empty directory)."""
    _check_empty_target(dest, "output directory")
    if os.path.isdir(dest):
        os.rmdir(dest)
    os.rename(tmp, dest)

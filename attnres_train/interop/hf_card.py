"""What makes an exported directory a normal Hugging Face model: tokenizer, generation config, model card, modes.

Why: weights and config.json alone load, but ``AutoTokenizer`` then fails, ``generate()`` never stops (no
``eos_token_id``), safetensors writes 0600 files and nothing says how the model was trained. What each export
gets is in docs/hf_interop.md "What an export directory holds". A format module of interop/ ("Code layers").
transformers and tokenizers are imported where used: importing transformers takes seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

from ..config.errors import UserInputError
from ..config.model import ModelConfig
from ..data.tokenizer import load_tokenizer
from ..model.flops import count_params

BYTE_EOS, BYTE_PAD = "<|endoftext|>", "<|pad|>"


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character map (what the ``tokenizers`` ByteLevel pre-tokenizer produces)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer_fast():
    """The built-in ByteTokenizer as a transformers fast tokenizer with the same ids (no merges: one id per byte)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(BYTE_EOS, special=True), AddedToken(BYTE_PAD, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=BYTE_EOS, pad_token=BYTE_PAD, bos_token=BYTE_EOS)


def write_tokenizer(spec: str, out: Path, model_vocab: int) -> Dict[str, Any]:
    """Save the tokenizer ``spec`` (``data.tokenizer``) into ``out``; returns its special ids and description."""
    if spec.strip() == "byte":
        hf = byte_tokenizer_fast()
        what = "The byte tokenizer (UTF-8 bytes 0..255, <|endoftext|> 256, <|pad|> 257)"
    else:
        loaded = load_tokenizer(spec)  # UserInputError naming the tokenizer when it cannot be loaded
        hf = loaded.tok
        if hf.eos_token_id is None:  # found among the usual names by the data layer: make it explicit
            hf.eos_token = hf.convert_ids_to_tokens(loaded.eos_id)
        what = f"The run's tokenizer {spec!r}"
    if len(hf) > model_vocab:
        raise UserInputError(
            f"tokenizer {spec!r} has {len(hf)} tokens but the model's vocab_size is {model_vocab}; "
            "this checkpoint was not trained with it"
        )
    hf.save_pretrained(str(out))
    cfg_file = out / "tokenizer_config.json"
    raw = json.loads(cfg_file.read_text())
    if raw.get("tokenizer_class") == "TokenizersBackend":  # transformers >= 5 name; older releases know this one
        raw["tokenizer_class"] = "PreTrainedTokenizerFast"
        raw.pop("backend", None)
        cfg_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    eos = int(hf.eos_token_id)
    bos = eos if hf.bos_token_id is None else int(hf.bos_token_id)
    pad = eos if hf.pad_token_id is None else int(hf.pad_token_id)
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "tokenizer": what, "size": len(hf)}


def write_generation_files(out: Path, ids: Mapping[str, int]) -> None:
    """generation_config.json with eos/bos/pad, and the same ids in config.json."""
    from transformers import GenerationConfig

    special = {k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    GenerationConfig(**special).save_pretrained(str(out))
    cfg_file = out / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw.update(special)
    cfg_file.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def run_summary(step_dir: Path) -> Dict[str, Any]:
    """Step, tokens, layout and time from the checkpoint's meta.json; last losses from the run's metrics.jsonl."""
    step_dir = Path(step_dir)
    out: Dict[str, Any] = {"checkpoint": str(step_dir)}
    try:
        meta = json.loads((step_dir / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    for key in ("step", "tokens_seen", "parallel", "world_size"):
        if key in meta:
            out[key] = meta[key]
    metrics = step_dir.parent.parent / "metrics.jsonl"
    if metrics.is_file() and "step" in out:
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("step", 1 << 62) > out["step"]:
                continue
            if rec.get("kind") == "train" and not rec.get("skipped") and "loss" in rec:
                out["train_loss"] = rec["loss"]
            elif rec.get("kind") == "val" and "val_loss" in rec:
                out["val_loss"] = rec["val_loss"]
    return out


def write_model_card(
    out: Path,
    cfg: ModelConfig,
    fmt: str,
    tokenizer: Optional[Dict[str, Any]],
    summary: Optional[Dict[str, Any]],
    config_text: Optional[str],
) -> None:
    counts = count_params(cfg)
    remote = fmt == "remote"
    trust = ", trust_remote_code=True" if remote else ""
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [attnres-train, kimi-linear" + (", attention-residuals" if remote else "") + "]",
        "---",
        "",
        f"# {cfg.name} (attnres-train)",
        "",
        f"A Kimi-Linear-style MoE language model trained with attnres-train, exported "
        f"{'in the trust_remote_code format (Attention Residuals)' if remote else 'as transformers KimiLinear'}.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "."  # this directory or its Hub id',
        f"tok = AutoTokenizer.from_pretrained(path{trust})"
        if tokenizer
        else "# no tokenizer was exported with this model (see Tokenizer below)",
        f"model = AutoModelForCausalLM.from_pretrained(path{trust})",
        'out = model.generate(**tok("def ", return_tensors="pt"), max_new_tokens=64)' if tokenizer else "",
        "print(tok.decode(out[0]))" if tokenizer else "",
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| residual | {cfg.residual.mode}"
        + (f", {cfg.residual.num_blocks} blocks" if cfg.residual.mode == "block" and cfg.residual.num_blocks else "")
        + " |",
        f"| layers / hidden size | {cfg.num_layers} / {cfg.hidden_size} |",
        f"| experts | {cfg.moe.num_experts} routed (top {cfg.moe.top_k}), {cfg.moe.num_shared_experts} shared |",
        f"| parameters | {counts.total:,} total, {counts.active:,} active per token |",
        f"| vocabulary | {cfg.vocab_size} |",
        "",
        "## Tokenizer",
        "",
    ]
    if tokenizer:
        lines.append(
            f"{tokenizer['tokenizer']} ({tokenizer['size']} tokens); eos_token_id {tokenizer['eos_token_id']}, "
            f"bos_token_id {tokenizer['bos_token_id']}, pad_token_id {tokenizer['pad_token_id']} (also in "
            "generation_config.json, so `generate()` stops at the end of a document)."
        )
    else:
        lines.append(
            "None: the exported checkpoint did not say which tokenizer it was trained with "
            "(export a training checkpoint, whose config names `data.tokenizer`)."
        )
    lines += ["", "## Training", ""]
    if summary:
        names = {
            "step": "optimizer steps",
            "tokens_seen": "tokens seen",
            "train_loss": "last training loss",
            "val_loss": "last validation loss",
            "parallel": "layout",
            "world_size": "processes",
            "checkpoint": "checkpoint",
        }
        lines += ["| | |", "|---|---|"]
        for key, label in names.items():
            if key in summary:
                v = summary[key]
                v = f"{v:,}" if isinstance(v, int) else (f"{v:.4f}" if isinstance(v, float) else f"`{v}`")
                lines.append(f"| {label} | {v} |")
    else:
        lines.append("Not recorded (exported from a weights file, not a training checkpoint).")
    if config_text:
        lines += [
            "",
            "## Config",
            "",
            "The run's resolved config (attnres-train):",
            "",
            "```yaml",
            config_text.rstrip(),
            "```",
        ]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def normalize_modes(out: Path) -> None:
    """Every file ``0666 & ~umask`` (safetensors writes 0600): an export is meant to be shared."""
    mask = os.umask(0)
    os.umask(mask)
    for f in Path(out).iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, 0o666 & ~mask)


def write_hf_extras(
    out: Path,
    cfg: ModelConfig,
    fmt: str,
    tokenizer: Optional[str] = None,
    step_dir: Optional[Path] = None,
    config_text: Optional[str] = None,
) -> None:
    """Tokenizer, generation config, model card and file modes of an export in ``out`` (weights already there)."""
    out = Path(out)
    ids = None
    if tokenizer:
        ids = write_tokenizer(tokenizer, out, cfg.vocab_size)
        write_generation_files(out, ids)
    else:
        print(
            f"warning: {out}: exported without a tokenizer or generation_config (the source does not name one)",
            file=sys.stderr,
        )
    write_model_card(out, cfg, fmt, ids, run_summary(step_dir) if step_dir else None, config_text)
    normalize_modes(out)

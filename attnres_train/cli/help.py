"""`attnres-train --help`: every config group and field, with the comment above the field in the schema as its
description, the composed default and the group's docs page.

Why: the schema's field comments are the one place fields are documented; this prints them instead of keeping a
second copy (Hydra's own help is a bare config dump; ``--hydra-help`` still prints Hydra's). No torch import, so
it answers at once. Details: docs/training.md "Command-line help".
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from functools import lru_cache

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ..config.paths import CONFIG_DIR
from ..config.schema import Config, register_configs

HELP_FLAGS = ("--help", "-h")
ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.")
DOCS = "docs/"
# The docs page of each top-level group; fields outside a group (run_dir, seed) are on docs/training.md.
GROUP_DOCS = {
    "model": "model.md",
    "data": "data.md",
    "optim": "training.md",
    "trainer": "training.md",
    "checkpoint": "training.md",
    "logging": "training.md",
    "parallel": "parallel.md",
    "pipeline": "pipeline.md",
}
USAGE = """\
usage: attnres-train [--help] [-m] [KEY=VALUE ...] [hydra options]

Trains one run (or, with -m, a sweep) from configs/config.yaml plus command-line overrides, e.g.
  attnres-train model=tiny model.residual.mode=block trainer.max_steps=200 run_dir=runs/x
  attnres-train -m model.residual.num_blocks=1,2,4 run_dir=runs/sweep   # runs/sweep/model.residual.num_blocks=1, ...
Config presets: model={models} experiment={experiments}.
Hydra: --cfg job (print the composed config), --hydra-help, --shell-completion install=bash (docs/training.md).
Overrides given with --help change the defaults shown below (e.g. attnres-train model=f3 --help)."""


@lru_cache(maxsize=None)
def field_comments(cls) -> dict:
    """{field name: the comment lines right above its declaration in ``cls``'s source, joined}."""
    lines = inspect.getsource(cls).splitlines()
    out = {}
    for node in ast.parse(textwrap.dedent("\n".join(lines))).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            comment, i = [], node.lineno - 2  # the line above the field (0-based)
            while i >= 0 and lines[i].strip().startswith("#"):
                comment.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            out[node.target.id] = " ".join(comment)
    return out


def one_line(text: str, width: int = 110) -> str:
    """The first sentence of ``text`` (outside parentheses, not after "e.g."), cut to ``width`` characters."""
    text = " ".join(text.split("\n\n", 1)[0].split())
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "." and depth == 0 and text[i + 1 : i + 2] in (" ", ""):
            if not text[: i + 1].endswith(ABBREVIATIONS):
                text = text[: i + 1]
                break
    return text if len(text) <= width else text[: width - 3] + "..."


def _class_doc(cls) -> str:
    doc = cls.__doc__ or ""
    return "" if doc.startswith(cls.__name__ + "(") else doc  # dataclass's generated signature is no description


def _nested(tp):
    """The dataclass a field holds (directly or as list items), else None."""
    if dataclasses.is_dataclass(tp):
        return tp, ""
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg, "[]"
    return None, ""


def schema_rows(cls, prefix: str = ""):
    """(dotted key, description, is_group) for every field of ``cls``, depth first, in declaration order."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        sub, suffix = _nested(hints[f.name])
        doc = comments.get(f.name) or (_class_doc(sub) if sub else "") or ""
        yield key, one_line(doc), sub is not None
        if sub is not None:
            yield from schema_rows(sub, key + suffix + ".")


def _default(composed, key: str) -> str:
    if "[]" in key:  # a field of list items: the defaults are those of the list
        return ""
    value = OmegaConf.select(composed, key, default=None, throw_on_missing=False)
    if OmegaConf.is_dict(value):
        return ""
    if OmegaConf.is_list(value):
        value = OmegaConf.to_container(value, resolve=False)
    text = "null" if value is None else str(value)
    return "=" + (text if len(text) <= 40 else text[:37] + "...")


def _presets(group: str) -> str:
    names = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    return "|".join(names) or "-"


def render(overrides=()) -> str:
    """The whole help text; ``overrides`` (command-line KEY=VALUE) change the defaults shown."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        composed = compose(config_name="config", overrides=list(overrides))
    out = [USAGE.format(models=_presets("model"), experiments=_presets("experiment"))]
    top = []
    for key, doc, is_group in schema_rows(Config):
        depth = key.count(".")
        if depth == 0 and not is_group:
            top.append((key, doc))
            continue
        if depth == 0:
            out.append(f"\n{key}: {doc}  [{DOCS}{GROUP_DOCS[key]}]" if doc else f"\n{key}  [{DOCS}{GROUP_DOCS[key]}]")
            continue
        label = f"{key}{_default(composed, key)}"
        if is_group:
            out.append(f"  {label}  ({doc})" if doc else f"  {label}")
        else:
            out.append(f"  {label:<46} {doc}".rstrip())
    out.append(f"\nother fields  [{DOCS}training.md]")
    for key, doc in top:
        out.append(f"  {key + _default(composed, key):<46} {doc}".rstrip())
    return "\n".join(out) + "\n"


def wants_help(argv) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def print_help(argv) -> None:
    """Print the help for ``argv`` (its overrides shape the defaults shown) and exit 0."""
    overrides = [a for a in argv if a not in HELP_FLAGS and not a.startswith("-")]
    sys.stdout.write(render(overrides))
    sys.exit(0)

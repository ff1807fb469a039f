"""Every field of the config schema has a description: the comment right above its declaration, or for a group
(a nested dataclass) its class docstring. `attnres-train --help` prints these (cli/help.py); this test walks the
schema with its own reading of the source, not help's."""

import dataclasses
import inspect
import typing

from attnres_train.config.schema import Config


def _nested(tp):
    """The dataclass a field holds, directly or inside List[...] / Optional[...]; None for plain values."""
    if dataclasses.is_dataclass(tp):
        return tp
    return next((arg for arg in typing.get_args(tp) if dataclasses.is_dataclass(arg)), None)


def _comment_above(cls, name: str) -> str:
    lines, _ = inspect.getsourcelines(cls)
    hits = [i for i, line in enumerate(lines) if line.strip().startswith(f"{name}:")]
    assert len(hits) == 1, (cls.__name__, name, hits)
    above = lines[hits[0] - 1].strip()
    return above[1:].strip() if above.startswith("#") else ""


def _docstring(cls) -> str:
    doc = cls.__dict__.get("__doc__") or ""
    return "" if doc.startswith(cls.__name__ + "(") else doc.strip()  # dataclass's generated signature


def _walk(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, sub = prefix + f.name, _nested(hints[f.name])
        yield key, _comment_above(cls, f.name) or (_docstring(sub) if sub else "")
        if sub is not None:
            yield from _walk(sub, key + ".")


def test_every_schema_field_has_a_description():
    rows = dict(_walk(Config))
    for key in ("model.moe.top_k", "data.sources.path", "logging.wandb.tags", "trainer.max_steps", "seed"):
        assert key in rows, key  # the walk reaches nested groups, list items and top-level fields
    assert len(rows) > 150, len(rows)
    missing = sorted(key for key, doc in rows.items() if not doc)
    assert not missing, f"schema fields without a comment above them (--help shows nothing): {missing}"

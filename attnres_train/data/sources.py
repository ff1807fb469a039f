"""Raw-text sources: turn one ``DataSourceConfig`` into a deterministic stream of document strings.

Why this is its own module: every way text can arrive (loose files, jsonl, parquet/arrow, the HF hub, the
built-in stdlib corpus) is reduced here to ``Iterator[str]`` in a fixed order, and every way it can be
broken is reported here as one ``UserInputError`` naming the file (and line or byte offset). The packer
downstream can then assume clean documents. The document rules per kind, limits and errors: docs/data.md
"Sources and kinds".
"""

from __future__ import annotations

import glob as globlib
import gzip
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field, replace
from typing import Iterator, List, Optional, Tuple

from attnres_train.config.data import DataSourceConfig
from attnres_train.config.errors import ConfigError, UserInputError

STDLIB_DEFAULT_MAX_BYTES = 8_000_000
TEXT_EXTS = (".txt", ".text", ".md", ".rst")
JSONL_EXTS = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".json.gz")
PARQUET_EXTS = (".parquet",)
ARROW_EXTS = (".arrow",)
RAW_KINDS = ("text", "jsonl", "parquet", "arrow", "hf", "stdlib")
# A text_unit: file document is read in pieces: the lines that start in each 4 MiB of the file (docs/data.md).
FILE_PIECE_BYTES = 4 << 20


@dataclass
class ResolvedSource:
    """A source with its concrete kind and the files it reads (all sorted)."""

    kind: str
    name: str  # shown in messages and progress bars
    cfg: DataSourceConfig
    where: str  # config path, e.g. data.sources[0]
    files: List[str] = field(default_factory=list)
    explicit_files: bool = False  # the user named these files one by one (empty file = error)

    def fingerprint(self) -> dict:
        """What identifies the *content* for the shard cache key (paths, sizes, mtimes; hub coordinates)."""
        fp = self.fingerprint_spec()
        if self.kind != "hf":
            fp["files"] = [(os.path.abspath(f), *_stat(f)) for f in self.files]
        return fp

    def fingerprint_spec(self) -> dict:
        """The part of the fingerprint that needs no file system access."""
        c = self.cfg
        fp = {"kind": self.kind, "text_field": c.text_field, "text_unit": c.text_unit}
        if self.kind == "hf":
            fp.update(
                name=self.name, config=c.hf_config, split=c.split, streaming=c.hf_streaming, revision=c.hf_revision
            )
        elif self.kind == "stdlib":
            fp.update(python=sys.version, root=_stdlib_root())
        if self.kind == "text" and c.text_unit == "file":
            fp["piece_bytes"] = FILE_PIECE_BYTES
        return fp

    def listing(self) -> dict:
        """The fingerprint without file sizes and mtimes: what start-up knows without one stat per file."""
        fp = self.fingerprint_spec()
        fp["files"] = [os.path.abspath(f) for f in self.files]
        return fp

    def directories(self) -> List[str]:
        """The directories that hold this source's files (their mtimes change when a file in them is added,
        removed or replaced by a rename)."""
        return sorted({os.path.dirname(os.path.abspath(f)) for f in self.files})


def _stat(path: str):
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def kind_of_file(path: str) -> Optional[str]:
    low = path.lower()
    for kind, exts in (("jsonl", JSONL_EXTS), ("parquet", PARQUET_EXTS), ("arrow", ARROW_EXTS), ("text", TEXT_EXTS)):
        if low.endswith(exts):
            return kind
    return None


def _list_dir(path: str) -> List[str]:
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith("."))
    return sorted(out)


def _files_only(paths: List[str]) -> List[str]:
    """The regular files (or links to them) among ``paths``, sorted: one directory listing per parent
    directory instead of one stat per path (docs/data.md "Cache")."""
    by_dir: dict = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(p), set()).add(os.path.basename(p))
    out = []
    for d, names in by_dir.items():
        with os.scandir(d or ".") as entries:
            out.extend(os.path.join(d, e.name) for e in entries if e.name in names and e.is_file())
    return sorted(out)


def _is_shard_dir(path: str) -> bool:
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))  # one listing, no stat per file
    return any(f.endswith(".json") and f[:-5] + ".bin" in names for f in names)


def _is_megatron_prefix(path: str) -> Optional[str]:
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    return prefix if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx") else None


def _looks_like_hub_name(path: str) -> bool:
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or os.sep == "\\" and "\\" in path:
        return False
    return kind_of_file(path) is None and not path.endswith((".bin", ".idx"))


def resolve_source(
    src: DataSourceConfig, where: str = "data.sources[0]", path_field: Optional[str] = None
) -> ResolvedSource:
    """Work out the concrete kind and file list of ``src``; raise UserInputError if nothing is there.

    Errors about the path name it ``{where}.path``, or ``path_field`` when given (a CLI's word for it: ``input``
    in attnres-prepare; each message names the path itself)."""
    rs = _resolve(src, where, path_field or f"{where}.path")
    if src.hf_revision is not None and rs.kind != "hf":
        raise ConfigError(
            f"{where}.hf_revision", f"only used with hub datasets, but {rs.name!r} is a local {rs.kind} source"
        )
    return rs


def _resolve(src: DataSourceConfig, where: str, at: str) -> ResolvedSource:
    kind, path = src.kind, os.path.expanduser(src.path or "")
    if src.hf_name or kind == "hf":
        return ResolvedSource("hf", src.hf_name or src.path, src, where)
    if kind == "stdlib" or (kind == "auto" and path == "stdlib"):
        return ResolvedSource("stdlib", "stdlib", src, where, files=_stdlib_files())
    if kind == "megatron" or (kind == "auto" and _is_megatron_prefix(path)):
        prefix = _is_megatron_prefix(path)
        if prefix is None:
            raise UserInputError(f"{at}: Megatron dataset {path!r} not found (need both {path}.bin and {path}.idx)")
        return ResolvedSource("megatron", prefix, src, where, files=[prefix])
    if kind == "memmap" or (kind == "auto" and _is_shard_dir(path)):
        if not os.path.exists(path):
            raise UserInputError(f"{at}: token shard directory {path!r} does not exist")
        return ResolvedSource("memmap", path, src, where, files=[path])

    explicit = False
    if any(ch in path for ch in "*?["):
        files = _files_only(globlib.glob(path, recursive=True))
        if not files:
            raise UserInputError(f"{at}: glob {path!r} matched no files")
    elif os.path.isdir(path):
        files = _list_dir(path)
        if not files:
            raise UserInputError(f"{at}: directory {path!r} contains no files")
    elif os.path.isfile(path):
        files, explicit = [path], True
    elif kind == "auto" and _looks_like_hub_name(src.path):
        return ResolvedSource("hf", src.path, src, where)
    else:
        raise UserInputError(f"{at}: data file {path!r} does not exist")

    if kind == "auto":
        kinds = {kind_of_file(f) for f in files}
        if explicit and kinds == {None}:
            kinds = {"text"}  # a single named file with an unknown extension is read as plain text
        files_known = [f for f in files if kind_of_file(f) is not None] if not explicit else files
        kinds.discard(None)
        if not kinds:
            raise UserInputError(
                f"{at}: no files with a known extension in {path!r} "
                f"(text: {', '.join(TEXT_EXTS)}; jsonl: {', '.join(JSONL_EXTS)}; .parquet; .arrow); set {where}.kind"
            )
        if len(kinds) > 1:
            raise UserInputError(f"{at}: {path!r} mixes file kinds {sorted(kinds)}; use one source per kind")
        kind, files = kinds.pop(), files_known
    elif kind not in RAW_KINDS:
        raise UserInputError(f"{where}.kind: {kind!r} cannot read {path!r}")
    return ResolvedSource(kind, src.path, src, where, files=files, explicit_files=explicit)


def _stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _stdlib_files() -> List[str]:
    root, out = _stdlib_root(), []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
        out.extend(os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".py"))
    out.sort(key=lambda f: os.path.relpath(f, root))
    if not out:
        raise UserInputError(f"stdlib source: no .py files under {root!r} (is the standard library installed?)")
    return out


def _utf8_error(
    path: str, data: bytes, e: UnicodeDecodeError, base: int = 0, line: Optional[int] = None
) -> UserInputError:
    loc = f"{path}:{line}" if line is not None else path
    bad = data[e.start : e.start + 1].hex()
    return UserInputError(
        f"{loc}: not valid UTF-8 at byte offset {base + e.start} (byte 0x{bad}); re-encode the file as UTF-8"
    )


def _check_nonempty(path: str, explicit: bool) -> bool:
    if os.path.getsize(path) > 0:
        return True
    if explicit:
        raise UserInputError(f"{path}: file is empty")
    return False


def _lines(path: str, start: int = 0) -> Iterator[Tuple[int, bytes]]:
    """(byte offset, raw line) of ``path`` from the first line that starts at or after ``start`` to the end
    (a line that began before ``start`` belongs to the byte range before)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()
        pos = f.tell()
        for raw in f:
            yield pos, raw
            pos += len(raw)


def _decode_line(path: str, raw: bytes, pos: int, lineno: Optional[int] = None) -> str:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, raw, e, base=pos, line=lineno) from None
    return line.removeprefix("\ufeff") if pos == 0 else line


def _line_before_is_blank(path: str, pos: int) -> bool:
    """Whether the line that ends at byte ``pos`` (a line start) is blank; true at the start of the file."""
    if pos == 0:
        return True
    with open(path, "rb") as f:
        tail, hi = b"", pos - 1  # byte pos-1 is the line's newline
        while hi > 0:
            lo = max(0, hi - (1 << 16))
            f.seek(lo)
            block = f.read(hi - lo)
            k = block.rfind(b"\n")
            tail = (block[k + 1 :] if k >= 0 else block) + tail
            if k >= 0:
                lo = lo + k + 1
                break
            hi = lo
        line = tail.decode("utf-8", "replace")
        return not (line.removeprefix("\ufeff") if lo == 0 else line).strip()


def _file_pieces(path: str, start: int = 0, end: Optional[int] = None) -> Iterator[str]:
    """``text_unit: file``: the file as documents of whole lines, piece ``g`` holding the lines that start in
    bytes ``[g*P, (g+1)*P)`` (P = FILE_PIECE_BYTES; a file up to P bytes is one document). With a byte
    range, the pieces whose ``g*P`` lies in ``[start, end)``; memory is one piece, never the whole file."""
    step = FILE_PIECE_BYTES
    if start == 0 and not path.endswith(".gz") and os.path.getsize(path) <= step:
        with open(path, "rb") as f:  # one piece: the whole file (the usual case, in one read)
            yield _decode_piece(path, [f.read()], 0)
        return
    g = -(-start // step)  # the first piece that starts in the range
    buf: List[bytes] = []
    base = g * step
    for pos, raw in _lines(path, base):
        if pos >= (g + 1) * step:
            if buf:
                yield _decode_piece(path, buf, base)
            buf, g, base = [], pos // step, pos
        if end is not None and g * step >= end:
            return
        buf.append(raw)
    if buf:
        yield _decode_piece(path, buf, base)


def _decode_piece(path: str, lines: List[bytes], base: int) -> str:
    data = b"".join(lines)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _utf8_error(path, data, e, base=base) from None
    return text.removeprefix("\ufeff") if base == 0 else text


def _text_docs(path: str, unit: str, start: int = 0, end: Optional[int] = None) -> Iterator[str]:
    """Documents of a text file; with a byte range, those that start in it (``_file_pieces`` for the file
    unit; for paragraphs, those whose first line starts in ``[start, end)``: the last one is read past
    ``end``, one begun before ``start`` is skipped)."""
    if unit == "file":
        yield from _file_pieces(path, start, end)
        return
    buf: List[str] = []
    skipping = None
    for pos, raw in _lines(path, start):
        if skipping is None:  # the first line of the range continues a paragraph of the range before?
            skipping = start > 0 and not _line_before_is_blank(path, pos)
        line = _decode_line(path, raw, pos)
        if not line.strip():
            if buf:
                yield "".join(buf).rstrip("\n")
                buf = []
            skipping = False
        elif not skipping:
            if not buf and end is not None and pos >= end:
                return  # this paragraph starts in the next range
            buf.append(line)
    if buf:
        yield "".join(buf).rstrip("\n")


def _jsonl_docs(path: str, text_field: str, where: str, start: int = 0, end: Optional[int] = None) -> Iterator[str]:
    """One document per line; with a byte range, the lines that start in ``[start, end)`` (located by byte
    offset in messages, as their line number is unknown without reading the file up to them)."""
    for lineno, (pos, raw) in enumerate(_lines(path, start), 1):
        if end is not None and pos >= end:
            return
        at = f"{path}:{lineno}" if start == 0 else f"{path} (line at byte {pos})"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _utf8_error(path, raw, e, base=pos, line=lineno if start == 0 else None) from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserInputError(f"{at}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
            raise UserInputError(f"{at}: no {text_field!r} field (found: {keys or 'nothing'}); set {where}.text_field")
        text = obj[text_field]
        if not isinstance(text, str):
            raise UserInputError(f"{at}: field {text_field!r} is a {type(text).__name__}, expected a string")
        yield text


def _datasets_docs(rs: ResolvedSource, files: List[str]) -> Iterator[str]:
    """parquet / arrow / hub rows through ``datasets`` (lazy import: it is slow to import)."""
    try:
        import datasets
    except ImportError:
        raise UserInputError(
            f"{rs.where}: reading {rs.kind} data needs the 'datasets' package (pip install datasets)"
        ) from None
    c = rs.cfg
    if rs.kind == "hf":
        what = f"{rs.name!r} (not a local path, so loaded as a Hugging Face hub dataset)"
    else:
        what = f"{rs.kind} file {files[0]!r}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else "")
    try:
        if rs.kind == "hf":
            ds = datasets.load_dataset(
                rs.name, c.hf_config, split=c.split, streaming=c.hf_streaming, revision=c.hf_revision
            )
        else:
            ds = datasets.load_dataset(rs.kind, data_files=files, split="train", streaming=True)
        cols = list(ds.features) if ds.features is not None else None
        if cols is not None and c.text_field not in cols:
            raise UserInputError(
                f"{rs.where}: {what} has no column {c.text_field!r} (columns: {', '.join(cols)}); set {rs.where}.text_field"
            )
        for i, row in enumerate(ds):
            text = row.get(c.text_field)
            if not isinstance(text, str):
                if c.text_field not in row:
                    raise UserInputError(
                        f"{rs.where}: {what} row {i} has no {c.text_field!r} field; set {rs.where}.text_field"
                    )
                if text is None:
                    continue
                raise UserInputError(
                    f"{rs.where}: {what} row {i}: {c.text_field!r} is a {type(text).__name__}, expected a string"
                )
            yield text
    except UserInputError:
        raise
    except Exception as e:
        hint = " (is the name or path right, and is the hub reachable?)" if rs.kind == "hf" else ""
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserInputError(f"{rs.where}: could not read {what}{hint}: {type(e).__name__}: {first}") from None


def _raw_docs(rs: ResolvedSource) -> Iterator[str]:
    c = rs.cfg
    if rs.kind in ("parquet", "arrow", "hf"):
        files = [f for f in rs.files if _check_nonempty(f, rs.explicit_files)]
        if files or rs.kind == "hf":
            yield from _datasets_docs(rs, files)
        return
    for path in rs.files:
        if rs.kind == "stdlib":
            try:
                with open(path, "rb") as f:
                    yield f.read().decode("utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a handful of stdlib test files are deliberately not UTF-8
        elif not _check_nonempty(path, rs.explicit_files):
            continue
        elif rs.kind == "text":
            yield from _text_docs(path, c.text_unit)
        elif rs.kind == "jsonl":
            yield from _jsonl_docs(path, c.text_field, rs.where)
        else:
            raise UserInputError(f"{rs.where}.kind: {rs.kind!r} sources hold tokens, not text")


def replace_lone_surrogates(text: str) -> str:
    """``text`` with every unpaired UTF-16 surrogate replaced by U+FFFD (as a UTF-8 decoder with
    ``errors="replace"`` would have read it). JSON may spell them (``"\ud800"``) but no tokenizer can encode them."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def effective_limits(rs: ResolvedSource, max_docs: Optional[int], max_bytes: Optional[int]):
    """Per-source overrides win over the global limits; stdlib gets a default byte cap."""
    docs = rs.cfg.max_docs if rs.cfg.max_docs is not None else max_docs
    nbytes = rs.cfg.max_bytes if rs.cfg.max_bytes is not None else max_bytes
    if rs.kind == "stdlib" and nbytes is None:
        nbytes = STDLIB_DEFAULT_MAX_BYTES
    return docs, nbytes


def clean_documents(texts: Iterator[str]) -> Iterator[tuple]:
    """(text, UTF-8 byte size) of the non-empty documents of ``texts``, lone surrogates replaced."""
    for text in texts:
        if not text:
            continue
        try:
            size = len(text.encode("utf-8"))
        except UnicodeEncodeError:  # lone surrogates ("\ud800": valid JSON, not Unicode) -> U+FFFD
            text = replace_lone_surrogates(text)
            size = len(text.encode("utf-8"))
        yield text, size


def splittable(rs: ResolvedSource, path: str) -> bool:
    """Whether :func:`file_documents` can read ``path`` by byte ranges (jsonl, text; not gzip: a range of
    a gzip file can only be reached by decompressing everything before it)."""
    return not path.endswith(".gz") and rs.kind in ("jsonl", "text")


def file_documents(rs: ResolvedSource, path: str, start: int = 0, end: Optional[int] = None) -> Iterator[tuple]:
    """(text, size) of the documents of one file of a file-based source (text, jsonl, stdlib), no limits;
    with a byte range (``splittable`` files), those that start in it: the ranges of a file partition it."""
    if start == 0 and end is None:
        return clean_documents(_raw_docs(replace(rs, files=[path])))
    if not splittable(rs, path):
        raise ValueError(f"{path}: cannot be read by byte ranges")
    if rs.kind == "jsonl":
        return clean_documents(_jsonl_docs(path, rs.cfg.text_field, rs.where, start, end))
    return clean_documents(_text_docs(path, rs.cfg.text_unit, start, end))


def iter_documents(
    rs: ResolvedSource, max_docs: Optional[int] = None, max_bytes: Optional[int] = None
) -> Iterator[str]:
    """The documents of ``rs`` in their fixed order, limits applied (see module docstring)."""
    max_docs, max_bytes = effective_limits(rs, max_docs, max_bytes)
    n = nbytes = 0
    for text, size in clean_documents(_raw_docs(rs)):
        yield text
        n += 1
        nbytes += size
        if (max_docs is not None and n >= max_docs) or (max_bytes is not None and nbytes >= max_bytes):
            return
    if n == 0:
        raise UserInputError(f"{rs.where}: source {rs.name!r} contains no documents (are all files empty?)")

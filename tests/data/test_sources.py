"""Raw-text sources and tokenizers: every kind yields the right documents in a fixed order, and every kind
of bad input is one UserInputError naming the file (and line / byte offset)."""

import json
import os

import pytest

from attnres_train.config.data import DataSourceConfig
from attnres_train.config.errors import UserInputError
from attnres_train.data.sources import STDLIB_DEFAULT_MAX_BYTES, iter_documents, resolve_source
from attnres_train.data.tokenizer import ByteTokenizer, load_tokenizer


def docs(path, **kw):
    limits = {k: kw.pop(k) for k in ("max_docs", "max_bytes") if k in kw}
    return list(iter_documents(resolve_source(DataSourceConfig(path=str(path), **kw)), **limits))


def test_text_file_is_one_document_or_paragraphs(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("\ufeffpara one\nstill one\n\n\npara two\n  \npara three")
    assert docs(f) == ["para one\nstill one\n\n\npara two\n  \npara three"]
    assert docs(f, text_unit="paragraph") == ["para one\nstill one", "para two", "para three"]


def test_directory_sorted_with_empty_files_skipped_and_limits(tmp_path):
    for name, text in [("b.txt", "bee"), ("a.txt", "ay"), ("sub/c.md", "sea"), ("empty.txt", ""), ("skip.bin", "x")]:
        p = tmp_path / "d" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    assert docs(tmp_path / "d") == ["ay", "bee", "sea"]  # unknown extensions ignored in auto mode
    assert docs(tmp_path / "d", max_docs=2) == ["ay", "bee"]
    assert docs(tmp_path / "d", max_bytes=3) == ["ay", "bee"]  # the crossing document is kept whole
    assert docs(str(tmp_path / "d" / "*.txt")) == ["ay", "bee"]


def test_jsonl_reads_text_field(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "one", "id": 1}\n\n{"body": "b", "text": "two"}\n')
    assert docs(f) == ["one", "two"]
    g = tmp_path / "y.jsonl"
    g.write_text('{"body": "alt"}\n')
    assert docs(g, text_field="body") == ["alt"]


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(UserInputError, match=r"missing\.txt.*does not exist"):
        docs(tmp_path / "missing.txt")
    with pytest.raises(UserInputError, match="matched no files"):
        docs(str(tmp_path / "nothing-*.jsonl"))


def test_empty_file_is_an_error(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    with pytest.raises(UserInputError, match=r"empty\.txt: file is empty"):
        docs(f)
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_text("")
    with pytest.raises(UserInputError, match="contains no documents"):
        docs(d)


def test_non_utf8_names_file_and_byte_offset(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes(b"hello\nwor\xffld\n")
    with pytest.raises(UserInputError, match=r"latin1\.txt: not valid UTF-8 at byte offset 9 \(byte 0xff\)"):
        docs(f)
    with pytest.raises(UserInputError, match=r"latin1\.txt: not valid UTF-8 at byte offset 9"):
        docs(f, text_unit="paragraph")
    g = tmp_path / "bad.jsonl"
    g.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserInputError, match=r"bad\.jsonl:2: not valid UTF-8 at byte offset 28"):
        docs(g)


def test_bad_jsonl_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserInputError, match=r"bad\.jsonl:2: not valid JSON"):
        docs(f)
    g = tmp_path / "nofield.jsonl"
    g.write_text('{"text": "fine"}\n\n{"content": "x"}\n')
    with pytest.raises(UserInputError, match=r"nofield\.jsonl:3: no 'text' field \(found: content\)"):
        docs(g)
    h = tmp_path / "notstr.jsonl"
    h.write_text(json.dumps({"text": 5}) + "\n")
    with pytest.raises(UserInputError, match=r"notstr\.jsonl:1: field 'text' is a int"):
        docs(h)


def test_kind_resolution(tmp_path):
    assert resolve_source(DataSourceConfig(path="stdlib")).kind == "stdlib"
    assert resolve_source(DataSourceConfig(path="allenai/c4")).kind == "hf"  # resolved only, no download
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("a")
    (mixed / "b.jsonl").write_text('{"text": "b"}\n')
    with pytest.raises(UserInputError, match="mixes file kinds"):
        resolve_source(DataSourceConfig(path=str(mixed)))
    odd = tmp_path / "corpus.dat"
    odd.write_text("plain text")
    assert resolve_source(DataSourceConfig(path=str(odd))).kind == "text"  # a named file is read as text


def test_parquet_and_arrow_through_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": ["first row", "second row"], "n": [1, 2]})
    pq.write_table(table, tmp_path / "t.parquet")
    assert docs(tmp_path / "t.parquet") == ["first row", "second row"]
    with pytest.raises(UserInputError, match=r"t\.parquet.*no column 'body' \(columns: text, n\)"):
        docs(tmp_path / "t.parquet", text_field="body")
    with pa.OSFile(str(tmp_path / "t.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    assert docs(tmp_path / "t.arrow") == ["first row", "second row"]


def test_stdlib_corpus_is_capped_and_sorted():
    rs = resolve_source(DataSourceConfig(path="stdlib"))
    root = os.path.dirname(os.__file__)
    rel = [os.path.relpath(f, root) for f in rs.files]
    assert rel == sorted(rel) and all(r.endswith(".py") and "site-packages" not in r for r in rel)
    first = list(iter_documents(rs, max_bytes=50_000))
    assert first == list(iter_documents(rs, max_bytes=50_000))
    assert sum(len(d.encode()) for d in first) >= 50_000
    with open(rs.files[0], encoding="utf-8") as f:
        head = f.read()
    assert first[0] == head or not head  # first non-empty file in sorted order
    assert STDLIB_DEFAULT_MAX_BYTES <= 16_000_000


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 258 and tok.eos_id == 256
    text = "naïve → ok\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_id]) == text + "<|endoftext|>"
    assert [a.tolist() for a in tok.encode_batch(["ab", ""])] == [[97, 98], []]


def test_unknown_tokenizer_path_is_an_error(tmp_path):
    with pytest.raises(UserInputError, match=r"tokenizer path .*no-such-tok.* does not exist"):
        load_tokenizer(str(tmp_path / "no-such-tok"))
    not_a_tok = tmp_path / "empty_dir"
    not_a_tok.mkdir()
    with pytest.raises(UserInputError, match="could not load a tokenizer"):
        load_tokenizer(str(not_a_tok))


def test_hub_revision_is_passed_to_datasets_and_keys_the_cache(tmp_path, monkeypatch):
    import datasets

    from attnres_train.config.errors import ConfigError
    from attnres_train.data.loader import cache_key
    from attnres_train.data.sources import iter_documents
    from attnres_train.data.tokenizer import ByteTokenizer

    seen = []

    class _Rows(list):
        features = {"text": None}

    def fake_load_dataset(name, config=None, **kw):
        seen.append((name, kw.get("revision")))
        return _Rows([{"text": "hub row"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    keys = []
    for rev in ("v1.0", "0123abc", None):
        rs = resolve_source(DataSourceConfig(path="org/corpus", kind="hf", hf_revision=rev))
        assert list(iter_documents(rs)) == ["hub row"]
        keys.append(cache_key(rs, ByteTokenizer(), None, None))
    assert seen == [("org/corpus", "v1.0"), ("org/corpus", "0123abc"), ("org/corpus", None)]
    assert len(set(keys)) == 3  # another revision never reuses a tokenized cache
    (tmp_path / "a.txt").write_text("local")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].hf_revision: only used with hub datasets"):
        resolve_source(DataSourceConfig(path=str(tmp_path / "a.txt"), hf_revision="main"), "data.sources[0]")

"""Every bad input ends in one ``error:`` line naming the field or file, exit 2, no traceback, nothing written.

The acceptance table of issue 15 (docs/training.md, "Bad input"): config values, Hydra's own errors, run
directories, data, tokenizers, checkpoints and the other CLI tools (attnres-prepare/-convert/-plan/-analyze/
-compare, launch/torchrun.sh). Python tools run in this process (their ``main``, the current directory inside
the case's temporary tree) so a case costs a call, not an interpreter start; the launcher runs as a subprocess.
Each case hashes its own tree and the shared fixtures (corpus, data cache, a trained run) before and after.
"""

import hashlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from attnres_train.cli import analyze, compare, convert, plan, prepare
from attnres_train.cli import train as train_cli
from tests import subproc

from .conftest import REPO, tiny_overrides, write_corpus

# slow: ~40 s of CPU in all (in-process cases; the launcher rows start processes). A traceback printed from a
# __del__ after the error line ("Exception ignored in ...") reaches pytest as this warning: an error here.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]

TORCHRUN_SH = REPO / "launch" / "torchrun.sh"


# ---- fixtures shared by every case (read-only for the cases; hashed around each one) ------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    corpus = write_corpus(root / "corpus", docs=24)
    run_dir = root / "trained"
    cache = root / "data_cache"
    overrides = tiny_overrides(corpus, run_dir, steps=2, **{"data.cache_dir": str(cache)})
    train_cli.run(overrides)
    shards = root / "shards"
    assert prepare.main([str(corpus), "--out", str(shards)]) == 0
    return {"root": root, "corpus": corpus, "run": run_dir, "cache": cache, "shards": shards}


def _snapshot(*roots: Path) -> dict:
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# ---- per-case files (made before the "before" hash) ---------------------------------------------------------
def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _copy_run(w, case: Path) -> Path:
    dst = case / "run"
    shutil.copytree(w["run"], dst)
    return dst


def _step_dir(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("step_*"))[-1]


def _truncate_biggest_distcp(w, case):
    run = _copy_run(w, case)
    victim = max(_step_dir(run).rglob("*.distcp"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def _drop_meta(w, case):
    (_step_dir(_copy_run(w, case)) / "meta.json").unlink()


def _garble_meta(w, case):
    (_step_dir(_copy_run(w, case)) / "meta.json").write_text("{not json")


def _uncommit(w, case):
    (_step_dir(_copy_run(w, case)) / "COMMITTED").unlink()


SETUPS = {
    "empty_txt": lambda w, c: _write(c / "d" / "a.txt", ""),
    "latin1_txt": lambda w, c: _write(c / "d" / "a.txt", b"caf\xe9 au lait\n" * 20),
    "bad_jsonl": lambda w, c: _write(c / "bad.jsonl", '{"text": "ok"}\nnot json at all\n'),
    "jsonl_no_field": lambda w, c: _write(c / "b.jsonl", '{"body": "no text field"}\n' * 3),
    "empty_dir": lambda w, c: (c / "d").mkdir(),
    "garbage_parquet": lambda w, c: _write(c / "x.parquet", b"this is not parquet" * 10),
    "a_file": lambda w, c: _write(c / "file", "a file, not a directory"),
    "tok_garbage": lambda w, c: _write(c / "tok" / "tokenizer.json", "{garbage"),
    "tok_empty_dir": lambda w, c: (c / "tok").mkdir(),
    "shards_truncated": lambda w, c: _truncate_shard(w, c),
    "shards_no_index": lambda w, c: _shards_without_index(w, c),
    "megatron_no_idx": lambda w, c: _write(c / "mg" / "text_document.bin", b"\0" * 64),
    "megatron_bad_idx": lambda w, c: (
        _write(c / "mg" / "text_document.bin", b"\0" * 64),
        _write(c / "mg" / "text_document.idx", b"MMIDIDX\0\0garbage"),
    ),
    "run_copy": lambda w, c: _copy_run(w, c),
    "ckpt_truncated": _truncate_biggest_distcp,
    "ckpt_no_meta": _drop_meta,
    "ckpt_bad_meta": _garble_meta,
    "ckpt_uncommitted": _uncommit,
    "nonempty_dir": lambda w, c: _write(c / "out" / "keep.txt", "keep"),
    "run_no_metrics": lambda w, c: (c / "r").mkdir(),
    "run_garbage_metrics": lambda w, c: (
        _write(c / "r" / "config.yaml", (w["run"] / "config.yaml").read_bytes()),
        _write(c / "r" / "metrics.jsonl", "not json\n[1, 2]\n"),
    ),
}


def _truncate_shard(w, case):
    dst = case / "shards"
    shutil.copytree(w["shards"], dst)
    victim = sorted(dst.glob("*.bin"))[0]
    victim.write_bytes(victim.read_bytes()[:7])


def _shards_without_index(w, case):
    dst = case / "shards"
    shutil.copytree(w["shards"], dst)
    for p in dst.glob("*.json"):
        p.unlink()


# ---- the table ---------------------------------------------------------------------------------------------
# name: (tool, arguments, words the error line must contain, setup). Placeholders: @case (this case's dir),
# @corpus, @shards, @run (the shared trained run; read-only), @cache (shared data cache).
# tool "train" = attnres-train with the tiny overrides (run_dir=@case/run unless given) plus these.
def src(path, kind="text", **extra):
    more = "".join(f", {k}: {v}" for k, v in extra.items())
    return f"data.sources=[{{path: '{path}', kind: {kind}{more}}}]"


T = "train"
CASES = {
    # config values and cross-field rules (checked in the pre-flight, before torch is imported)
    "max_steps_negative": (T, ["trainer.max_steps=-1"], ["trainer.max_steps"], None),
    "global_batch_zero": (T, ["trainer.global_batch_size=0"], ["trainer.global_batch_size"], None),
    "micro_batch_zero": (T, ["trainer.micro_batch_size=0"], ["trainer.micro_batch_size"], None),
    "batch_indivisible": (T, ["trainer.global_batch_size=5"], ["trainer.global_batch_size"], None),
    "lr_negative": (T, ["optim.lr=-1"], ["optim.lr"], None),
    "warmup_negative": (T, ["optim.warmup_steps=-1"], ["optim.warmup_steps"], None),
    "warmup_longer_than_run": (T, ["trainer.max_steps=20", "optim.warmup_steps=30"], ["optim.warmup_steps"], None),
    "optimizer_unknown": (T, ["optim.name=sgd"], ["optim.name"], None),
    "seq_len_zero": (T, ["data.seq_len=0"], ["data.seq_len"], None),
    "val_fraction_one": (T, ["data.val_fraction=1.5"], ["data.val_fraction"], None),
    "num_workers_negative": (T, ["data.num_workers=-1"], ["data.num_workers"], None),
    "data_max_docs_zero": (T, ["data.max_docs=0"], ["data.max_docs"], None),
    "tokenizer_blank": (T, ["data.tokenizer=' '"], ["data.tokenizer"], None),
    "vocab_zero": (T, ["model.vocab_size=0"], ["model.vocab_size"], None),
    "vocab_too_big_for_memory": (T, ["model.vocab_size=1000000000000"], ["model.vocab_size"], None),
    "hidden_negative": (T, ["model.hidden_size=-8"], ["model.hidden_size"], None),
    "layers_zero": (T, ["model.num_layers=0"], ["model.num_layers"], None),
    "residual_mode_unknown": (T, ["model.residual.mode=dense"], ["model.residual.mode"], None),
    "num_blocks_zero": (T, ["model.residual.num_blocks=0"], ["model.residual.num_blocks"], None),
    "num_blocks_without_block_mode": (
        T,
        ["model.residual.mode=full", "model.residual.num_blocks=2"],
        ["model.residual.num_blocks"],
        None,
    ),
    "top_k_above_experts": (T, ["model.moe.top_k=99"], ["model.moe.top_k"], None),
    "tp_without_ranks": (T, ["parallel.tp=3"], ["parallel.dp_shard", "1*3*1"], None),
    "pp_without_ranks": (T, ["parallel.pp=2"], ["parallel.dp_shard", "1*1*2"], None),
    "resume_mode_unknown": (T, ["checkpoint.resume=sometimes"], ["checkpoint.resume=sometimes", "auto, none"], None),
    "checkpoint_interval_negative": (T, ["checkpoint.interval=-1"], ["checkpoint.interval"], None),
    "device_unknown": (T, ["trainer.device=tpu"], ["trainer.device"], None),
    "precision_unknown": (T, ["trainer.precision=fp8"], ["trainer.precision"], None),
    "threads_above_cores": (T, ["trainer.num_threads=100000"], ["trainer.num_threads"], None),
    "sample_temperature_negative": (T, ["trainer.sample_temperature=-1"], ["trainer.sample_temperature"], None),
    "peak_flops_negative": (T, ["trainer.peak_flops=-1"], ["trainer.peak_flops"], None),
    "sources_empty": (T, ["data.sources=[]"], ["data.sources"], None),
    "source_kind_unknown": (T, [src("@corpus", "bogus")], ["data.sources[0].kind"], None),
    "source_weight_zero": (T, [src("@corpus", weight=0)], ["data.sources[0].weight"], None),
    "source_option_unknown": (T, [src("@corpus", colour="red")], ["data.sources[*].colour"], None),
    "source_weight_wrong_type": (T, [src("@corpus", weight="abc")], ["data.sources[*].weight"], None),
    "source_text_unit_unknown": (T, [src("@corpus", text_unit="line")], ["data.sources[0].text_unit"], None),
    "source_hf_name_with_text_kind": (T, [src("@corpus", hf_name="x/y")], ["data.sources[0].hf_name"], None),
    "source_max_bytes_zero": (T, [src("@corpus", max_bytes=0)], ["data.sources[0].max_bytes"], None),
    # Hydra's own errors
    "unknown_key": (T, ["trainer.foo=1"], ["trainer.foo"], None),
    "unknown_top_level_key": (T, ["foo=1"], ["foo"], None),
    "plus_unknown_key": (T, ["+trainer.foo=1"], ["trainer.foo"], None),
    "misspelt_nested_key": (T, ["model.moe.topk=2"], ["model.moe.topk", "top_k"], None),
    "type_int": (T, ["trainer.max_steps=abc"], ["trainer.max_steps"], None),
    "type_bool": (T, ["trainer.compile=maybe"], ["trainer.compile"], None),
    "type_float": (T, ["optim.lr=fast"], ["optim.lr"], None),
    "type_seed": (T, ["seed=abc"], ["seed"], None),
    "sources_not_a_list": (T, ["data.sources=7"], ["data.sources"], None),
    "model_option_unknown": (T, ["model=nope"], ["model=nope"], None),
    "experiment_option_unknown": (T, ["experiment=nope"], ["experiment=nope"], None),
    "override_syntax": (T, ["trainer.max_steps=[1,"], ["trainer.max_steps=[1,"], None),
    "sweep_without_multirun": (T, ["seed=1,2"], ["seed=1,2", "--multirun"], None),
    "flag_unknown": (T, ["--frobnicate"], ["--frobnicate"], None),
    "flag_cfg_bad_choice": (T, ["--cfg", "nope"], ["--cfg", "nope"], None),
    "flags_run_and_cfg": (T, ["--cfg", "job", "--run"], ["--run", "--cfg"], None),
    "flag_resolve_without_cfg": (T, ["--resolve"], ["--resolve", "--cfg"], None),
    "flag_completion_query_without_comp_line": (T, ["-sc", "query=bash"], ["query=bash", "COMP_LINE"], None),
    # run directories
    "run_dir_empty": (T, ["run_dir="], ["run_dir"], None),
    "run_dir_below_a_file": (T, ["run_dir=@case/file/run"], ["run_dir", "file"], "a_file"),
    "run_dir_is_a_file": (T, ["run_dir=@case/file"], ["run_dir", "file"], "a_file"),
    "run_dir_on_proc": (T, ["run_dir=/proc/attnres_table_run"], ["run_dir", "/proc/attnres_table_run"], None),
    # data files (the readers, after the config is valid)
    "data_file_missing": (T, [src("/nonexistent/corpus.txt")], ["/nonexistent/corpus.txt"], None),
    "data_file_empty": (T, [src("@case/d")], ["empty"], "empty_txt"),
    "data_dir_empty": (T, [src("@case/d")], ["@case/d"], "empty_dir"),
    "data_glob_matches_nothing": (T, [src("@case/*.nothing")], ["*.nothing"], None),
    "data_not_utf8": (T, [src("@case/d")], ["UTF-8"], "latin1_txt"),
    "data_jsonl_bad_line": (T, [src("@case/bad.jsonl", "jsonl")], ["bad.jsonl:2"], "bad_jsonl"),
    "data_jsonl_missing_field": (T, [src("@case/b.jsonl", "jsonl")], ["text"], "jsonl_no_field"),
    "data_parquet_corrupt": (T, [src("@case/x.parquet", "parquet")], ["x.parquet"], "garbage_parquet"),
    "shards_missing": (T, [src("@case/none", "memmap")], ["@case/none"], None),
    "shards_truncated": (T, [src("@case/shards", "memmap")], ["@case/shards"], "shards_truncated"),
    "shards_without_headers": (T, [src("@case/shards", "memmap")], ["@case/shards"], "shards_no_index"),
    "megatron_without_idx": (T, [src("@case/mg/text_document", "megatron")], ["text_document"], "megatron_no_idx"),
    "megatron_corrupt_idx": (T, [src("@case/mg/text_document", "megatron")], ["text_document"], "megatron_bad_idx"),
    "blend_one_source_missing": (
        T,
        ["data.sources=[{path: '@corpus', kind: text}, {path: '/nonexistent/b', kind: text}]"],
        ["data.sources[1]", "/nonexistent/b"],
        None,
    ),
    # tokenizers
    "tokenizer_missing": (T, ["data.tokenizer=/nonexistent/tok"], ["/nonexistent/tok"], None),
    "tokenizer_corrupt": (T, ["data.tokenizer=@case/tok"], ["@case/tok"], "tok_garbage"),
    "tokenizer_dir_empty": (T, ["data.tokenizer=@case/tok"], ["@case/tok"], "tok_empty_dir"),
    "tokenizer_larger_than_model": (T, ["model.vocab_size=100"], ["model.vocab_size"], None),
    # checkpoints (a copy of the trained run in the case's dir)
    "resume_path_missing": (T, ["checkpoint.resume=/nonexistent/step_1"], ["/nonexistent/step_1"], None),
    "resume_path_is_a_file": (T, ["checkpoint.resume=@case/file"], ["@case/file"], "a_file"),
    "resume_truncated_shard": (T, ["run_dir=@case/run", "checkpoint.resume=auto"], [".distcp"], "ckpt_truncated"),
    "resume_without_meta": (T, ["run_dir=@case/run", "checkpoint.resume=auto"], ["meta.json", "step_"], "ckpt_no_meta"),
    "resume_corrupt_meta": (T, ["run_dir=@case/run", "checkpoint.resume=auto"], ["meta.json"], "ckpt_bad_meta"),
    "resume_only_uncommitted": (
        T,
        ["run_dir=@case/run", "checkpoint.resume=auto"],
        ["checkpoint.overwrite"],
        "ckpt_uncommitted",
    ),
    "resume_none_over_checkpoints": (
        T,
        ["run_dir=@case/run", "checkpoint.resume=none"],
        ["checkpoint.overwrite"],
        "run_copy",
    ),
    "resume_foreign_model": (
        T,
        ["run_dir=@case/run", "checkpoint.resume=auto", "model.hidden_size=64"],
        ["model.hidden_size"],
        "run_copy",
    ),
    # attnres-prepare
    "prepare_no_arguments": ("prepare", [], ["INPUT"], None),
    "prepare_without_out": ("prepare", ["@corpus"], ["--out"], None),
    "prepare_out_not_empty": ("prepare", ["@corpus", "--out", "@case/out"], ["@case/out"], "nonempty_dir"),
    "prepare_input_missing": (
        "prepare",
        ["/nonexistent/in", "--out", "@case/o"],
        ["error: input: data file '/nonexistent/in' does not exist"],
        None,
    ),
    "prepare_glob_matches_nothing": ("prepare", ["@case/none*.txt", "--out", "@case/o"], ["input: glob"], None),
    "prepare_workers_zero": ("prepare", ["@corpus", "--out", "@case/o", "--workers", "0"], ["--workers"], None),
    "prepare_tokenizer_missing": (
        "prepare",
        ["@corpus", "--out", "@case/o", "--tokenizer", "/nonexistent/tok"],
        ["/nonexistent/tok"],
        None,
    ),
    "prepare_kind_unknown": ("prepare", ["@corpus", "--out", "@case/o", "--kind", "megatron"], ["--kind"], None),
    "prepare_bpe_without_tokenizer_out": (
        "prepare",
        ["@corpus", "--out", "@case/o", "--train-bpe", "300"],
        ["--train-bpe", "--tokenizer-out"],
        None,
    ),
    "prepare_bpe_too_small": (
        "prepare",
        ["@corpus", "--out", "@case/o", "--train-bpe", "10", "--tokenizer-out", "@case/t"],
        ["--train-bpe", "258"],
        None,
    ),
    "prepare_shard_tokens_zero": (
        "prepare",
        ["@corpus", "--out", "@case/o", "--shard-tokens", "0"],
        ["--shard-tokens"],
        None,
    ),
    "prepare_merge_plain_text": ("prepare", ["@corpus", "--out", "@case/o", "--merge"], ["@corpus"], None),
    # attnres-convert
    "convert_no_command": ("convert", [], ["command"], None),
    "convert_from_hf_missing": ("convert", ["from-hf", "/nonexistent/hf", "@case/o"], ["/nonexistent/hf"], None),
    "convert_to_hf_missing": ("convert", ["to-hf", "/nonexistent/ck", "@case/o"], ["/nonexistent/ck"], None),
    "convert_to_hf_empty_dir": ("convert", ["to-hf", "@case/d", "@case/o"], ["@case/d"], "empty_dir"),
    "convert_to_hf_bad_dtype": ("convert", ["to-hf", "@run", "@case/o", "--dtype", "int8"], ["--dtype"], None),
    "convert_init_run_missing": ("convert", ["init-run", "/nonexistent/hf", "@case/r"], ["/nonexistent/hf"], None),
    # attnres-plan
    "plan_model_unknown": ("plan", ["--model", "nope"], ["nope"], None),
    "plan_world_not_divisible": (
        "plan",
        ["--world-size", "3", "--tp", "2"],
        ["parallel.dp_shard", "world size 3"],
        None,
    ),
    "plan_bad_option": ("plan", ["--frobnicate"], ["--frobnicate"], None),
    # attnres-analyze / attnres-compare
    "analyze_missing_run": ("analyze", ["/nonexistent/run"], ["/nonexistent/run"], None),
    "analyze_dir_without_metrics": ("analyze", ["@case/r"], ["@case/r"], "run_no_metrics"),
    "analyze_metrics_only_no_records": (
        "analyze",
        ["@case/r", "--metrics-only"],
        ["@case/r/metrics.jsonl", "--metrics-only"],
        "run_garbage_metrics",
    ),
    "analyze_checkpoint_missing": ("analyze", ["@run", "--checkpoint", "/nonexistent/ck"], ["/nonexistent/ck"], None),
    "compare_missing_run": ("compare", ["/nonexistent/run"], ["/nonexistent/run"], None),
    "compare_bad_loss": ("compare", ["@run", "--loss", "test"], ["--loss"], None),
    # launch/torchrun.sh (options, and a bad override: refused once, before torchrun starts workers)
    "torchrun_nproc_not_int": ("torchrun", ["--nproc", "two", "--", "model=tiny"], ["--nproc"], None),
    "torchrun_nproc_zero": ("torchrun", ["--nproc", "0", "--", "model=tiny"], ["--nproc"], None),
    "torchrun_nproc_without_value": ("torchrun", ["--nproc"], ["--nproc"], None),
    "torchrun_nodes_without_rdzv": ("torchrun", ["--nnodes", "2", "--", "model=tiny"], ["--rdzv"], None),
    "torchrun_node_rank_too_big": (
        "torchrun",
        ["--nnodes", "2", "--node-rank", "5", "--rdzv", "localhost:1", "--", "model=tiny"],
        ["--node-rank"],
        None,
    ),
    "torchrun_unknown_option": ("torchrun", ["--frobnicate"], ["--frobnicate"], None),
    "torchrun_bad_override": (
        "torchrun",
        ["--nproc", "2", "--", "model=tiny", "trainer.device=cpu", "trainer.foo=1", "run_dir=@case/run"],
        ["trainer.foo"],
        None,
    ),
}


def _fill(args, w, case: Path):
    subs = {"@case": str(case), "@corpus": str(w["corpus"]), "@shards": str(w["shards"]), "@run": str(w["run"])}
    out = []
    for a in args:
        for k, v in subs.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def _call(fn, argv):
    try:
        return fn(argv)
    except SystemExit as exc:
        return exc.code


def _train(argv, w, case, monkeypatch):
    base = tiny_overrides(w["corpus"], case / "run", steps=2, **{"data.cache_dir": str(w["cache"])})
    keys = {a.lstrip("+").split("=", 1)[0] for a in argv}
    argv = [o for o in base if o.split("=", 1)[0] not in keys] + argv
    monkeypatch.setenv("HYDRA_FULL_ERROR", "")  # main() sets it: recorded here so that teardown unsets it again
    monkeypatch.delenv("HYDRA_FULL_ERROR")
    monkeypatch.setattr(sys, "argv", ["attnres-train", *argv])
    return _call(lambda _: train_cli.main(), None)


def _torchrun(argv, case):
    env = subproc.child_env({k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    proc = subproc.run(["bash", str(TORCHRUN_SH), *argv], case.parent / "logs", "torchrun", env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


TOOLS = {"prepare": prepare.main, "convert": convert.main, "plan": plan.main, "analyze": analyze.main}
TOOLS["compare"] = compare.main


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, world, tmp_path, monkeypatch, capsys):
    tool, args, needles, setup = CASES[name]
    case = tmp_path / "case"
    case.mkdir()
    if setup:
        SETUPS[setup](world, case)
    argv, needles = _fill(args, world, case), _fill(needles, world, case)
    monkeypatch.chdir(case)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    before = _snapshot(case, world["root"])
    if tool == "torchrun":
        code, out, err = _torchrun(argv, case)
    else:
        code = _train(argv, world, case, monkeypatch) if tool == T else _call(TOOLS[tool], argv)
        captured = capsys.readouterr()
        out, err = captured.out, captured.err
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert _snapshot(case, world["root"]) == before
    assert not Path("/proc/attnres_table_run").exists()


def test_the_table_is_large_and_distinct():
    assert len(CASES) >= 80
    assert len({(tool, tuple(args), setup) for tool, args, _, setup in CASES.values()}) == len(CASES)

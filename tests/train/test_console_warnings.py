"""Console contract, second part: MFU against a labelled, stable peak (configured, GPU table, or a CPU probe cached
per machine), warnings for a collapsed router and for a model vocabulary larger than the tokenizer's, and each
rank's traceback in RUN_DIR/logs/rank<k>.log when a run fails."""

from __future__ import annotations

import json

import pytest
import torch

from attnres_train.cli.init_run import compose_run_config
from attnres_train.config.errors import ConfigError
from attnres_train.config.schema import validate_config
from attnres_train.model.moe import Router
from attnres_train.parallel.mesh import single_process_context
from attnres_train.train import metrics
from attnres_train.train.callbacks import TrainerCallback
from attnres_train.train.metrics import cached_cpu_peak, resolve_peak
from attnres_train.train.trainer import Trainer

from .conftest import read_metrics, tiny_overrides


class Counter:
    """A stand-in probe: returns ``value`` and counts its calls."""

    def __init__(self, value: float):
        self.value, self.calls = value, 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


def test_cpu_peak_is_probed_once_per_machine_key_and_then_read_from_the_cache(tmp_path):
    probe = Counter(3.5e10)
    first = cached_cpu_peak(tmp_path, measure=probe)
    again = cached_cpu_peak(tmp_path, measure=Counter(1.0))  # a second run: no probe, the stored number
    path = tmp_path / "peak_flops.json"
    assert probe.calls == 1 and first == (3.5e10, f"probe (cached {path}, new)")
    assert again == (3.5e10, f"probe (cached {path})")
    [(key, value)] = json.loads(path.read_text()).items()
    # the key names what the peak depends on: this process's threads and torch version (and the CPU model)
    assert value == 3.5e10 and f"{torch.get_num_threads()} threads" in key and torch.__version__ in key


def test_another_thread_count_is_another_machine_key(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cached_cpu_peak(tmp_path, measure=Counter(1e10))[0] == 1e10
        torch.set_num_threads(2)
        probe = Counter(2e10)
        assert cached_cpu_peak(tmp_path, measure=probe)[0] == 2e10 and probe.calls == 1
        torch.set_num_threads(1)
        assert cached_cpu_peak(tmp_path, measure=Counter(9.0))[0] == 1e10  # each key keeps its own value
    finally:
        torch.set_num_threads(before)
    assert len(json.loads((tmp_path / "peak_flops.json").read_text())) == 2


def test_an_unwritable_cache_still_gives_a_peak_and_says_so(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    value, source = cached_cpu_peak(blocker / "cache", measure=Counter(7e9))
    assert value == 7e9 and source.startswith("probe (not cached: ")


def test_peak_sources_in_order_configured_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNRES_TRAIN_CACHE", str(tmp_path))
    cached_cpu_peak(tmp_path, measure=Counter(4.25e10))  # seed this machine's entry
    assert resolve_peak(torch.device("cpu"), 0.0) == (4.25e10, f"probe (cached {tmp_path / 'peak_flops.json'})")
    assert resolve_peak(torch.device("cpu"), 1e12) == (1e12, "configured")
    other_rank = tmp_path / "other_rank"  # ranks other than 0 log no MFU: no probe, nothing written
    value, source = resolve_peak(torch.device("cpu"), 0.0, cache_dir=other_rank, probe=False)
    assert value == 0.0 and "rank 0" in source and not other_rank.exists()
    value, source = resolve_peak(torch.device("meta"), 0.0)  # no table, no probe: no MFU, and the field to set
    assert value == 0.0 and "trainer.peak_flops" in source


def test_a_known_gpu_is_labelled_with_its_table_entry(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert resolve_peak(torch.device("cuda", 0), 0.0) == (989e12, "table:H200")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    value, source = resolve_peak(torch.device("cuda", 0), 0.0)
    assert value == 0.0 and "'Some GPU'" in source and "trainer.peak_flops" in source


class CollapseRouting(TrainerCallback):
    """Before the first step: every router's selection bias makes expert 0 win every token (bias updates are off
    in this run, so it stays)."""

    def on_train_start(self, trainer):
        routers = [m for m in trainer.model.modules() if isinstance(m, Router)]
        assert routers
        for r in routers:
            r.e_score_correction_bias[0] = 100.0


def _fit(corpus, run_dir, steps, callbacks=(), **extra):
    cfg = compose_run_config(tiny_overrides(corpus, run_dir, steps=steps, **extra))
    validate_config(cfg, dp_world_size=1)
    torch.manual_seed(0)
    trainer = Trainer(cfg, run_dir, single_process_context(), callbacks=list(callbacks))
    trainer.fit()
    return trainer


def _warnings(run_dir):
    return [ln for ln in (run_dir / "train.log").read_text().splitlines() if " warning: " in f" {ln}"]


def test_collapsed_routing_is_warned_once_and_a_healthy_run_is_not(corpus, tmp_path, capsys):
    steps = 7
    collapsed = tmp_path / "collapsed"
    _fit(corpus, collapsed, steps, [CollapseRouting()], **{"model.moe.bias_update_speed": 0.0})
    records = read_metrics(collapsed)
    # the imbalance the run logged is the one of a full collapse: 1 expert of 8 gets all T tokens, the mean
    # is top_k*T/8 (tiny model: 8 experts, top 2), so max/mean = 8/2
    assert all(abs(r["expert_imbalance_max"] - 8 / 2) < 1e-6 for r in records)
    warned = [ln for ln in _warnings(collapsed) if "routing collapsed" in ln]
    assert len(warned) == 1 and "[step 5/7] warning: routing collapsed" in warned[0], warned  # 5 steps in a row
    assert "warning: routing collapsed" in capsys.readouterr().out
    events = [r for r in read_metrics(collapsed, "event") if r["event"] == "routing_collapse"]
    assert [e["step"] for e in events] == [5]

    # (the tiny test run at its usual lr 3e-3 does collapse by step 5: imbalance 4.00; a small lr keeps the
    # router near its balanced initialisation)
    healthy = tmp_path / "healthy"
    _fit(corpus, healthy, steps, **{"optim.lr": 1e-5})
    assert max(r["expert_imbalance_max"] for r in read_metrics(healthy)) < 0.9 * 8 / 2
    assert not [ln for ln in _warnings(healthy) if "routing" in ln]


def test_a_model_vocabulary_larger_than_the_tokenizer_is_warned_and_samples_stay_decodable(corpus, tmp_path):
    run_dir = tmp_path / "big_vocab"  # tiny model: vocab 1024; byte tokenizer: 258 ids
    _fit(corpus, run_dir, 2, **{"trainer.sample_every": 1, "trainer.sample_tokens": 24})
    [warned] = [ln for ln in _warnings(run_dir) if "vocab" in ln]
    assert "model.vocab_size=1024" in warned and "(258)" in warned and "model.vocab_size=258" in warned
    [event] = [r for r in read_metrics(run_dir, "event") if r["event"] == "vocab_mismatch"]
    assert "258" in event["message"]

    exact = tmp_path / "exact_vocab"
    _fit(corpus, exact, 2, **{"model.vocab_size": 258})
    assert not _warnings(exact)


def test_the_sampler_never_picks_an_id_the_tokenizer_cannot_decode():
    class Favours1000(torch.nn.Module):  # logits over 1024 ids, id 1000 always the largest
        def forward(self, x):
            logits = torch.zeros(*x.shape, 1024)
            logits[..., 1000] = 50.0
            logits[..., 65] = 10.0  # "A": the best id the tokenizer knows
            return logits

    class Bytes:
        vocab_size, eos_id = 258, 257

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            assert all(0 <= i < 256 for i in ids), ids
            return bytes(ids).decode()

    assert metrics.generate(Favours1000(), Bytes(), "x", 3, 0.0, "cpu") == "AAA"
    assert set(metrics.generate(Favours1000(), Bytes(), "x", 3, 1.0, "cpu")) <= set(map(chr, range(256)))


class FailAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, info):
        if info.step == self.step:
            raise ValueError(f"boom at step {info.step}")


def test_a_failing_rank_writes_its_traceback_to_logs_rank_k(corpus, tmp_path):
    run_dir = tmp_path / "fails"
    with pytest.raises(ValueError, match="boom at step 2"):
        _fit(corpus, run_dir, 3, [FailAt(2)])
    text = (run_dir / "logs" / "rank0.log").read_text()
    assert "rank 0 (pid " in text and "Traceback (most recent call last)" in text
    assert "in on_step_end" in text and "ValueError: boom at step 2" in text
    assert sorted(p.name for p in (run_dir / "logs").iterdir()) == ["rank0.log"]


def test_a_run_that_ends_normally_or_on_bad_input_writes_no_rank_log(corpus, tmp_path):
    run_dir = tmp_path / "ok"
    _fit(corpus, run_dir, 2)
    assert not (run_dir / "logs").exists()
    # bad input found inside the loop (resuming with another model config): one error line, no traceback file
    with pytest.raises(ConfigError, match="model.hidden_size"):
        _fit(corpus, run_dir, 3, **{"model.hidden_size": 64})
    assert not (run_dir / "logs").exists()


def test_a_rank_failing_while_the_trainer_is_built_writes_its_traceback(corpus, tmp_path, monkeypatch):
    import attnres_train.train.trainer as trainer_module

    def broken(*args, **kwargs):
        raise RuntimeError("cannot build this model here")

    monkeypatch.setattr(trainer_module, "build_train_module", broken)
    run_dir = tmp_path / "fails_early"
    with pytest.raises(RuntimeError, match="cannot build"):
        _fit(corpus, run_dir, 2)
    text = (run_dir / "logs" / "rank0.log").read_text()
    assert "in broken" in text and "RuntimeError: cannot build this model here" in text

"""``attnres-eval`` and the public loader (issue 14 item 1).

What is proven here, on a tiny run trained 3 steps with two ``data.val_sources`` and full validation:
* the trainer logs each val source (``val/<name>/loss``, ``/tokens``) and the token-weighted ``val_loss``;
* ``attnres-eval RUN_DIR`` reports the same losses (same samples, same token weighting);
* its loss and bits per byte equal a plain computation from the text files (own packing, own cross entropy in
  fp64, bytes counted from the files), in full and for the first K batches;
* bits per byte of a byte-level BPE counts exactly the UTF-8 bytes of the text; other tokenizers get none;
* bad input: one ``error:`` line, exit 2;
* (slow) a checkpoint saved by FSDP2 x EP2 on 2 ranks loads into one process with the ranks' parameters, and
  that run's 2-rank validation loss is attnres-eval's on the same samples.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import attnres_train
from attnres_train.analysis import loading
from attnres_train.cli import eval as eval_cli
from attnres_train.cli.train import run as train_run
from attnres_train.data.token_bytes import token_byte_lengths
from attnres_train.data.tokenizer import HFTokenizer, load_tokenizer, train_bpe_tokenizer
from tests.distributed import run_distributed
from tests.train.conftest import read_metrics, tiny_overrides, write_corpus

SEQ = 64
EOS = 256


def val_overrides(root: Path, run_dir: Path, steps: int = 3) -> list:
    valid = root / "valid"
    return tiny_overrides(
        root / "train",
        run_dir,
        steps=steps,
        **{
            "data.val_sources": f"[{{path: '{valid}'}}, {{path: '{valid / 'doc_001.txt'}', name: one}}]",
            "trainer.val_every": steps,
            "trainer.val_batches": "null",
        },
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    write_corpus(root / "train", docs=20)
    write_corpus(root / "valid", docs=4, seed=3)
    run_dir = root / "run"
    train_run(val_overrides(root, run_dir))
    return root, run_dir


def samples_of(files) -> np.ndarray:
    """The byte tokenizer's packing, written out: file bytes + EOS per document, cut into seq_len + 1 windows."""
    ids = []
    for f in files:
        ids += list(Path(f).read_bytes()) + [EOS]
    s = np.array(ids, dtype=np.int64)
    return np.stack([s[k * SEQ : k * SEQ + SEQ + 1] for k in range((s.size - 1) // SEQ)])


def plain_nats_and_bytes(model, samples: np.ndarray):
    """Summed cross entropy (fp64, from the logits) of every target, and the bytes of the targets (not EOS)."""
    batch = torch.from_numpy(samples)
    with torch.no_grad():
        logits = model(batch[:, :-1]).double()
    logp = torch.log_softmax(logits, dim=-1)
    targets = batch[:, 1:]
    nats = -logp.gather(-1, targets[..., None]).sum().item()
    return nats, int((targets < 256).sum()), targets.numel()


def run_cli(argv, capsys):
    rc = eval_cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_trainer_logs_each_val_source_and_the_weighted_aggregate(trained):
    root, run_dir = trained
    (rec,) = read_metrics(run_dir, "val")
    n_valid = samples_of(sorted((root / "valid").glob("*.txt"))).shape[0] * SEQ
    n_one = samples_of([root / "valid" / "doc_001.txt"]).shape[0] * SEQ
    assert rec["val/valid/tokens"] == n_valid and rec["val/one/tokens"] == n_one
    mean = (rec["val/valid/loss"] * n_valid + rec["val/one/loss"] * n_one) / (n_valid + n_one)
    assert rec["val_loss"] == pytest.approx(mean, rel=1e-12)
    assert rec["val/valid/loss"] != pytest.approx(rec["val/one/loss"], abs=1e-6)  # two distinct numbers


def test_eval_equals_the_trainers_validation(trained, tmp_path, capsys):
    _, run_dir = trained
    rc, out, err = run_cli([run_dir, "--out", tmp_path / "e.json"], capsys)
    assert rc == 0, err
    assert "bits/byte" in out and "all" in out
    doc = json.loads((tmp_path / "e.json").read_text())
    (rec,) = read_metrics(run_dir, "val")
    assert doc["step"] == 3 and doc["checkpoint"].endswith("step_00000003")
    for s in doc["sources"]:
        assert s["tokens"] == rec[f"val/{s['name']}/tokens"]
        assert s["loss"] == pytest.approx(rec[f"val/{s['name']}/loss"], abs=2e-5), s["name"]
    assert doc["all"]["loss"] == pytest.approx(rec["val_loss"], abs=2e-5)
    print(f"attnres-eval {doc['all']['loss']:.6f} vs trainer val_loss {rec['val_loss']:.6f}")


def test_loss_and_bits_per_byte_against_a_plain_computation(trained, tmp_path, capsys):
    root, run_dir = trained
    model = loading.load_run_model(run_dir).model
    samples = samples_of(sorted((root / "valid").glob("*.txt")))
    for extra, rows in (([], samples.shape[0]), (["--batches", "2", "--batch-size", "3"], 6)):
        rc, _, err = run_cli([run_dir, "--source", root / "valid", "--out", tmp_path / "s.json", *extra], capsys)
        assert rc == 0, err
        (got,) = json.loads((tmp_path / "s.json").read_text())["sources"]
        nats, nbytes, ntok = plain_nats_and_bytes(model, samples[:rows])
        assert got["tokens"] == ntok and got["bytes"] == nbytes
        assert got["loss"] == pytest.approx(nats / ntok, rel=1e-5)
        assert got["bits_per_byte"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-5)


def test_byte_level_bpe_counts_the_texts_bytes(tmp_path):
    texts = ["héllo wörld — ✓ café\n", "def f(x):\n    return x + 1\n", "日本語 and emoji 🎉", "plain ascii text"] * 10
    tok = train_bpe_tokenizer(iter(texts), 300, str(tmp_path / "bpe"))
    table = token_byte_lengths(tok)
    for text in texts[:4] + ["unseen ÿ 🎉 words"]:
        assert int(table[tok.encode(text)].sum()) == len(text.encode("utf-8")), text
    assert table[tok.eos_id] == 0

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1, "</s>": 2}, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=word, eos_token="</s>")
    assert token_byte_lengths(HFTokenizer(fast, "word")) is None  # decoding is not a concatenation of bytes
    assert token_byte_lengths(load_tokenizer("byte")).tolist() == [1] * 256 + [0, 0]


def test_bad_input(trained, tmp_path, capsys):
    root, run_dir = trained
    for argv, text in (
        ([tmp_path / "nope"], "no such run directory"),
        ([run_dir, "--checkpoint", "step_99"], "step_00000099 does not exist"),
        ([run_dir, "--source", tmp_path / "missing.txt"], "data.val_sources[0].path"),
        ([run_dir, "--batches", "0"], "--batches must be >= 1"),
    ):
        rc, out, err = run_cli(argv, capsys)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and text in err, (argv, err)


def test_public_loader_at_package_level(trained):
    _, run_dir = trained
    assert attnres_train.load_run_model is loading.load_run_model
    model, path, meta = attnres_train.load_run_model(run_dir, "step_3")
    assert path.name == "step_00000003" and meta["step"] == 3 and not model.training


def _train_and_gather(overrides):
    """On every rank: train via the real Trainer (saving the final checkpoint), then gather full tensors."""
    import torch.distributed as dist

    from attnres_train.cli.init_run import compose_run_config
    from attnres_train.config.schema import validate_config
    from attnres_train.parallel.mesh import build_parallel_context
    from attnres_train.train.trainer import Trainer
    from tests.full_tensors import full_tensor

    cfg = compose_run_config(overrides)
    validate_config(cfg, dp_world_size=dist.get_world_size())
    trainer = Trainer(cfg, Path(cfg.run_dir), build_parallel_context(cfg.parallel, cfg.model, cfg.data.seq_len))
    trainer.fit()
    state = {n: full_tensor(p.detach()).clone() for n, p in trainer.model.named_parameters()}
    state.update(
        {n: full_tensor(b).clone() for n, b in trainer.model.named_buffers() if n.endswith("e_score_correction_bias")}
    )
    return state


@pytest.mark.slow
def test_a_two_rank_fsdp_ep_checkpoint_loads_into_one_process(trained, tmp_path, capsys):
    root, _ = trained
    run_dir = tmp_path / "run"
    overrides = val_overrides(root, run_dir, steps=2) + ["parallel.dp_shard=2", "parallel.ep=2"]
    ranks = run_distributed(_train_and_gather, 2, overrides, timeout=300)
    assert all(set(r) == set(ranks[0]) for r in ranks)
    model = attnres_train.load_run_model(run_dir).model
    loaded = dict(model.named_parameters()) | dict(model.named_buffers())
    assert set(ranks[0]) <= set(loaded)
    for name, value in ranks[0].items():
        assert torch.equal(loaded[name], value), name
    # validation on 2 data-parallel ranks: each source's samples but at most dp - 1 = 1 (the last global batch
    # is split evenly), i.e. its first 2K samples, which attnres-eval reads as K batches of 2
    (rec,) = read_metrics(run_dir, "val")
    full = samples_of(sorted((root / "valid").glob("*.txt"))).shape[0]
    n = rec["val/valid/tokens"] // SEQ
    assert n % 2 == 0 and full - 1 <= n <= full
    rc, _, err = run_cli([run_dir, "--source", root / "valid", "--batch-size", 2, "--batches", n // 2], capsys)
    assert rc == 0, err
    (got,) = json.loads((run_dir / "eval" / "step_00000002.json").read_text())["sources"]
    assert got["tokens"] == rec["val/valid/tokens"]
    assert got["loss"] == pytest.approx(rec["val/valid/loss"], abs=2e-5)

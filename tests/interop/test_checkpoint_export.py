"""Training checkpoints (any parallel layout) <-> Hugging Face: consolidation, export, and ``init-run`` import.

What is proven here:
* a training checkpoint is consolidated in one process, one decoder layer at a time, into HF safetensors whose
  model reproduces the checkpoint's logits (native KimiLinear for PreNorm, trust_remote_code for AttnRes);
* **Test 5 (slow):** a tiny model trained and checkpointed under a 2-rank layout (FSDP x EP with Block
  AttnRes; TP + SP with PreNorm; a 2-stage pipeline with Block AttnRes) exports to HF, loads in transformers (``trust_remote_code`` / native) with the
  logits of the trained model (gathered from the ranks with ``tests.full_tensors``, independent of DCP), and imports
  back bit-exactly;
* ``attnres-convert init-run`` writes a step-0 checkpoint that the trainer resumes under a 2-rank layout, with
  the imported weights (its first loss is the trained level, and its step-0 tensors equal the source's);
* bad input gives one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, KimiLinearForCausalLM  # noqa: E402

from attnres_train.checkpoint import CheckpointManager  # noqa: E402
from attnres_train.cli.convert import main as convert_main  # noqa: E402
from attnres_train.config.model import ModelConfig  # noqa: E402
from attnres_train.interop import export as export_mod  # noqa: E402
from attnres_train.interop import load_from_hf  # noqa: E402
from attnres_train.model import build_model  # noqa: E402
from tests import subproc  # noqa: E402
from tests.distributed import run_distributed  # noqa: E402
from tests.train.conftest import read_metrics, tiny_overrides, write_corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VOCAB = 1024


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(7))


def save_checkpoint(model, cfg: ModelConfig, root: Path, step: int = 3) -> Path:
    """A training-style checkpoint (model + an optimizer state the exporter must ignore) in one process."""
    from omegaconf import OmegaConf
    from torch.distributed.checkpoint.state_dict import get_state_dict

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model_sd, optim_sd = get_state_dict(model, [opt])
    text = OmegaConf.to_yaml(OmegaConf.create({"model": OmegaConf.to_container(OmegaConf.structured(cfg))}))
    return CheckpointManager(root, keep_last=0).save(
        step, {"model": model_sd, "optim": optim_sd}, config_text=text, meta={"tokens_seen": 0, "data": {}}
    )


def random_model(mode: str, seed: int = 0, **residual):
    cfg = ModelConfig()
    cfg.residual.mode = mode
    for k, v in residual.items():
        setattr(cfg.residual, k, v)
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.normal_(0.0, 0.5)
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0.0, 0.1)
    return model, cfg


def hf_logits(path: Path, ids, native: bool):
    if native:
        hf = KimiLinearForCausalLM.from_pretrained(path, experts_implementation="eager").eval()
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        return hf(ids).logits


# ------------------------------------------------------------------------------------ single process
@pytest.mark.parametrize("mode", ["block", "prenorm"])
def test_checkpoint_export_streams_layers(mode, tmp_path, ids, monkeypatch, capsys):
    model, cfg = random_model(mode, num_blocks=2) if mode == "block" else random_model(mode)
    step = save_checkpoint(model, cfg, tmp_path / "run" / "checkpoints")
    groups = []
    real_load = export_mod.CheckpointReader.load
    monkeypatch.setattr(
        export_mod.CheckpointReader, "load", lambda self, keys: groups.append(list(keys)) or real_load(self, keys)
    )
    out = tmp_path / "run" / "hf"  # inside the run dir is fine, just not inside the checkpoint
    assert convert_main(["to-hf", str(tmp_path / "run"), str(out), "--max-shard-size", "400KB"]) == 0
    assert str(step) in capsys.readouterr().out
    # One DCP read per decoder layer plus one for embedding/norm/head (+ output query); never the whole model.
    assert len(groups) == cfg.num_layers + 1
    assert all(k.startswith("model.layers.1.") for k in groups[2])
    assert (out / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        ref = model(ids)
    assert (hf_logits(out, ids, native=mode == "prenorm") - ref).abs().max().item() < 1e-4
    back, back_cfg = load_from_hf(out)
    assert back_cfg.residual.mode == mode
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


def test_checkpoint_export_bad_input(tmp_path, capsys):
    model, cfg = random_model("block", num_blocks=2)
    save_checkpoint(model, cfg, tmp_path / "ckpts")

    def fails(argv, text):
        capsys.readouterr()
        assert convert_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err and err.count("\n") == 1, err

    fails(["to-hf", str(tmp_path / "nothing"), str(tmp_path / "o1")], "does not exist")
    fails(["to-hf", str(tmp_path / "ckpts"), str(tmp_path / "o2"), "--format", "native"], "trust_remote_code")
    fails(["to-hf", str(tmp_path / "ckpts"), str(tmp_path / "o3"), "--max-shard-size", "lots"], "--max-shard-size")
    step = next((tmp_path / "ckpts").glob("step_*"))
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-8])
    fails(["to-hf", str(step), str(tmp_path / "o4")], "truncated")
    # A config.yaml that disagrees with the tensors (manifest check skipped): the tensor is named.
    step2 = save_checkpoint(model, cfg, tmp_path / "ckpts2")
    text = (step2 / "config.yaml").read_text().replace("hidden_size: 128", "hidden_size: 64")
    (step2 / "config.yaml").write_text(text)
    fails(["to-hf", str(step2), str(tmp_path / "o5"), "--no-verify"], "has shape")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))


def test_init_run_writes_a_resumable_step_zero(tmp_path, capsys):
    from omegaconf import OmegaConf

    from attnres_train.checkpoint import verify_checkpoint
    from attnres_train.checkpoint.safe_dcp import SafeFileSystemReader
    from attnres_train.interop import save_to_hf
    from attnres_train.interop.export import CheckpointReader, checkpoint_model_config

    model, cfg = random_model("prenorm", seed=2)
    save_to_hf(model, cfg, tmp_path / "hf")
    run = tmp_path / "run"
    assert (
        convert_main(
            [
                "init-run",
                str(tmp_path / "hf"),
                str(run),
                "--residual-mode",
                "block",
                "--num-blocks",
                "2",
                "optim.weight_decay=0.05",
                "parallel.tp=2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"'hydra.searchpath=[file://{run / 'configs'}]' model=imported run_dir={run}" in out
    step = run / "checkpoints" / "step_00000000"
    meta = verify_checkpoint(step)
    assert meta["step"] == 0 and meta["data"] == {"consumed_samples": 0} and meta["tokens_seen"] == 0
    saved = OmegaConf.create((step / "config.yaml").read_text())
    preset = OmegaConf.load(run / "configs" / "model" / "imported.yaml")
    assert saved.model == preset and saved.model.residual.mode == "block" and saved.optim.weight_decay == 0.05
    assert saved.parallel.tp == 1  # layout overrides are for the training run, not the layout-free checkpoint
    keys = SafeFileSystemReader(str(step)).read_metadata().state_dict_metadata
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg") for k in keys)
    sd = CheckpointReader(step, checkpoint_model_config(step)).state_dict()
    ref = model.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert sd["model.output_attn_res_proj.weight"].abs().sum() == 0  # zero queries: starts as PreNorm

    capsys.readouterr()
    assert convert_main(["init-run", str(tmp_path / "hf"), str(run)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert convert_main(["init-run", str(tmp_path / "hf"), str(tmp_path / "run2"), "optim.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "optim.nope" in err and err.count("\n") == 1


# -------------------------------------------------------------------------------- multi-rank (Test 5)
LAYOUTS = {
    "fsdp2_ep2_block": ["parallel.dp_shard=2", "parallel.ep=2"],
    "tp2_sp_prenorm": [
        "parallel.tp=2",
        "parallel.sp=true",
        "model.residual.mode=prenorm",
        "model.residual.num_blocks=null",
    ],
    "pp2_block": ["parallel.pp=2", "parallel.dp_shard=1"],
}


def _train_and_gather(overrides):
    """On every rank: train via the real Trainer, then gather the trained parameters/buffers to full tensors."""
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
    return state  # with pp each rank returns its own stages' tensors


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_round_trip_from_two_rank_layout(layout, corpus, tmp_path, ids):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(corpus, run_dir, steps=2) + LAYOUTS[layout]
    state = {}
    for part in run_distributed(_train_and_gather, 2, overrides, timeout=300):
        state.update(part)
    native = "prenorm" in layout
    from attnres_train.interop.export import checkpoint_model_config, resolve_checkpoint

    step = resolve_checkpoint(run_dir)
    assert step.name == "step_00000002"
    cfg = checkpoint_model_config(step)
    trained = build_model(cfg).eval()
    trained.load_state_dict(state, strict=True)  # every parameter and router bias, from the ranks that hold it
    with torch.no_grad():
        ref = trained(ids)

    out = tmp_path / "hf"
    assert convert_main(["to-hf", str(run_dir), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == (
        "kimi_linear" if native else "kimi_linear_attnres"
    )
    err = (hf_logits(out, ids, native) - ref).abs().max().item()
    print(f"{layout}: max |logits(HF export) - logits(trained ranks)| = {err:.2e}")
    assert err < 1e-4
    back, _ = load_from_hf(out)
    for k, v in back.state_dict().items():
        assert torch.equal(v, state[k] if k in state else trained.state_dict()[k]), k


@pytest.mark.slow
def test_init_run_resumes_in_a_two_rank_layout(corpus, tmp_path):
    from attnres_train.cli.train import run
    from attnres_train.interop.export import CheckpointReader, checkpoint_model_config, resolve_checkpoint

    source = tmp_path / "source"
    run(tiny_overrides(corpus, source, steps=12))
    hf = tmp_path / "hf"
    assert convert_main(["to-hf", str(source), str(hf)]) == 0

    target = tmp_path / "target"
    train_args = [o for o in tiny_overrides(corpus, target, steps=2) if not o.startswith(("model", "run_dir"))] + [
        "optim.weight_decay=0.05"
    ]
    assert convert_main(["init-run", str(hf), str(target), *train_args, "--preset", "mine"]) == 0
    step0 = resolve_checkpoint(target)
    assert step0.name == "step_00000000" and (target / "configs" / "model" / "mine.yaml").is_file()
    cfg = checkpoint_model_config(step0)
    imported = CheckpointReader(step0, cfg).state_dict()
    src_step = resolve_checkpoint(source)
    trained = CheckpointReader(src_step, checkpoint_model_config(src_step)).state_dict()
    assert set(imported) == set(trained) and all(torch.equal(imported[k], trained[k]) for k in trained)

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "attnres_train",
        f"hydra.searchpath=[file://{target / 'configs'}]",
        "model=mine",
        f"run_dir={target}",
        "parallel.dp_shard=2",
        *train_args,
    ]
    subproc.check(subproc.run(cmd, tmp_path, "torchrun-resume", cwd=REPO))
    events = read_metrics(target, "event")
    assert any(e.get("event") == "resumed" and e["path"].endswith("step_00000000") for e in events), events
    first, src = read_metrics(target)[0]["loss"], [r["loss"] for r in read_metrics(source)]
    print(f"source run loss {src[0]:.3f} -> {src[-1]:.3f}; imported run's first loss {first:.3f}")
    assert first < src[0] - 0.5 and abs(first - src[-1]) < 0.5, (first, src)

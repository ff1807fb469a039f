"""HF import without ever holding the whole model: lazy safetensors, one part at a time, each rank its shards.

* ``iter_hf_checkpoint`` + ``load_full_tensors`` into a meta-built, materialised model give exactly the tensors
  of the exported model; while they run, the raw HF tensors alive at once (tracked with weakrefs on everything
  the lazy reader hands out, so independent of the converter's own bookkeeping) never exceed two parts (the
  part being converted and the one being copied), well under half of the checkpoint;
* ``attnres-convert init-run`` under torchrun with ``parallel.pp=2 vpp=2`` (each rank loads only its stages)
  writes a step-0 checkpoint whose tensors equal the exported model's, read back in one process.
"""

from __future__ import annotations

import weakref

import torch

from attnres_train.interop import save_to_hf
from attnres_train.interop.hf_files import LazySafetensors
from attnres_train.model import build_model
from tests import subproc
from tests.interop.helpers import MODES, random_model
from tests.train.conftest import PY, REPO


def test_streamed_import_equals_the_export_and_holds_two_parts_at_most(tmp_path, monkeypatch):
    from attnres_train.interop.hf import iter_hf_checkpoint
    from attnres_train.parallel.init import load_full_tensors, materialize_and_init

    # 8 decoder layers, so one part (a layer, or embedding + head) is a small fraction of the checkpoint
    model, cfg = random_model({"mode": "block", "num_blocks": 4}, seed=4, num_layers=8, mla_layers=[3, 7])
    save_to_hf(model, cfg, tmp_path / "hf")
    alive, peak = [], {"bytes": 0}
    original = LazySafetensors.__getitem__

    def tracked(self, key):
        t = original(self, key)
        alive.append((weakref.ref(t), t.numel() * t.element_size()))
        peak["bytes"] = max(peak["bytes"], sum(n for r, n in alive if r() is not None))
        return t

    monkeypatch.setattr(LazySafetensors, "__getitem__", tracked)
    got_cfg, parts = iter_hf_checkpoint(tmp_path / "hf")
    mine = build_model(got_cfg, device="meta")
    materialize_and_init(mine, "cpu", got_cfg, seed=0)
    n = load_full_tensors(mine, parts, got_cfg)
    ref = model.state_dict()
    assert n == len([k for k in ref if k != "lm_head.weight" or not cfg.tie_word_embeddings])
    assert all(torch.equal(mine.state_dict()[k], v) for k, v in ref.items())
    total = sum(n for _, n in alive)  # every HF tensor was read exactly once
    files = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert total >= 0.9 * files
    # the parts, from the file's own key names: one per decoder layer, everything else in the first
    part_bytes = {}
    disk = LazySafetensors(sorted((tmp_path / "hf").glob("*.safetensors")))
    for key in disk:
        group = int(key.split(".")[2]) if key.startswith("model.layers.") else -1
        t = original(disk, key)
        part_bytes[group] = part_bytes.get(group, 0) + t.numel() * t.element_size()
    two_parts = sum(sorted(part_bytes.values())[-2:])
    print(f"peak raw HF bytes alive {peak['bytes']} of {total}; two largest parts {two_parts}")
    assert peak["bytes"] <= two_parts < 0.5 * total, (peak["bytes"], two_parts, total)


def test_init_run_under_torchrun_loads_each_ranks_stages(tmp_path):
    from attnres_train.interop.export import CheckpointReader, checkpoint_model_config

    model, cfg = random_model(MODES["block2"], seed=6)
    save_to_hf(model, cfg, tmp_path / "hf")
    run = tmp_path / "run"
    proc = subproc.check(
        subproc.run(
            [
                PY,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "attnres_train.cli.convert",
                "init-run",
                str(tmp_path / "hf"),
                str(run),
                "parallel.pp=2",
                "parallel.vpp=2",
                "trainer.micro_batch_size=1",
                "trainer.global_batch_size=4",
            ],
            tmp_path,
            "torchrun-init-run",
            cwd=REPO,
        )
    )
    assert proc.stdout.count("wrote ") == 1  # one report, from rank 0
    step = run / "checkpoints" / "step_00000000"
    assert len(list(step.glob("*.distcp"))) == 2  # each rank wrote its own stages
    sd = CheckpointReader(step, checkpoint_model_config(step)).state_dict()
    ref = model.state_dict()
    assert set(sd) >= set(ref) - {"lm_head.weight"}
    assert all(torch.equal(sd[k], v) for k, v in ref.items() if k in sd)

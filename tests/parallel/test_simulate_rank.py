"""``attnres-plan --simulate-rank``: one rank of a huge layout built for real in one CPU process.

The 48B preset on 1,024 ranks (pp4 vpp2 tp2+sp ep16 dp_replicate 8) — the run this framework exists for — is
constructed by the training path under a fake process group: rank 768 (pp rank 3, the most parameters) must hold
exactly the bytes ``attnres-plan`` predicts for parameters, gradients and AdamW state (within 10%, the acceptance
bound), and no tensor it ever materialised may come near the whole model. The plan's numbers come from its own
formulas (``plan_estimates``: parameter counts per layer type, divided by the degrees), not from the simulation.
A tiny layout checks the CLI end to end and that a rank outside the world is a clean error.
"""

from __future__ import annotations

import re

import pytest

from attnres_train.cli.plan import main


def _simulated(out: str) -> dict:
    rows = {}
    for key in ("parameters", "gradients", "optimizer"):
        m = re.search(rf"^{key}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
        assert m, (key, out[-800:])
        rows[key] = (float(m.group(1)), float(m.group(2)))
    m = re.search(r"largest tensor this rank materialised: ([\d.]+) GiB \(whole model: ([\d.]+) GiB\)", out)
    rows["largest"] = (float(m.group(1)), float(m.group(2)))
    return rows


def test_tiny_layout_simulates_and_rejects_a_rank_outside_the_world(capsys):
    args = [
        "--model",
        "tiny",
        "--pp",
        "2",
        "--vpp",
        "2",
        "--tp",
        "2",
        "--sp",
        "--ep",
        "2",
        "--dp-shard",
        "2",
        "--dp-replicate",
        "2",
        "--world-size",
        "16",
        "--seq-len",
        "64",
    ]
    assert main(args + ["--simulate-rank", "5"]) == 0
    out = capsys.readouterr().out
    assert "pipeline buffers held by the runtime (its bound for this schedule; not simulated)" in out
    rows = _simulated(out)
    for key in ("parameters", "gradients", "optimizer"):
        got, plan = rows[key]
        assert got > 0 and abs(got - plan) <= 0.1 * plan, (key, got, plan)
    assert main(args + ["--simulate-rank", "16"]) == 2
    assert "not a rank of a 16-rank world" in capsys.readouterr().err


@pytest.mark.slow
def test_48b_rank_on_1024_ranks_matches_the_plan(capsys):
    assert (
        main(
            [
                "--model",
                "kimi_linear_48b",
                "--pp",
                "4",
                "--vpp",
                "2",
                "--tp",
                "2",
                "--sp",
                "--ep",
                "16",
                "--dp-replicate",
                "8",
                "--world-size",
                "1024",
                "--microbatches",
                "8",
                "--simulate-rank",
                "768",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "simulated rank 768 of 1024 (pp rank 3" in out
    rows = _simulated(out)
    for key in ("parameters", "gradients", "optimizer"):
        got, plan = rows[key]
        assert abs(got - plan) <= 0.1 * plan, (key, got, plan)
    assert rows["parameters"][0] > 2.5  # ~0.8B fp32 parameters really allocated on this rank
    largest, whole = rows["largest"]
    assert whole > 150 and largest < 0.01 * whole, rows["largest"]

"""The trust_remote_code export generates our greedy text on every transformers release we claim to support.

transformers 5.24 renamed the decoding cache (``past_key_values`` -> ``cache``) and an export that followed only
the old name generated wrong tokens there while 5.23 was fine. So each release listed in
``launch/transformers-tested.txt`` (the oldest and newest of pyproject's range) loads an export in a fresh
interpreter and must reproduce, token for token, the greedy continuation computed here by our own model with
plain argmax loops. ``make setup`` installs the releases other than the locked one under
``<venv>/transformers-alt/<version>`` (pure Python, --no-deps); the child process puts that first on its path.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnres_train.interop import save_to_hf  # noqa: E402
from tests import subproc  # noqa: E402
from tests.interop.helpers import MODES, random_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TESTED = [
    v.strip()
    for v in (ROOT / "launch" / "transformers-tested.txt").read_text().splitlines()
    if v.strip() and not v.startswith("#")
]
LOCKED = next(
    line.split("==")[1]
    for line in (ROOT / "launch" / "constraints.txt").read_text().splitlines()
    if line.startswith("transformers==")
)
PROMPT_LEN, NEW = 8, 10

CHILD = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
want, path, prompt, new = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
assert transformers.__version__ == want, (transformers.__version__, want)
torch.manual_seed(0)
hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
gen = hf.generate(torch.tensor(prompt), max_new_tokens=new, do_sample=False)
print("RESULT " + json.dumps({"version": transformers.__version__, "tokens": gen.tolist()}))
"""


def greedy(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """Our model, no cache: append the argmax of the last position ``new`` times."""
    ids = prompt
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def alt_path(version: str) -> Path | None:
    if version == transformers.__version__:
        return None
    return Path(sys.prefix) / "transformers-alt" / version


def test_tested_range_matches_the_lock_and_pyproject():
    assert LOCKED == transformers.__version__, "the venv's transformers is not the locked one: run `make setup`"
    assert LOCKED in TESTED and len(TESTED) >= 2
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"transformers>={TESTED[0].rsplit(".", 1)[0]},' in pyproject  # the oldest tested is the range's floor


@pytest.mark.parametrize("version", TESTED)
@pytest.mark.parametrize("mode", ["block2", "full"])
def test_generate_equals_our_greedy(version, mode, tmp_path):
    alt = alt_path(version)
    if alt is not None and not (alt / "transformers" / "__init__.py").is_file():
        pytest.fail(f"transformers {version} is not installed at {alt}: run `make setup`")
    model, cfg = random_model(MODES[mode], seed=11)
    save_to_hf(model, cfg, tmp_path / "hf")
    prompt = torch.randint(0, cfg.vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(4))
    ref = greedy(model, prompt, NEW)
    env = subproc.child_env(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(alt) if alt else "", env.get("PYTHONPATH", "")) if p)
    proc = subproc.check(
        subproc.run(
            [sys.executable, "-c", CHILD, version, str(tmp_path / "hf"), json.dumps(prompt.tolist()), str(NEW)],
            tmp_path,
            f"generate-{version}",
            env=env,
            timeout=300,
        )
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert out["version"] == version
    assert out["tokens"] == ref.tolist(), f"transformers {version}: generate diverged from our greedy decoding"

"""The RNG state restored on resume is observable: after ``checkpoint.resume=auto`` the process's torch, numpy and
python RNG states equal the ones the interrupted run had when it saved.

The tiny model is dropout-free, so a global forward hook (torch's public ``register_module_forward_pre_hook``) draws
from all three generators on every forward: the training steps advance the states, as a model with randomness
would. Between the two launches the states are scrambled; the resumed launch runs no step (``stop_at`` = the saved
step), so what the process holds after it is what the resume restored. Only the public training entry point
(``cli.train.run``) is called.
"""

import random

import numpy as np
import torch

from attnres_train.cli.train import run

from .conftest import tiny_overrides

K = 2  # steps before the save


def _states():
    return torch.get_rng_state().clone(), random.getstate(), np.random.get_state()


def _assert_same(got, want, when):
    assert torch.equal(got[0], want[0]), f"{when}: torch CPU RNG state differs"
    assert got[1] == want[1], f"{when}: python random state differs"
    assert got[2][0] == want[2][0] and np.array_equal(got[2][1], want[2][1]) and got[2][2:] == want[2][2:], (
        f"{when}: numpy RNG state differs"
    )


def _draw(module, args):
    torch.rand(())
    random.random()
    np.random.rand()


def test_resume_restores_the_rng_states_the_run_saved_with(corpus, tmp_path):
    run_dir = tmp_path / "run"
    ov = tiny_overrides(corpus, run_dir, steps=2 * K, **{"trainer.stop_at": K})
    random.seed(1)
    np.random.seed(1)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(_draw)
    try:
        before = _states()
        run(ov)
    finally:
        handle.remove()
    saved = _states()  # the run's states after step K and its save (nothing draws after the save)
    assert not torch.equal(saved[0], before[0]) and saved[1] != before[1], "the steps drew no random numbers"

    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    run([*ov, "checkpoint.resume=auto"])
    _assert_same(_states(), saved, f"after resuming step {K}")

"""Suite-wide settings: one intra-op thread per test process (tiny tensors; the 2 cores go to xdist workers), and
a test-only cache for the CPU MFU peak probe (train/metrics.py), inherited by subprocesses: a run on a busy test
machine must not leave a low peak in the user's ~/.cache/attnres-train."""

import os
import tempfile

import torch

torch.set_num_threads(1)
os.environ.setdefault("ATTNRES_TRAIN_CACHE", os.path.join(tempfile.gettempdir(), "attnres-train-test-cache"))

"""Suite-wide settings: one intra-op thread per test process (tiny tensors; the 2 cores go to xdist workers)."""

import torch

torch.set_num_threads(1)

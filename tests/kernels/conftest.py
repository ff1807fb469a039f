"""Run the AttnRes Triton kernels on CPU through Triton's interpreter (or compiled, on a CUDA machine).

Why a package-scoped fixture instead of setting ``TRITON_INTERPRET`` for the whole session: whether a
``@triton.jit`` function is interpreted is decided when its module is imported, and triton also reads the
variable lazily while launching. The fixture sets ``TRITON_INTERPRET=1``, imports the kernel modules afresh
(their jitted functions become interpreted ones), hands them to this package's tests, and at package teardown
restores the variable and the previous ``sys.modules`` entries, so neither the variable nor interpreted
kernels leak into other tests (``attnres_kernels.interpreted()`` is False again outside this package).
triton itself need not be re-imported: the kernels use only triton builtins and their own jitted helpers
(no ``tl.sum``, which would be a GPU-jitted function when triton was imported without the variable).
Test modules here must not import ``attnres_kernels.attnres_ops`` at module level: they get it from ``kops``.
"""

from __future__ import annotations

import os
import sys

import attnres_kernels
import pytest
import torch

KERNEL_MODULES = ("attnres_kernels.attnres_ops", "attnres_kernels.attnres_triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="package")
def kops():
    """The ``attnres_kernels.attnres_ops`` module: interpreted on CPU, compiled on CUDA."""
    if not attnres_kernels.triton_importable():
        pytest.skip("triton is not installed (pip install triton; it is in the dev extra)")
    if DEVICE.type == "cuda":
        import attnres_kernels.attnres_ops as ops

        yield ops
        return
    saved = {name: sys.modules.pop(name) for name in KERNEL_MODULES if name in sys.modules}
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import attnres_kernels.attnres_ops as ops

        assert attnres_kernels.interpreted()
        yield ops
    finally:
        if prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = prev
        for name in KERNEL_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)

"""attnres_kernels: Triton kernels for Block AttnRes (phase 1, phase 2 merge, backward), each with a torch twin.

Installed under the name ``attnres_kernels`` because ``kernels`` collides with a PyPI package. The kernels
themselves arrive with the "fused kernels" issue; until then the model always uses the torch reference in
``attnres_train.model.depth`` and ``model.residual.impl=triton`` is rejected by the model builder.
"""

__all__: list = []

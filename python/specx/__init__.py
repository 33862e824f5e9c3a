"""specx: fused CUDA kernels for SpecKD / DeepKD distillation and FastEagle speculative decoding."""

import torch  # noqa: F401  (loads libtorch before the extension)

from specx import _C, ops  # noqa: F401  (registers torch.ops.specx.*, fake kernels, autograd)
from specx import decode, distill

__version__ = "0.1.0"

#: True when the compiled module carries the CUDA kernels.
cuda_built: bool = bool(_C.WITH_CUDA)

__all__ = ["cuda_built", "decode", "distill", "ops"]

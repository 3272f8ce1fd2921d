"""Fused ops, one file each: Triton kernels (CUDA, and CPU under TRITON_INTERPRET=1), a PyTorch
reference that is the CPU kernel, and the ``torch.ops.fastlora.*`` registration with its fake
kernel and autograd formula."""
from . import rms_norm  # noqa: F401

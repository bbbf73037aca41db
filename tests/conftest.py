"""Test configuration: Triton runs in its CPU interpreter unless a GPU is present.

``TRITON_INTERPRET`` must be set before anything imports triton, so it is set here, at collection.
On a CUDA machine the same tests run the real kernels on the GPU (see ``tests/helpers.DEVICES``).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.manual_seed(0)

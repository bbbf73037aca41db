"""pytest configuration of the benchmarks (``pytest benchmarks --benchmark-only``, i.e. ``make bench``).

CPU runs measure the torch path of the fused ops (never the Triton interpreter, which is a test tool
~500x slower than native) with one intra-op thread by default (``MTA_BENCH_THREADS``): several threads
spinning on a shared machine inflate timings tenfold. GPU cases skip themselves without CUDA.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import harness`, `import bench_*`

if not torch.cuda.is_available():
    torch.set_num_threads(int(os.environ.get("MTA_BENCH_THREADS", "1")))

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: the GPU numbers come from `bash benchmarks/gpu_check.sh` on a GPU machine",
)

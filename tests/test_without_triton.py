"""``import mta_kernels`` and the CPU path of every op work where Triton cannot be imported."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    sys.modules["triton"] = None  # any `import triton` now raises ImportError
    sys.modules["triton.language"] = None
    import torch
    import mta_kernels as mk
    from mta_kernels.ops import triton_installed
    assert not triton_installed()
    torch.manual_seed(0)
    B, T, D = 2, 7, 5
    hidden = torch.randn(B, T, D, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    sal = mk.token_saliency(hidden.detach(), mask)
    ranges = torch.tensor([[0, 2], [2, 5], [7, 9], [9, 13]], dtype=torch.int32)
    cu = torch.tensor([0, 2, 4], dtype=torch.int32)
    pooled = mk.span_pool(hidden.reshape(B * T, D), ranges, sal.reshape(-1))
    loss = mk.structural_loss(pooled, torch.randn(4, 3), cu)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad is not None and torch.isfinite(hidden.grad).all()
    try:
        with mk.use_backend("triton"):
            mk.span_pool(hidden.reshape(B * T, D), ranges)
    except RuntimeError as exc:
        assert "triton is not installed" in str(exc) or "needs triton" in str(exc), exc
    else:
        raise AssertionError("use_backend('triton') without triton must raise")
    print("ok", float(loss))
    """
)


def test_import_and_cpu_ops_without_triton():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok "), proc.stdout

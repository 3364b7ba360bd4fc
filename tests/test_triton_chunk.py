"""The candidate Triton kernels (benchmarks/triton_chunk.py) against dpo_llm.py's torch chunk path.

They are GPU kernels; on the CPU they run through Triton's interpreter (TRITON_INTERPRET=1, which must be set
before the kernels are defined, hence the subprocess), and compiled on a CUDA GPU where there is one. Skipped where
Triton is not installed (the CPU torch wheel of .ci/run does not bring it; `pip install triton` runs these)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CHECK = r"""
import sys, torch
import triton_chunk as tc
from dpo_llm import ChunkedLogprobs, FusedLinearLoss, dpo_losses

tc.BLOCK_V = 64  # several column blocks per row, the last one partial (V = 300)
torch.manual_seed(0)
torch.set_default_device(sys.argv[1])
n, d, v, chunk = 50, 16, 300, 16  # chunks that do not divide n
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    h0, w0 = torch.randn(n, d) * 2, torch.randn(v, d)
    targets = torch.randint(0, v, (n,))
    targets[[3, 17]] = -100  # ignore_index rows score 0 and get no gradient
    upstream = torch.randn(n)
    rows = torch.arange(n) // 5  # 10 rows of 5 tokens: 5 DPO pairs
    ref = torch.randn(10) - 20

    def pair_loss(x, a, b):
        return dpo_losses(x[0::2], x[1::2], ref[a:b:2], ref[a + 1:b:2], 0.1, "sigmoid", 0.0)[0].sum()

    def token(fn):
        h, w = h0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        logps = fn.apply(h, w, targets, chunk)
        (logps * upstream).sum().backward()
        return [logps.detach(), h.grad.float(), w.grad.float()]

    def fused(fn):
        h, w = h0.to(dtype).requires_grad_(), w0.to(dtype).requires_grad_()
        loss, row_logps = fn.apply(h, w, targets.clamp(min=0), rows, 10, 2, chunk, pair_loss)
        loss.backward()
        return [loss.detach(), row_logps, h.grad.float(), w.grad.float()]

    for name, ours, oracle in (("token", token(tc.TritonChunkedLogprobs), token(ChunkedLogprobs)),
                               ("fused", fused(tc.TritonFusedLinearLoss), fused(FusedLinearLoss))):
        for a, b in zip(ours, oracle):
            err = ((a - b).norm() / b.norm().clamp(min=1e-6)).item()
            assert err < tol, (name, dtype, err)
    assert (token(tc.TritonChunkedLogprobs)[0][[3, 17]] == 0).all()
print("ok")
"""


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU"))])
def test_triton_kernels_match_torch_chunk_path(device):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "benchmarks")])}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", CHECK, device], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr

"""Candidate Triton kernels for the per-chunk work of dpo_llm.py's fused log-prob losses (GPU only).

dpo_llm.py scores each (chunk, V) block of logits with a handful of torch ops: a bf16 -> fp32 copy, amax,
sub_, exp_, sum, div_ (softmax), gather, then mul_, a scatter-add and an fp32 -> bf16 copy for the gradient.
On a GPU those are ~10 full passes over the block, and the matmuls around them are fast, so the passes can
dominate. Here the same work is two kernels over the block in its own dtype:

  _lse_kernel   one read:         per row, log-sum-exp (online max and sum, fp32) and the target's logit;
  _grad_kernel  one read + write: in place, logits -> g * (onehot(y) - exp(z - lse)), the gradient w.r.t. z.

Between the two, the loss's gradient per row (g) is computed on tiny tensors, exactly as in dpo_llm.py.
TritonFusedLinearLoss / TritonChunkedLogprobs mirror dpo_llm.FusedLinearLoss / ChunkedLogprobs step by step
with these kernels in place of the torch ops, so benchmarks/bench_logprob.py --triton can time them side by
side. They move into the scripts only where that GPU benchmark shows they beat the torch chunk path; the torch
path stays the CPU path and the tests' oracle (tests/test_triton_chunk.py checks these against it, on the CPU
through Triton's interpreter: TRITON_INTERPRET=1).
"""

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dpo_llm import _accumulate_, _chunk_plan, _logits_buffer  # noqa: E402

BLOCK_V = 2048  # columns per step; a row of V=50304 is 25 steps, all in registers, fp32 math


@triton.jit
def _lse_kernel(logits_ptr, stride, targets_ptr, lse_ptr, target_logit_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    peak = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_peak = tl.maximum(peak, tl.max(z, 0))
        total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(z - new_peak), 0)  # rescale the running sum
        peak = new_peak
    tl.store(lse_ptr + row, peak + tl.log(total))
    tl.store(target_logit_ptr + row, tl.load(base + tl.load(targets_ptr + row)).to(tl.float32))


@triton.jit
def _grad_kernel(logits_ptr, stride, targets_ptr, lse_ptr, g_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * stride
    lse, g, target = tl.load(lse_ptr + row), tl.load(g_ptr + row), tl.load(targets_ptr + row)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < V
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = g * (tl.where(cols == target, 1.0, 0.0) - tl.exp(z - lse))
        tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def lse_and_target_logit(logits, targets):
    rows, v = logits.shape
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    target_logit = torch.empty_like(lse)
    _lse_kernel[(rows,)](logits, logits.stride(0), targets, lse, target_logit, v, BLOCK=BLOCK_V)
    return lse, target_logit


def grad_logits_(logits, targets, lse, g):
    """In place: logits -> dL/dz for dL/dlog p(y) = g per row (same dtype as the logits)."""
    rows, v = logits.shape
    _grad_kernel[(rows,)](logits, logits.stride(0), targets, lse.contiguous(), g.float().contiguous(), v, BLOCK=BLOCK_V)
    return logits


def _chunk(hidden, weight, start, end, buffer):
    return torch.mm(hidden[start:end], weight.t(), out=buffer[: end - start])  # stays in the hidden dtype


class TritonChunkedLogprobs(torch.autograd.Function):
    """dpo_llm.ChunkedLogprobs with the per-chunk softmax work in the two kernels."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int, ignore_index: int = -100):
        weight = weight.to(hidden.dtype)
        valid = targets != ignore_index
        safe_targets = targets.masked_fill(~valid, 0)
        logps = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.zeros_like(logps)
        buffer = _logits_buffer(hidden, weight, chunk_size)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            lse[start:end], target_logit = lse_and_target_logit(_chunk(hidden, weight, start, end, buffer),
                                                                 safe_targets[start:end])
            logps[start:end] = target_logit - lse[start:end]
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse)
        ctx.chunk_size = chunk_size
        return logps.masked_fill(~valid, 0.0)

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, targets, valid, lse = ctx.saved_tensors
        grad_logps = grad_logps.float().masked_fill(~valid, 0.0)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        buffer = _logits_buffer(hidden, weight, ctx.chunk_size)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, hidden.shape[0])
            grad_logits = grad_logits_(_chunk(hidden, weight, start, end, buffer), targets[start:end],
                                       lse[start:end], grad_logps[start:end])
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            _accumulate_(grad_weight, grad_logits, hidden[start:end])
        return grad_hidden, grad_weight, None, None, None


class TritonFusedLinearLoss(torch.autograd.Function):
    """dpo_llm.FusedLinearLoss (same arguments and chunk plan) with the per-chunk work in the two kernels."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, num_rows: int, rows_per_group: int, chunk_size: int, loss_fn):
        cast_weight = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        row_logps = torch.zeros(num_rows, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        plan = _chunk_plan(rows, rows_per_group, chunk_size)
        buffer = _logits_buffer(hidden, weight, max(end - start for start, end, _, _ in plan))
        for start, end, first_row, end_row in plan:
            local_rows = rows[start:end] - first_row
            logits = _chunk(hidden, cast_weight, start, end, buffer)
            lse, target_logit = lse_and_target_logit(logits, targets[start:end])
            chunk_rows = torch.zeros(end_row - first_row, dtype=torch.float32, device=hidden.device)
            chunk_rows.index_add_(0, local_rows, target_logit - lse)
            row_logps[first_row:end_row] = chunk_rows
            with torch.enable_grad():
                x = chunk_rows.detach().requires_grad_()
                chunk_loss = loss_fn(x, first_row, end_row)
                (grad_rows,) = torch.autograd.grad(chunk_loss, x)
            loss += chunk_loss.detach()
            grad_logits = grad_logits_(logits, targets[start:end], lse, grad_rows[local_rows])
            torch.mm(grad_logits, cast_weight, out=grad_hidden[start:end])
            _accumulate_(grad_weight, grad_logits, hidden[start:end])
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(row_logps)
        return loss, row_logps

    @staticmethod
    def backward(ctx, grad_loss, _unused):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss), None, None, None, None, None, None

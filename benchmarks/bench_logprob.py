"""Fused chunked LM-head log-probs vs the naive path: peak memory and time of forward+backward, side by side.

The naive path materialises logits (N, V), their log-softmax and both gradients; ours (dpo_llm.py, rlhf_llm.py)
keeps one (chunk, V) block alive. Three comparisons, each ours vs its naive twin on the same inputs:
  dpo   - DPO loss over 16 pairs (32 rows x 128 response tokens) with precomputed reference log-probs:
          naive log_softmax+gather vs fused_linear_loss (gradients computed inside the forward);
  sft   - token-mean cross-entropy: F.cross_entropy on full logits vs fused_linear_loss;
  entropy - per-token log-probs and entropies, arbitrary upstream gradients on both (PPO's policy loss):
          naive vs rlhf_llm.ChunkedLogprobsEntropy (logits recomputed chunk by chunk in the backward).
Ours runs the torch chunk path (--logprob_kernel torch); --triton adds the scripts' Triton kernels (GPU;
--logprob_kernel triton) as a third path per loss.
CPU: each measurement runs in a fresh subprocess; peak memory = growth of the process's max RSS during the first
forward+backward (inputs and imports excluded). CUDA: the allocator's peak can be reset, so one subprocess per round
measures a family of paths (torch paths, then Triton paths apart, so a faulting kernel cannot take the torch rows
with it); each path runs once to warm up (cuBLAS workspaces, Triton compilation), then peak memory = growth of
torch.cuda.max_memory_allocated over one more forward+backward. Time = median of the following repeats.

    python benchmarks/bench_logprob.py                      # V=50304, D=512, N=4096, fp32, CPU
    python benchmarks/bench_logprob.py --device cuda --dtype bfloat16   # GPU (peak from torch.cuda)
    python benchmarks/bench_logprob.py --device cuda --dtype bfloat16 --triton
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo_llm  # noqa: E402
import rlhf_llm  # noqa: E402
from dpo_llm import dpo_loss, fused_linear_loss, sft_loss  # noqa: E402
from rlhf_llm import ChunkedLogprobsEntropy  # noqa: E402

PAIRS, ROW_TOKENS, BETA = 16, 128, 0.1


def make_inputs(n, d, v, dtype, device):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) * d ** -0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    rows = torch.arange(n, device=device) // (n // (2 * PAIRS))  # 2*PAIRS rows of equal length, [c0, r0, c1, ...]
    ref = torch.randn(2 * PAIRS, generator=g).to(device) * 5 - 300
    upstream = torch.randn(n, 2, generator=g).to(device)  # d loss / d log p and d loss / d entropy per token
    return hidden, weight, targets, rows, ref, upstream


def naive_token_logps(hidden, weight, targets):
    return torch.log_softmax((hidden @ weight.t()).float(), -1).gather(1, targets[:, None]).squeeze(1)


def naive_token_logps_entropy(hidden, weight, targets):
    log_probs = torch.log_softmax((hidden @ weight.t()).float(), -1)
    return log_probs.gather(1, targets[:, None]).squeeze(1), -(log_probs.exp() * log_probs).sum(-1)


def run_variant(name, chunk, hidden, weight, targets, rows, ref, upstream):
    """One forward+backward; returns nothing (gradients land in .grad)."""
    n = hidden.shape[0]
    # a Triton row runs the same class as our torch row of its kind, with the scripts' Triton kernels
    dpo_llm.LOGPROB_KERNEL = rlhf_llm.LOGPROB_KERNEL = "triton" if name.startswith("triton-") else "torch"
    name = {"triton-dpo": "fused-dpo", "triton-sft": "fused-sft", "triton-entropy": "chunked-entropy"}.get(name, name)

    if name == "naive-dpo":
        per_row = torch.zeros(2 * PAIRS, device=hidden.device).index_add(0, rows, naive_token_logps(hidden, weight, targets))
        loss = dpo_loss(per_row, ref, BETA)[0].sum() / PAIRS
    elif name == "fused-dpo":
        loss, _, _ = fused_linear_loss(partial(dpo_loss, beta=BETA), hidden, weight, targets, rows, ref, group_size=2,
                                       scale=1 / PAIRS, chunk_size=chunk)
    elif name == "naive-sft":
        loss = F.cross_entropy((hidden @ weight.t()).float(), targets)
    elif name == "fused-sft":
        loss, _, _ = fused_linear_loss(sft_loss, hidden, weight, targets, torch.arange(n, device=hidden.device), scale=1 / n,
                                       chunk_size=chunk)
    elif name in ("naive-entropy", "chunked-entropy"):
        chunked = name == "chunked-entropy"
        logps, entropy = (ChunkedLogprobsEntropy.apply(hidden, weight, targets, chunk) if chunked
                          else naive_token_logps_entropy(hidden, weight, targets))
        loss = (logps * upstream[:, 0] + entropy * upstream[:, 1]).sum()
    else:
        raise ValueError(name)
    loss.backward()


def measure(job, chunk, inputs, repeats, device):
    """Peak extra memory (MB) and median time (s) of one path's forward+backward."""
    def clear_grads():
        for t in inputs[:2]:
            t.grad = None

    if device.type == "cuda":
        run_variant(job, chunk, *inputs)  # warm-up, not measured: one-time workspaces and kernel compilation
        clear_grads()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_variant(job, chunk, *inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    times = []
    for _ in range(repeats):
        clear_grads()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_variant(job, chunk, *inputs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    clear_grads()
    return {"peak_mb": peak_mb, "time_s": statistics.median(times)}


def worker(a):
    """Measure the given paths (name:chunk, comma-separated) in this process; one JSON line per path."""
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    inputs = make_inputs(a.tokens, a.hidden, a.vocab, dtype, device)
    for spec in a.worker.split(","):
        name, chunk = spec.split(":")
        try:
            result = measure(name, int(chunk), inputs, a.repeats, device)
        except Exception as e:  # e.g. a kernel that does not compile: report it, measure the rest
            result = {"error": f"{type(e).__name__}: {e}"[:200]}
        print(json.dumps({"job": spec, **result}), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="all variants are measured once per round, interleaved")
    p.add_argument("--kinds", nargs="+", default=["dpo", "sft", "entropy"], choices=["dpo", "sft", "entropy"])
    p.add_argument("--triton", action="store_true", help="also time the scripts' Triton kernels (--logprob_kernel triton)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    jobs = []
    for kind in a.kinds:
        ours = f"chunked-{kind}" if kind == "entropy" else f"fused-{kind}"
        jobs.append((kind, f"naive-{kind}", 0))
        jobs += [(kind, ours, c) for c in a.chunks]
        if a.triton:
            jobs += [(kind, f"triton-{kind}", c) for c in a.chunks]
    results = {job: [] for job in jobs}
    failures = {}
    common = ["--vocab", a.vocab, "--hidden", a.hidden, "--tokens", a.tokens, "--dtype", a.dtype, "--device", a.device,
              "--threads", a.threads, "--repeats", a.repeats]
    # a CPU process's max RSS cannot be reset, so each CPU path gets its own process; see the module docstring
    if a.device.startswith("cuda"):
        groups = [[job for job in jobs if job[1].startswith("triton-") == triton] for triton in (False, True)]
    else:
        groups = [[job] for job in jobs]
    for done in range(1, a.rounds + 1):
        for group in filter(None, groups):
            specs = ",".join(f"{name}:{chunk}" for _, name, chunk in group)
            cmd = [sys.executable, __file__, "--worker", specs, *common]
            proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
            measured = {}
            for line in proc.stdout.splitlines():
                if line.startswith("{"):
                    record = json.loads(line)
                    measured[record.pop("job")] = record
            for job in group:
                record = measured.get(f"{job[1]}:{job[2]}")
                if record and "error" not in record:
                    results[job].append(record)
                else:  # one broken path must not cost the other rows
                    failures[job] = record["error"] if record else \
                        (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]
        # written after every round, so a run cut short by a time limit still leaves the rounds it finished
        write_table(a, jobs, results, failures, done)


def write_table(a, jobs, results, failures, rounds_done):
    def med(job, key):
        return statistics.median(r[key] for r in results[job])

    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    lines = [
        f"Command: `python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}`".rstrip(),
        f"Machine: {platform.machine()} {os.cpu_count()} CPUs ({device_name}, {a.threads} threads), torch {torch.__version__}, "
        f"python {platform.python_version()}; V={a.vocab}, D={a.hidden}, N={a.tokens}, {a.dtype}; "
        f"median of {rounds_done} rounds x {a.repeats} repeats" + (f" (of {a.rounds} asked)" if rounds_done < a.rounds else ""),
        "",
        "| loss | path | chunk | peak extra memory (MB) | time (s) | memory ratio | time ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for job in jobs:
        kind, name, chunk = job
        naive = (kind, f"naive-{kind}", 0)
        if not results[job] or not results[naive]:
            lines.append(f"| {kind} | {name} | {chunk or '-'} | failed: {failures.get(job) or failures.get(naive)} | | | |")
            continue
        lines.append(f"| {kind} | {name} | {chunk or '-'} | {med(job, 'peak_mb'):.0f} | {med(job, 'time_s'):.3f} | "
                     f"{med(job, 'peak_mb') / med(naive, 'peak_mb'):.2f}x | {med(job, 'time_s') / med(naive, 'time_s'):.2f}x |")
    table = "\n".join(lines)
    print(table, flush=True)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(table + "\n")

if __name__ == "__main__":
    main()

"""One whole DPO training step of dpo_llm.py on a GPU, its LM-head log-probs three ways, side by side.

  naive  - the LM head as a linear layer under autocast, then log_softmax over all (tokens, V) logits in fp32
           and a gather (what TRL and a plain PyTorch loop do);
  torch  - dpo_llm.fused_linear_loss with the torch chunk path (--logprob_kernel torch);
  triton - dpo_llm.fused_linear_loss with the Triton kernels (--logprob_kernel triton; auto picks them on a GPU).

Everything else is dpo_llm.py's own step: random-init GPTNeoX models with Pythia-160m/410m shapes and vocabulary,
bf16 autocast with fp32 master weights, the shared-prompt forward (pair_scored_tokens), the DPO loss, backward and
an AdamW step; random token pairs of about --prompt + 2 x --response tokens. One process; the paths alternate
over rounds, each measured after a warm-up step: time = median seconds per step, peak = growth of
torch.cuda.max_memory_allocated over a step (activations, logits, gradients; the weights and AdamW's state excluded).

    python benchmarks/bench_dpo_step.py                               # a CUDA GPU, both shapes
    python benchmarks/bench_dpo_step.py --device cpu --shapes tiny --pairs 2 --steps 1 --rounds 1 --paths naive torch  # smoke
"""

import argparse
import os
import platform
import statistics
import sys
import time
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import dpo_llm  # noqa: E402

# name: (hidden, layers, heads, intermediate)
SHAPES = {"tiny": (64, 2, 4, 256), "pythia160m": (768, 12, 12, 3072), "pythia410m": (1024, 24, 16, 4096)}
VOCAB, BETA = 50304, 0.1


def build(shape, device):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    hidden, layers, heads, intermediate = SHAPES[shape]
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=intermediate, rotary_pct=0.25, max_position_embeddings=2048,
                           hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTNeoXForCausalLM(config).to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-6)


def batches(a, count, device):
    g = torch.Generator().manual_seed(1)

    def tokens(mean):  # lengths mean +- mean/8, so that rows are padded as in real batches
        spread = max(mean // 8, 1)
        return torch.randint(2, VOCAB, (mean + int(torch.randint(-spread, spread + 1, (1,), generator=g)),), generator=g).tolist()

    return [[t.to(device) for t in dpo_llm.pair_batch([(tokens(a.prompt), tokens(a.response), tokens(a.response))
                                                       for _ in range(a.pairs)], 1)] for _ in range(count)]


def step(model, optimizer, batch, path, a, autocast):
    weight = model.get_output_embeddings().weight
    ref = torch.zeros(2 * a.pairs, device=weight.device)  # precomputed reference log-probs: values do not change the cost
    with autocast:
        hidden, targets, rows = dpo_llm.pair_scored_tokens(model, *batch)
        if path == "naive":
            logits = model.get_output_embeddings()(hidden)
    if path == "naive":
        token_logps = torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)
        logps = torch.zeros(2 * a.pairs, device=hidden.device).index_add(0, rows, token_logps)
        loss = dpo_llm.dpo_loss(logps, ref, BETA)[0].sum() / a.pairs
    else:
        dpo_llm.LOGPROB_KERNEL = path
        loss, _, _ = dpo_llm.fused_linear_loss(partial(dpo_llm.dpo_loss, beta=BETA), hidden, weight, targets, rows, ref,
                                               group_size=2, scale=1 / a.pairs, chunk_size=a.chunk)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return len(targets)


def measure(model, optimizer, data, path, a, autocast, cuda):
    step(model, optimizer, data[0], path, a, autocast)  # warm-up: kernels compile, AdamW allocates its state
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, scored = [], 0
    for batch in data[1:]:
        started = time.perf_counter()
        scored += step(model, optimizer, batch, path, a, autocast)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
    return statistics.median(times), scored / len(times), peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=["pythia160m", "pythia410m"], choices=list(SHAPES))
    p.add_argument("--paths", nargs="+", default=["naive", "torch", "triton"], choices=["naive", "torch", "triton"])
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--prompt", type=int, default=256, help="mean prompt tokens")
    p.add_argument("--response", type=int, default=128, help="mean tokens of each response")
    p.add_argument("--chunk", type=int, default=4096, help="--logprob_chunk_size")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement, after one warm-up step")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = p.parse_args()
    device, cuda = torch.device(a.device), a.device.startswith("cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    lines = [f"Command: `python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}`".rstrip(),
             f"Machine: {name}, torch {torch.__version__}; bf16 autocast, {a.pairs} pairs of ~{a.prompt} + 2 x {a.response} "
             f"tokens, chunk {a.chunk}; median of {a.rounds} rounds x {a.steps} steps", "",
             "| model | path | scored tokens/s | step (s) | peak extra memory (MB) | time ratio | memory ratio |",
             "|---|---|---|---|---|---|---|"]
    for shape in a.shapes:
        model, optimizer = build(shape, device)
        data = batches(a, a.steps + 1, device)
        results = {path: [] for path in a.paths}
        for round_index in range(a.rounds):
            order = a.paths if round_index % 2 == 0 else a.paths[::-1]  # alternate, so drift hits all paths alike
            for path in order:
                results[path].append(measure(model, optimizer, data, path, a, autocast, cuda))
        median = {path: [statistics.median(r[i] for r in results[path]) for i in range(3)] for path in a.paths}
        first = median[a.paths[0]]
        for path in a.paths:
            seconds, scored, peak = median[path]
            lines.append(f"| {shape} | {path} | {scored / seconds:.0f} | {seconds:.4f} | {peak:.0f} | "
                         f"{seconds / first[0]:.2f}x | {peak / first[2]:.2f}x |")
        del model, optimizer
        if cuda:
            torch.cuda.empty_cache()
        table = "\n".join(lines)  # written after every shape, so a run cut short keeps the shapes it finished
        print(table, flush=True)
        if a.out:
            with open(a.out, "w") as f:
                f.write(table + "\n")


if __name__ == "__main__":
    main()

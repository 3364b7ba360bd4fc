"""dpo_llm.py's shared-prompt forward vs the concatenated forward: time and peak RSS of one DPO step, side by side.

Both paths feed the same fused chunked DPO loss (fused_linear_loss); they differ only in how the backbone sees a
pair: concatenated = rows [prompt + chosen, prompt + rejected], each prompt run twice (what TRL and most DPO
code do); shared = `pair_scored_tokens`, each prompt run once and its keys/values reused by both responses.
Random-init GPTNeoX models with the Pythia vocabulary (50304), random token pairs, batch 8 pairs, fp32, CPU,
forward + backward of the DPO loss (no optimizer step). Each measurement is a fresh process (peak RSS =
ru_maxrss); the two paths alternate over rounds and the table gives medians.

    python benchmarks/bench_shared_prompt.py                 # both shapes, 2 rounds
    python benchmarks/bench_shared_prompt.py --rounds 1 --shapes tiny
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name: (hidden, layers, heads, intermediate, prompt tokens, response tokens)
SHAPES = {
    "tiny": (256, 4, 4, 1024, 64, 64),  # the model and lengths of bench_dpo_vs_trl.py
    "pythia160m": (768, 12, 12, 3072, 192, 64),  # Pythia-160m's shape; multi-turn prompts longer than responses
}
PAIRS, VOCAB, CHUNK, BETA = 8, 50304, 512, 0.1


def worker(path, shape, steps, threads):
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    sys.path.insert(0, ROOT)
    import dpo_llm

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden, layers, heads, intermediate, prompt_len, response_len = SHAPES[shape]
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=heads, intermediate_size=intermediate, rotary_pct=0.25,
                                             max_position_embeddings=2048, hidden_dropout=0.0, attention_dropout=0.0))
    weight = model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(1)

    def tokens(mean):  # lengths mean +- 16, so that rows are padded as in real batches
        return torch.randint(2, VOCAB, (mean + int(torch.randint(-16, 17, (1,), generator=g)),), generator=g).tolist()

    batches = [[(tokens(prompt_len), tokens(response_len), tokens(response_len)) for _ in range(PAIRS)] for _ in range(steps + 1)]

    ref = torch.zeros(2 * PAIRS)  # reference log-probs 0: the loss's cost does not depend on them

    def step(examples):
        if path == "shared":
            hidden_rows, targets, rows = dpo_llm.pair_scored_tokens(model, *dpo_llm.pair_batch(examples, 1))
        else:
            sequences = [p + r for p, c, rj in examples for r in (c, rj)]
            starts = [len(p) for p, _, _ in examples for _ in range(2)]
            hidden_rows, targets, rows = dpo_llm.scored_tokens(model, *dpo_llm.collate(sequences, starts, 1))
        loss, _, _ = dpo_llm.fused_linear_loss(partial(dpo_llm.dpo_loss, beta=BETA), hidden_rows, weight, targets, rows, ref,
                                               group_size=2, scale=1 / PAIRS, chunk_size=CHUNK)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up
    started = time.perf_counter()
    for examples in batches[1:]:
        step(examples)
    return {"s_per_step": (time.perf_counter() - started) / steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "shared_prompt_cpu.md"))
    p.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args.steps, args.threads)), flush=True)
        return
    import torch  # the driver only reports its version; the workers measure

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error"}
    results = {}
    for shape in args.shapes.split(","):
        for r in range(args.rounds):
            for path in ("concatenated", "shared") if r % 2 == 0 else ("shared", "concatenated"):
                cmd = [sys.executable, os.path.abspath(__file__), "--worker", path, shape, "--steps", str(args.steps),
                       "--threads", str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
                result = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
                results.setdefault((shape, path), []).append(result)
                print(f"[bench] {shape} round {r + 1} {path:12s} {result['s_per_step']:.3f} s/step  "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    lines = ["# Shared-prompt forward vs concatenated forward (CPU)", "",
             f"Command: `python benchmarks/bench_shared_prompt.py {' '.join(sys.argv[1:])}`", "",
             f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), {args.threads} torch thread(s) per process, "
             f"torch {torch.__version__}; each row the median of {args.rounds} fresh process(es), "
             f"paths alternating; {args.steps} timed DPO steps (forward + backward, batch {PAIRS} pairs) each.", "",
             "| shape (hidden, layers) | prompt + response tokens | path | s / step | peak RSS (MB) | time ratio | memory ratio |",
             "|---|---|---|---:|---:|---:|---:|"]
    for shape in args.shapes.split(","):
        hidden, layers, _, _, prompt_len, response_len = SHAPES[shape]
        med = {path: {k: statistics.median(x[k] for x in results[(shape, path)]) for k in ("s_per_step", "peak_rss_mb")}
               for path in ("concatenated", "shared")}
        for path in ("concatenated", "shared"):
            t = med[path]["s_per_step"] / med["concatenated"]["s_per_step"]
            m = med[path]["peak_rss_mb"] / med["concatenated"]["peak_rss_mb"]
            lines.append(f"| {shape} ({hidden}, {layers}) | ~{prompt_len} + ~{response_len} | {path} | "
                         f"{med[path]['s_per_step']:.3f} | {med[path]['peak_rss_mb']:.0f} | {t:.2f}x | {m:.2f}x |")
    lines += ["", "Peak RSS includes the imports and the model's parameters and gradients (no optimizer states)."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

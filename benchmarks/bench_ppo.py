"""One PPO iteration of rlhf_llm.py, timed by phase, and the peak memory of its fused vs naive policy path (CPU).

(1) Time split of one iteration (generate / score / train) with the functions rlhf_llm.py's loop calls, on the
    embedded task's model shape (GPTNeoX, hidden 128, 4 layers; random weights) at the task's vocabulary (16) and at
    a Pythia-sized vocabulary (50304). Default PPO settings: 64 prompts, 4 epochs x 2 minibatches. Median of rounds.
(2) Peak memory of one PPO update (4 epochs x 2 minibatches) with the fused chunked log-prob+entropy path vs the
    naive one (full (tokens x vocab) logits, log_softmax, entropy), at vocab 50304. Each variant runs in its own
    subprocess; the peak is the resident-set high-water mark (VmHWM, = ru_maxrss) after resetting it just before
    the update (writing 5 to /proc/self/clear_refs), minus the resident set at that moment: the update's own peak.

    python benchmarks/bench_ppo.py                     # 1 thread, both parts
    python benchmarks/bench_ppo.py --threads 2 --rounds 3 --memory_response_length 64
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import rlhf_llm as R  # noqa: E402

PAD, EOS = 0, 1


def naive_logprobs_entropy(hidden, weight, targets, temperature, chunk_size):
    """The unfused path: full logits, log-softmax and entropy for every token, all kept for backward."""
    log_probs = torch.log_softmax((hidden @ weight.t()).float() / temperature, -1)
    return log_probs.gather(1, targets[:, None]).squeeze(1), -(log_probs.exp() * log_probs).sum(-1)


def build(vocab, seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=512, max_position_embeddings=256, rotary_pct=0.25, eos_token_id=EOS,
                           pad_token_id=PAD, bos_token_id=EOS, tie_word_embeddings=False, num_labels=1)
    policy = GPTNeoXForCausalLM(config).eval()
    ref = GPTNeoXForCausalLM(config).eval()
    ref.load_state_dict(policy.state_dict())
    reward = GPTNeoXForSequenceClassification(config).eval()
    value = GPTNeoXForSequenceClassification(config).eval()
    value.load_state_dict(reward.state_dict())
    for m in (reward, value):
        m.config.reward_bias = 0.0
    for m in (ref, reward):
        m.requires_grad_(False)
    return policy, ref, reward, value


def prompts(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(2, vocab, (int(torch.randint(5, 10, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]
    return R.left_pad(rows, PAD)


def iteration(models, args, vocab, seed):
    policy, ref, reward, value = models
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=args.learning_rate)
    autocast = torch.autocast("cpu", enabled=False)
    queries, mask = prompts(args.rollout_batch_size, vocab, seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    run = script_run(args, autocast)
    responses = R.generate(policy, queries, mask, run)
    t1 = time.perf_counter()
    batch = R.score_rollouts(run, policy, ref, reward, value, queries, mask, responses)
    t2 = time.perf_counter()
    R.ppo_update(policy, value, optimizer, batch, args, autocast, seed)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, int(batch["response_mask"].sum())


def script_run(args, autocast):
    """The script's Run record of what its helpers read besides models and data (the CPU, pad and EOS ids)."""
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    return R.Run(args, torch.device("cpu"), autocast, tokenizer, None, args.response_length, None, {}, None)


def proc_status_mib(field):
    """A memory field of /proc/self/status (VmRSS, VmHWM ...) in MiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    raise RuntimeError(field)


def memory_worker(variant, vocab, response_length):
    args = R.Args(response_length=response_length)
    models = build(vocab)
    policy, ref, reward, value = models
    optimizer = torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=args.learning_rate)
    autocast = torch.autocast("cpu", enabled=False)
    queries, mask = prompts(args.rollout_batch_size, vocab)
    torch.manual_seed(0)
    run = script_run(args, autocast)
    responses = R.generate(policy, queries, mask, run)
    batch = R.score_rollouts(run, policy, ref, reward, value, queries, mask, responses)
    # warm-up step so AdamW's state and allocator caches exist before measuring (identical for both variants)
    R.ppo_update(policy, value, optimizer, batch, R.Args(response_length=response_length, num_ppo_epochs=1), autocast, 0)
    if variant == "naive":
        R.policy_logprobs_entropy = naive_logprobs_entropy  # ppo_update looks the function up by name
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    base = proc_status_mib("VmRSS")
    t0 = time.perf_counter()
    R.ppo_update(policy, value, optimizer, batch, args, autocast, 1)
    seconds = time.perf_counter() - t0
    peak = proc_status_mib("VmHWM")
    tokens = int(batch["response_mask"].sum())
    print(json.dumps({"variant": variant, "peak_mib": peak - base, "seconds": seconds, "tokens": tokens}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[16, 50304])
    parser.add_argument("--response_length", type=int, default=9, help="the embedded task's max_response_tokens")
    parser.add_argument("--memory_response_length", type=int, default=64)
    parser.add_argument("--memory_vocab", type=int, default=50304)
    parser.add_argument("--worker", choices=["fused", "naive"])
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    if cli.worker:
        return memory_worker(cli.worker, cli.memory_vocab, cli.memory_response_length)

    import transformers

    command = "python " + " ".join(sys.argv)
    print(f"command: `{command}`  \nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{cli.threads} torch thread(s), {platform.system()}  \nversions: python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}\n")
    args = R.Args(response_length=cli.response_length)
    print(f"### One PPO iteration (rollout {args.rollout_batch_size} prompts, response <= {cli.response_length} tokens, "
          f"{args.num_ppo_epochs} epochs x {args.num_mini_batches} minibatches), median of {cli.rounds} rounds\n")
    print("| vocab | generate s | score s | train s | total s | generate | score | train |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for vocab in cli.vocabs:
        models = build(vocab)
        iteration(models, args, vocab, seed=100)  # warm-up
        runs = [iteration(models, args, vocab, seed=r) for r in range(cli.rounds)]
        g, s, t = (statistics.median(x[i] for x in runs) for i in range(3))
        total = g + s + t
        print(f"| {vocab} | {g:.3f} | {s:.3f} | {t:.3f} | {total:.3f} | {g / total:.0%} | {s / total:.0%} | {t / total:.0%} |")

    print(f"\n### Peak memory of one PPO update (vocab {cli.memory_vocab}, response {cli.memory_response_length} tokens, "
          f"logprob_chunk_size {R.Args().logprob_chunk_size}); peak RSS above the pre-update RSS, one subprocess per variant\n")
    results = {}
    for variant in ("fused", "naive"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", variant, "--threads", str(cli.threads),
                              "--memory_vocab", str(cli.memory_vocab), "--memory_response_length", str(cli.memory_response_length)],
                             capture_output=True, text=True, check=True)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    print("| path | update peak MiB | update s | tokens |")
    print("|---|---:|---:|---:|")
    for variant, r in results.items():
        print(f"| {variant} | {r['peak_mib']:.0f} | {r['seconds']:.2f} | {r['tokens']} |")
    ratio = results["naive"]["peak_mib"] / max(results["fused"]["peak_mib"], 1e-9)
    print(f"\nnaive / fused peak memory: {ratio:.1f}x; time naive / fused: {results['naive']['seconds'] / results['fused']['seconds']:.2f}x")


if __name__ == "__main__":
    main()

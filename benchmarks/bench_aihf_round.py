"""One AIHF-RL round of aihf_llm.py, timed by phase, and its peak memory with the fused vs the naive LM head.

A round is what aihf_llm.py's loop does, with the functions it calls: (1) generate one response per demonstration
prompt from the policy; (2) one reward step on L(phi) = w_demo BT(demo > sample) + w_pref BT(chosen > rejected);
(3) score the rollouts (log-probs, values, KL, GAE) and (4) the PPO update. Models: GPTNeoX of the embedded task's
shape (hidden 128, 4 layers; random weights) at the task's vocabulary (16) and at Pythia's (50304), or larger with
--hidden/--layers. The memory part runs each LM-head path in its own process: `fused` is the scripts' chunked
path, `naive` the full (tokens x vocab) logits with log_softmax and entropy kept for backward; a third process runs
the fused path with --gradient_accumulation_steps (--memory_accumulation), which splits the reward step and each PPO
minibatch into that many micro-batches. The peak is the
growth of the resident set over one round (CPU: VmHWM after resetting it) or of torch.cuda.max_memory_allocated
(GPU), after a warm-up round.

    python benchmarks/bench_aihf_round.py                              # CPU, 1 thread
    python benchmarks/bench_aihf_round.py --device cuda --bf16 --hidden 768 --layers 12 --response_length 128 \
        --memory_response_length 128 --chunk 4096
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
import aihf_llm as A  # noqa: E402
from bench_ppo import proc_status_mib  # noqa: E402  (benchmarks/ is on the path of a script run from it)

PAD, EOS = 0, 1


def naive_logprobs_entropy(hidden, weight, targets, temperature, chunk_size):
    log_probs = torch.log_softmax((hidden @ weight.t()).float() / temperature, -1)
    return log_probs.gather(1, targets[:, None]).squeeze(1), -(log_probs.exp() * log_probs).sum(-1)


def build(cli, device):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=cli.vocab, hidden_size=cli.hidden, num_hidden_layers=cli.layers,
                           num_attention_heads=max(4, cli.hidden // 64), intermediate_size=4 * cli.hidden,
                           max_position_embeddings=512, rotary_pct=0.25, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=EOS,
                           tie_word_embeddings=False, num_labels=1)
    policy = GPTNeoXForCausalLM(config).to(device).eval()
    ref = GPTNeoXForCausalLM(config).to(device).eval()
    ref.load_state_dict(policy.state_dict())
    reward = GPTNeoXForSequenceClassification(config).to(device).eval()
    value = GPTNeoXForSequenceClassification(config).to(device).eval()
    value.load_state_dict(reward.state_dict())
    for m in (reward, value):
        m.config.reward_bias = 0.0
    ref.requires_grad_(False)
    return policy, ref, reward, value


def random_rows(n, low, high, vocab, generator):
    return [torch.randint(2, vocab, (int(torch.randint(low, high, (1,), generator=generator)),), generator=generator).tolist()
            for _ in range(n)]


def round_(models, optimizers, args, cli, device, autocast, seed):
    """One round; returns the seconds of each phase and the number of response tokens."""
    policy, ref, reward, value = models
    policy_optimizer, reward_optimizer = optimizers
    g = torch.Generator().manual_seed(seed)
    prompts = random_rows(args.rollout_batch_size, 5, 10, cli.vocab, g)
    demos = random_rows(args.rollout_batch_size, 3, cli.response_length, cli.vocab, g)
    run = A.Run(args, device, autocast, SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS), None, cli.response_length, None,
                {}, None)  # what the script's helpers read besides models and data
    prefs = [(p, c, r) for p, c, r in zip(random_rows(args.batch_size, 5, 10, cli.vocab, g),
                                         random_rows(args.batch_size, 3, cli.response_length, cli.vocab, g),
                                         random_rows(args.batch_size, 3, cli.response_length, cli.vocab, g))]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    sync()
    t0 = time.perf_counter()
    queries, query_mask = (t.to(device) for t in A.left_pad(prompts, PAD))
    torch.manual_seed(seed)
    responses = A.generate(policy, queries, query_mask, run)
    samples, sample_mask, _ = A.truncate_after_eos(responses, EOS, PAD)
    sync()
    times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    demo_pairs = [(p, d, s[m].tolist()) for p, d, s, m in zip(prompts, demos, samples.cpu(), sample_mask.cpu())]
    A.reward_step(run, reward, reward_optimizer, demo_pairs, prefs)
    A.center_reward(reward, torch.cat([queries, samples], 1), torch.cat([query_mask, sample_mask.long()], 1), run)
    sync()
    times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    batch = A.score_rollouts(run, policy, ref, reward, value, queries, query_mask, responses)
    sync()
    times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    A.ppo_update(policy, value, policy_optimizer, batch, args, autocast, seed)
    sync()
    times.append(time.perf_counter() - t0)
    return times, int(batch["response_mask"].sum())


def setup(cli):
    device = torch.device(cli.device)
    A.LOGPROB_KERNEL = "auto"
    args = SimpleNamespace(**{**vars(A.Args()), "response_length": cli.response_length, "learning_rate": 3e-5,
                              "logprob_chunk_size": cli.chunk, "gradient_accumulation_steps": cli.accumulation})
    models = build(cli, device)
    policy, ref, reward, value = models
    optimizers = (torch.optim.AdamW(list(policy.parameters()) + list(value.parameters()), lr=args.learning_rate),
                  torch.optim.AdamW(reward.parameters(), lr=args.rm_learning_rate))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cli.bf16)
    return device, args, models, optimizers, autocast


def memory_worker(cli):
    device, args, models, optimizers, autocast = setup(cli)
    if cli.worker == "naive":
        A.policy_logprobs_entropy = naive_logprobs_entropy  # score_rollouts and ppo_update look it up by name
    round_(models, optimizers, args, cli, device, autocast, seed=100)  # warm-up: optimizer states, allocator caches
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS counter
        base = proc_status_mib("VmRSS")
    times, tokens = round_(models, optimizers, args, cli, device, autocast, seed=1)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else proc_status_mib("VmHWM")
    print(json.dumps({"peak_mib": peak - base, "seconds": sum(times), "tokens": tokens}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[16, 50304])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--response_length", type=int, default=9, help="the embedded task's max_response_tokens")
    parser.add_argument("--chunk", type=int, default=1024, help="--logprob_chunk_size")
    parser.add_argument("--memory_vocab", type=int, default=50304)
    parser.add_argument("--memory_response_length", type=int, default=64, help="response tokens of the memory part")
    parser.add_argument("--memory_accumulation", type=int, default=4, help="micro-batches per step of the third memory run")
    parser.add_argument("--accumulation", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=["fused", "naive"])
    parser.add_argument("--vocab", type=int, default=50304, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="also write the tables here (markdown)")
    cli = parser.parse_args()
    torch.set_num_threads(cli.threads)
    if cli.worker:
        return memory_worker(cli)

    import transformers

    gpu = torch.cuda.get_device_name() if cli.device == "cuda" else None
    lines = [f"command: `python {' '.join(sys.argv)}`  ",
             f"machine: {gpu or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {cli.threads} torch thread(s)  ",
             f"versions: python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}", ""]
    args0 = A.Args()
    lines += [f"### One AIHF-RL round ({args0.rollout_batch_size} demo prompts, response <= {cli.response_length} tokens, one reward "
              f"step on {args0.rollout_batch_size} demo pairs + {args0.batch_size} preference pairs, {args0.num_ppo_epochs} PPO epochs x "
              f"{args0.num_mini_batches} minibatches; hidden {cli.hidden}, {cli.layers} layers{', bf16' if cli.bf16 else ''}), "
              f"median of {cli.rounds} rounds", "",
              "| vocab | generate s | reward step s | score s | PPO update s | round s | generate | reward | score | PPO |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for vocab in cli.vocabs:
        cli.vocab = vocab
        device, args, models, optimizers, autocast = setup(cli)
        round_(models, optimizers, args, cli, device, autocast, seed=100)  # warm-up
        runs = [round_(models, optimizers, args, cli, device, autocast, seed=r)[0] for r in range(cli.rounds)]
        phases = [statistics.median(x[i] for x in runs) for i in range(4)]
        total = sum(phases)
        lines.append(f"| {vocab} | " + " | ".join(f"{p:.3f}" for p in phases) + f" | {total:.3f} | "
                     + " | ".join(f"{p / total:.0%}" for p in phases) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"### Peak memory of one round (vocab {cli.memory_vocab}, response <= {cli.memory_response_length} tokens, "
              f"chunk {cli.chunk}), fused vs naive LM head, "
              "one process per path", "", "| path | round peak MiB | round s | response tokens |", "|---|---:|---:|---:|"]
    results = {}
    accumulated = f"fused, {cli.memory_accumulation} micro-batches"
    for name, variant, accumulation in (("fused", "fused", 1), ("naive", "naive", 1), (accumulated, "fused", cli.memory_accumulation)):
        flags = ["--worker", variant, "--accumulation", accumulation, "--device", cli.device, "--threads", cli.threads,
                 "--vocab", cli.memory_vocab, "--hidden", cli.hidden, "--layers", cli.layers,
                 "--response_length", cli.memory_response_length, "--chunk", cli.chunk]
        out = subprocess.run([sys.executable, os.path.abspath(__file__), *map(str, flags), *(["--bf16"] if cli.bf16 else [])],
                             capture_output=True, text=True)
        if out.returncode != 0:
            lines.append(f"| {name} | failed: {out.stderr.strip().splitlines()[-1][:120]} | | |")
            continue
        results[name] = r = json.loads(out.stdout.strip().splitlines()[-1])
        lines.append(f"| {name} | {r['peak_mib']:.0f} | {r['seconds']:.2f} | {r['tokens']} |")
    if {"fused", "naive"} <= results.keys():
        lines += ["", f"fused / naive: {results['fused']['peak_mib'] / results['naive']['peak_mib']:.2f}x peak memory, "
                  f"{results['fused']['seconds'] / results['naive']['seconds']:.2f}x time"]
    if {"fused", accumulated} <= results.keys():
        lines += ["", f"{cli.memory_accumulation} micro-batches / 1: {results[accumulated]['peak_mib'] / results['fused']['peak_mib']:.2f}x "
                  f"peak memory, {results[accumulated]['seconds'] / results['fused']['seconds']:.2f}x time"]
    print("\n".join(lines))
    if cli.out:
        with open(cli.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

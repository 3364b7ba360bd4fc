"""dpo_llm.py on one process and under torchrun (DDP, FSDP2), side by side: DPO tokens/s, wall time, peak memory.

CPU (--device cpu): the embedded task with its default flags, 1 process (plain `python dpo_llm.py`) against 2
processes under `torchrun --nproc_per_node 2` with gloo, DDP and FSDP2; 1 torch thread per process, so 2 processes
use 2 cores. The DPO stage is the same global batch and the same steps on both, so tokens/s is a like-for-like
throughput (all processes together, the reference log-probs included); wall time is the whole run (SFT, evaluations,
writing the model).

GPU (--device cuda, one GPU): a Pythia-410M-sized GPTNeoX (random init from its config: hidden 1024, 24 layers,
vocabulary 50304; no hub) on synthetic pairs of about --prompt + 2 x --response tokens, --bf16, DPO only: a plain run
against DDP of world size 1 (torchrun, one process: what the wrapper and its gradient all-reduce cost) and FSDP2 of
world size 1 (gathers and frees each block; on one GPU it shards nothing); peak = torch.cuda.max_memory_allocated of
the process. The model and checkpoints are not written (save_model and save_checkpoint are switched off in the
measured process) and a first run fills Triton's kernel cache, so that neither counts.

--accumulation N (CPU): 2 processes with DDP at N micro-batches per optimizer step, the scripts' one all-reduce per
step (with the last micro-batch) against DDP's default of one per micro-batch.

Each configuration runs in fresh processes, the configurations alternate over --rounds, and the table shows medians.

    python benchmarks/bench_distributed.py --device cpu --rounds 2 --out benchmarks/results/distributed_cpu.md
    python benchmarks/bench_distributed.py --device cuda --out benchmarks/results/distributed_gpu.md   # one GPU
    python benchmarks/bench_distributed.py --accumulation 4 --out benchmarks/results/distributed_cpu_accumulation.md
"""

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# name: (processes, launcher flags, dpo_llm flags, worker options)
CONFIGS = {
    "cpu": {"1 process": (1, None, ["--device", "cpu"], []),  # (on a machine with a GPU too)
            "2 processes, DDP (gloo)": (2, [], ["--device", "cpu", "--parallel", "ddp"], []),
            "2 processes, FSDP2 (gloo)": (2, [], ["--device", "cpu", "--parallel", "fsdp"], [])},
    "cuda": {"plain (no torchrun)": (1, None, [], []),
             "DDP, world size 1": (1, [], ["--parallel", "ddp"], []),
             "FSDP2, world size 1": (1, [], ["--parallel", "fsdp"], [])},
}


def accumulation_configs(micro_batches):
    """2 processes with DDP at `micro_batches` micro-batches per optimizer step: one all-reduce per step, with the last
    micro-batch (dpo_llm's sync_gradients), against DDP's default of one per micro-batch (sync_gradients switched off)."""
    flags = ["--device", "cpu", "--parallel", "ddp", "--gradient_accumulation_steps", micro_batches]
    return {f"2 processes, DDP, {micro_batches} micro-batches, all-reduce with the last": (2, [], flags, []),
            f"2 processes, DDP, {micro_batches} micro-batches, all-reduce with each": (2, [], flags, ["--sync_every_micro_batch"])}


def worker(flags, out, options):
    """In the measured process: dpo_llm.main() with these flags, then its peak memory, written to `out` (rank 0)."""
    sys.path.insert(0, ROOT)
    import torch

    import dpo_llm

    if "--no_save" in options:  # the measurement is the training; writing a 410M model and its optimizer state is left out
        dpo_llm.save_model = dpo_llm.save_checkpoint = lambda *args, **kwargs: None
    if "--sync_every_micro_batch" in options:  # DDP's default: an all-reduce in every backward
        dpo_llm.sync_gradients = lambda *args: None
    sys.argv = ["dpo_llm.py", *flags]
    dpo_llm.main()
    if dpo_llm.RANK == 0:
        cuda_peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB
        with open(out, "w") as f:
            json.dump({"cuda_peak_gb": cuda_peak, "rss_gb": rss}, f)


def run(name, processes, launcher, flags, work, options):
    """One configuration in fresh processes: (metrics.json, peak memory)."""
    run_name = f"run{time.time_ns()}"
    peak_file = os.path.join(work, f"{run_name}.peak.json")
    worker_args = [os.path.abspath(__file__), "--worker", peak_file, *options, "--",
                   *map(str, flags), "--output_dir", work, "--run_name", run_name]
    cmd = [sys.executable, *worker_args] if launcher is None else [*TORCHRUN, *launcher, f"--nproc_per_node={processes}", *worker_args]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    with open(os.path.join(work, run_name, "metrics.json")) as f:
        metrics = json.load(f)
    with open(peak_file) as f:
        return metrics, json.load(f)


def synthetic_setup(work, a):
    """A Pythia-410M-sized GPTNeoX, randomly initialised, with the embedded task's word-level tokenizer (digits), and
    jsonl files of prompt / chosen / rejected digit strings (the measured run's, and a 2-step one for the warm-up).
    Returns the dpo_llm flags without the data, and the two files."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    sys.path.insert(0, ROOT)
    import sort_task

    tokenizer = sort_task.build_tokenizer(sort_task.SortTaskConfig())
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=50304, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                           intermediate_size=4096, rotary_pct=0.25, max_position_embeddings=2048, hidden_dropout=0.0,
                           attention_dropout=0.0, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model_dir = os.path.join(work, "pythia410m_random")
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU: seconds, not a minute
        GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rng = random.Random(0)

    def digits(n):
        return " ".join(str(rng.randrange(10)) for _ in range(n))

    files = []
    for name, steps in (("pairs.jsonl", a.steps), ("warmup.jsonl", 2)):
        files.append(os.path.join(work, name))
        with open(files[-1], "w") as f:
            for _ in range(a.pairs * steps + 64):  # the training pairs, then 64 held out (no test split)
                f.write(json.dumps({"prompt": digits(a.prompt), "chosen": " " + digits(a.response),
                                    "rejected": " " + digits(a.response)}) + "\n")
    return ["--model_name_or_path", model_dir, "--max_length", a.prompt + a.response + 2,
            "--max_prompt_length", a.prompt + 1, "--sft_epochs", 0, "--num_epochs", 1, "--batch_size", a.pairs,
            "--num_eval_prefs", 64, "--eval_every", 0, "--save_every", 0, "--bf16", "--device", "cuda",
            "--logprob_chunk_size", 4096, "--learning_rate", 1e-6], *files


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":  # --worker PEAK_FILE [options] -- dpo_llm flags
        split = sys.argv.index("--")
        return worker(sys.argv[split + 1:], sys.argv[2], sys.argv[3:split])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--pairs", type=int, default=16, help="cuda: pairs per step")
    p.add_argument("--steps", type=int, default=30, help="cuda: DPO steps")
    p.add_argument("--prompt", type=int, default=256, help="cuda: prompt tokens")
    p.add_argument("--response", type=int, default=256, help="cuda: tokens of each response")
    p.add_argument("--accumulation", type=int, default=0,
                   help="cpu: instead, DDP at this many micro-batches per step, one all-reduce per step vs one per micro-batch")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = p.parse_args()
    import torch

    work = tempfile.mkdtemp(prefix="bench_distributed_")
    configs = accumulation_configs(a.accumulation) if a.accumulation else CONFIGS[a.device]
    if a.device == "cuda":
        flags, data, warmup = synthetic_setup(work, a)  # (builds and writes the model)
        no_save = ["--no_save"]
        run("warm-up", 1, None, [*flags, "--dataset_name", warmup], work, no_save)  # fills Triton's kernel cache
        flags = [*flags, "--dataset_name", data]
        machine = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
        what = (f"Pythia-410M-sized GPTNeoX (random init), bf16, {a.pairs} pairs of {a.prompt} + 2 x {a.response} tokens "
                f"per step, {a.steps} DPO steps")
    else:
        flags, no_save = [], []
        machine = f"{os.cpu_count()} CPUs ({platform.machine()}), 1 torch thread per process, torch {torch.__version__}"
        what = "the embedded task, default flags (SFT 3 epochs, DPO 4 epochs, batch 32)"
    results = {name: [] for name in configs}
    for round_index in range(a.rounds):
        order = list(configs) if round_index % 2 == 0 else list(configs)[::-1]  # alternate, so drift hits all alike
        for name in order:
            processes, launcher, extra, options = configs[name]
            results[name].append(run(name, processes, launcher, [*flags, *extra], work, [*no_save, *options]))
            print(f"[bench] round {round_index + 1}: {name}: {results[name][-1][0]['dpo_tokens_per_s']} DPO tokens/s", flush=True)
            write_table(results, a, machine, what)  # after every run: a run cut short keeps what it measured
    print(write_table(results, a, machine, what))


def write_table(results, a, machine, what):
    """The markdown table of the medians so far (configurations not yet run are left out); to --out if given."""
    command = f"python benchmarks/{os.path.basename(__file__)} {' '.join(sys.argv[1:])}".rstrip()
    lines = [f"# dpo_llm.py on one process and under torchrun ({a.device.upper()})", "", f"Command: `{command}`", "",
             f"Machine: {machine}; {what}; medians of {a.rounds} round(s), each configuration in fresh processes, "
             "alternating.", "",
             "| configuration | DPO tokens/s (all processes) | wall time (s) | peak memory (GB) | tokens/s ratio | wall ratio |",
             "|---|---:|---:|---:|---:|---:|"]
    first = None
    for name in [n for n in results if results[n]]:
        tokens = statistics.median(m["dpo_tokens_per_s"] for m, _ in results[name])
        wall = statistics.median(m["wall_s"] for m, _ in results[name])
        peak = statistics.median(p["cuda_peak_gb"] if a.device == "cuda" else p["rss_gb"] for _, p in results[name])
        first = first or (tokens, wall)
        lines.append(f"| {name} | {tokens:.0f} | {wall:.1f} | {peak:.2f} | {tokens / first[0]:.2f}x | {wall / first[1]:.2f}x |")
    lines += ["", "Peak memory: " + ("torch.cuda.max_memory_allocated of the (first) process." if a.device == "cuda"
                                     else "the first process's peak RSS (imports included).")]
    table = "\n".join(lines)
    if a.out:
        with open(a.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()

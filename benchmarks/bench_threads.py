"""The default paths beside a busy process: a task variant's pi0 build and a default run, quiet vs one busy neighbour.

Two OpenMP threads on a 2-core machine that another process keeps busy wait on each other at every parallel region:
a build step that takes 0.23 s on one thread took 2.13 s on two there. So the embedded task builds pi0 on one thread,
and the scripts default to `--num_threads 1`. This measures, side by side in one run, each of them on a quiet machine
and beside one neighbour that keeps one core busy (a one-thread matmul loop), plus the two-thread build for contrast.
Each measurement is a fresh process; the table gives the median over rounds and the ratio busy / quiet.

    python benchmarks/bench_threads.py                     # 2 rounds; writes benchmarks/results/threads_cpu.md
    python benchmarks/bench_threads.py --rounds 1 --build_steps 100
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEIGHBOUR = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()\n"


def build_command(steps, threads):
    """A variant's pi0 (--task.seed 1) built into a fresh cache, on `threads` threads."""
    cache = tempfile.mkdtemp(prefix="bench_threads_")
    code = (f"import sort_task as s; s.BUILD_THREADS = {threads}; "
            f"s.base_model_path(s.SortTaskConfig(seed=1, base_model_steps={steps}, cache_dir={cache!r}))")
    return [sys.executable, "-c", code]


def default_run_command():
    out = tempfile.mkdtemp(prefix="bench_threads_run_")
    return [sys.executable, os.path.join(ROOT, "dpo_llm.py"), "--output_dir", out, "--run_name", "run"]


def timed(command):
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": ROOT})
    return time.perf_counter() - started


def measure(command, busy):
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) if busy else None
    try:
        if neighbour:
            time.sleep(2)  # let it start
        return timed(command)
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--build_steps", type=int, default=300, help="--task.base_model_steps of the variant built")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "threads_cpu.md"))
    args = parser.parse_args()
    cases = {f"pi0 variant build, 1 thread (the default), {args.build_steps} steps": lambda: build_command(args.build_steps, 1),
             f"pi0 variant build, 2 threads (for contrast), {args.build_steps} steps": lambda: build_command(args.build_steps, 2),
             "`python dpo_llm.py` (defaults: --num_threads 1)": default_run_command}
    times = {(name, busy): [] for name in cases for busy in (False, True)}
    for r in range(args.rounds):
        for name, command in cases.items():
            for busy in ((False, True) if r % 2 == 0 else (True, False)):
                times[name, busy].append(measure(command(), busy))
                print(f"round {r + 1}: {name}, {'busy' if busy else 'quiet'}: {times[name, busy][-1]:.1f} s", flush=True)
    import torch

    lines = ["# The default paths beside a busy process (CPU)", "",
             f"`python benchmarks/bench_threads.py --rounds {args.rounds} --build_steps {args.build_steps}`: "
             f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}; the "
             "neighbour keeps one core busy with a one-thread matmul loop. Medians over rounds, each a fresh process.", "",
             "| what | quiet (s) | beside a busy process (s) | busy ÷ quiet |", "|---|---:|---:|---:|"]
    for name in cases:
        quiet, busy = statistics.median(times[name, False]), statistics.median(times[name, True])
        lines.append(f"| {name} | {quiet:.1f} | {busy:.1f} | **{busy / quiet:.2f}×** |")
    lines += ["", "Goal: under 1.5× for the default paths (the 1-thread build and the default run)."]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

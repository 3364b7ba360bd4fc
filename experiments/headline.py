"""The README's headline figures: each default command over seeds, as a mean with its 95% interval.

Each (command, seed) is its own process with the scripts' defaults (`--num_threads 1`) and the shipped pi0, so any
machine can re-run any row and see whether it lands inside the interval. --env runs every command under extra
environment variables (e.g. another CPU code path) and labels the table with them.

    python experiments/headline.py --jobs 2                  # seeds 1-3; writes results/aihf/headline.md
    python experiments/headline.py --seeds 4 5 --only dpo    # more seeds of one row (kept beside the others)
    python experiments/headline.py --env ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 --label avx2

Per-seed metrics are kept in results/aihf/headline/<label>/<row>__s<seed>.json; the table is rebuilt from them.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "aihf")
# row: (command, [(figure, metrics key), ...]) -- the README's headline rows
ROWS = {
    "dpo": (["dpo_llm.py"], [("pi0, sampled", "gold_reward_init"), ("pi0, greedy", "gold_reward_greedy_init"),
                             ("SFT alone, sampled", "gold_reward_sft"), ("SFT alone, greedy", "gold_reward_greedy_sft"),
                             ("DPO, sampled", "gold_reward"), ("DPO, greedy", "gold_reward_greedy"),
                             ("DPO, held-out preference accuracy", "pref_accuracy")]),
    "aihf": (["aihf_llm.py"], [("AIHF-RL (RLHF's start), sampled", "gold_reward"),
                               ("AIHF-RL (RLHF's start), greedy", "gold_reward_greedy")]),
    "aihf_pi0": (["aihf_llm.py", "--start", "pi0"], [("AIHF-RL --start pi0, sampled", "gold_reward"),
                                                    ("AIHF-RL --start pi0, greedy", "gold_reward_greedy")]),
    "aihf_pi0_kl005": (["aihf_llm.py", "--start", "pi0", "--kl_coef", "0.05"],
                       [("AIHF-RL --start pi0 --kl_coef 0.05, sampled", "gold_reward"),
                        ("AIHF-RL --start pi0 --kl_coef 0.05, greedy", "gold_reward_greedy")]),
    "rlhf": (["rlhf_llm.py"], [("RLHF, sampled", "gold_reward"), ("RLHF, greedy", "gold_reward_greedy"),
                               ("RLHF, reward model held-out accuracy", "rm_accuracy")]),
}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}  # Student t


def interval(values):
    """(mean, half-width of the 95% interval of the mean): Student t with n - 1 degrees of freedom."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def run(row, seed, label, env):
    path = os.path.join(OUT, "headline", label, f"{row}__s{seed}.json")
    if os.path.exists(path):
        return
    command, _ = ROWS[row]
    with tempfile.TemporaryDirectory(prefix="headline_") as tmp:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, command[0]), *command[1:], "--seed", str(seed),
                               "--output_dir", tmp, "--run_name", "run"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, **env})
        if proc.returncode != 0:
            print(f"{row} seed {seed}: failed\n{proc.stderr[-2000:]}", flush=True)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(os.path.join(tmp, "run", "metrics.json")) as f:
            metrics = json.load(f)
    with open(path, "w") as f:
        json.dump(metrics, f, indent=1)
    print(f"{row} seed {seed} ({label}): " + ", ".join(f"{k} {metrics[k]:.3f}" for _, k in ROWS[row][1]), flush=True)


def report(label, env):
    import torch
    import transformers

    folder = os.path.join(OUT, "headline", label)
    lines = [f"# Headline figures ({label})", "",
             f"`python experiments/headline.py{' --env ' + ' '.join(f'{k}={v}' for k, v in env.items()) if env else ''}"
             f"{' --label ' + label if label != 'native' else ''}`: each README default command, one process per seed, "
             f"shipped pi0; {platform.processor() or platform.machine()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}. Gold reward on the 256 held-out prompts; mean over seeds with the 95% "
             "interval of the mean (Student t).", "", "| figure | command | per seed | mean ± 95% interval |", "|---|---|---|---|"]
    for row, (command, figures) in ROWS.items():
        seeds = sorted(int(f.split("__s")[1][:-5]) for f in os.listdir(folder) if f.startswith(f"{row}__s")) \
            if os.path.isdir(folder) else []
        if not seeds:
            continue
        metrics = {s: json.load(open(os.path.join(folder, f"{row}__s{s}.json"))) for s in seeds}
        for name, key in figures:
            values = [metrics[s][key] for s in seeds]
            mean, half = interval(values)
            lines.append(f"| {name} | `python {' '.join(command)} --seed S` | "
                         + ", ".join(f"{s}: {v:.3f}" for s, v in zip(seeds, values)) + f" | **{mean:.3f} ± {half:.3f}** |")
    path = os.path.join(OUT, "headline.md" if label == "native" else f"headline_{label}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--only", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--env", nargs="*", default=[], help="NAME=value pairs set for every command")
    parser.add_argument("--label", default="native", help="the table's name for this environment")
    parser.add_argument("--report", action="store_true", help="only rebuild the table")
    args = parser.parse_args()
    env = dict(pair.split("=", 1) for pair in args.env)
    if not args.report:
        jobs = [(row, seed) for seed in args.seeds for row in args.only]
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: run(*job, args.label, env), jobs))
    report(args.label, env)


if __name__ == "__main__":
    main()

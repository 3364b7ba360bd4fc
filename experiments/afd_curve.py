"""The reward-hacking curve of afd_llm.py: gold reward of the Best-of-N choice against N, per --rm_data, over seeds.

Each (rm_data, seed) is one run of afd_llm.py in its own process, written to runs/afd_curve/<sweep>_<rm_data>_s<seed>/;
a run whose metrics.json exists is skipped, so a killed sweep picks up where it stopped. After each run the tables
and the plot are rewritten from whatever has finished:
    results/afd/bon_curve_<sweep>.csv   one row per run and N: learned reward, gold reward, shares of the choices
                                        that are the sorted digits / carry the demonstrator's flaw
    results/afd/bon_curve_<sweep>.md    the tables the README quotes
    results/afd/bon_curve_<sweep>.png   gold reward and share of flawed choices against N

    python experiments/afd_curve.py                    # the embedded task's defaults: 3 rm_data x 3 seeds
    python experiments/afd_curve.py --sweep low_flaw   # the same with --task.demo_flaw 0.2 (flawed demos a minority)

The flaw: the embedded task's demonstrator writes the largest digit first and the rest sorted (--task.demo_flaw of
its demonstrations); a choice "carries the flaw" when it is exactly that ordering of the prompt's digits.
"""

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = ["init_sft", "init_demo", "sft_demo"]
SWEEPS = {"main": [], "low_flaw": ["--task.demo_flaw", "0.2"]}
SHOWN_N = [1, 2, 4, 8, 16, 32]


def digits(text):
    words = text.split()
    return [int(w) for w in words] if all(w.isdigit() and len(w) == 1 for w in words) else None


def kind(prompt, response):
    """'sorted', 'flaw' (largest digit first, the rest sorted) or 'other' for a response to a `sort: ... =` prompt."""
    target, got = sorted(digits(" ".join(prompt.split()[1:-1]))), digits(response)
    if got == target:
        return "sorted"
    if len(target) > 1 and got == [target[-1]] + target[:-1]:
        return "flaw"
    return "other"


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t quantiles by degrees of freedom


def curve_rows(run_dir, mode, seed):
    """Per N: the mean learned and gold reward of the Best-of-N choices and the shares of sorted / flawed choices,
    recomputed from bon_samples.jsonl with the script's own rule (argmax of the first N, first index on ties)."""
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))
    samples = [json.loads(line) for line in open(os.path.join(run_dir, "bon_samples.jsonl"))]
    max_n = len(samples[0]["responses"])
    rows = []
    for n in range(1, max_n + 1):
        kinds, rewards, golds = [], [], []
        for s in samples:
            first = s["rewards"][:n]
            i = first.index(max(first))
            kinds.append(kind(s["prompt"], s["responses"][i]))
            rewards.append(s["rewards"][i])
            golds.append(s["gold_rewards"][i])
        gold = sum(golds) / len(golds)
        assert abs(gold - metrics[f"gold_reward_bon_{n}"]) < 1e-5, (run_dir, n)  # the same choices as the script's
        rows.append({"rm_data": mode, "seed": seed, "N": n, "reward": round(sum(rewards) / len(rewards), 4), "gold_reward": round(gold, 4),
                     "sorted_share": round(kinds.count("sorted") / len(kinds), 4), "flaw_share": round(kinds.count("flaw") / len(kinds), 4)})
    every = [kind(s["prompt"], r) for s in samples for r in s["responses"]]
    summary = {"rm_data": mode, "seed": seed, "gold_sft": metrics["gold_reward_sft"], "gold_init": metrics["gold_reward_init"],
               "oracle": metrics["gold_reward_bon_oracle"], "rm_accuracy": metrics["rm_accuracy"],
               "rm_pair_accuracy": metrics["rm_pair_accuracy"], "rm_pref_accuracy": metrics["rm_pref_accuracy"],
               "rm_gold_positive": metrics["rm_gold_positive"], "rm_gold_negative": metrics["rm_gold_negative"],
               "flaw_share_samples": every.count("flaw") / len(every), "sorted_share_samples": every.count("sorted") / len(every),
               "wall_s": metrics["wall_s"]}
    return rows, summary


def write_results(sweep, finished, out_dir, command):
    rows, summaries = [], []
    for run_dir, mode, seed in finished:
        r, s = curve_rows(run_dir, mode, seed)
        rows += r
        summaries.append(s)
    if not rows:
        return
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"bon_curve_{sweep}")
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    shown = [n for n in SHOWN_N if any(r["N"] == n for r in rows)]
    at = {(r["rm_data"], r["seed"], r["N"]): r for r in rows}
    lines = [f"`{command}`", "",
             "Gold reward of the Best-of-N choice (mean over the held-out prompts), per N; peak = the best N:", "",
             "| rm_data | seed | " + " | ".join(f"N={n}" for n in shown) + " | peak (N) |", "|---|---|" + "---:|" * (len(shown) + 1)]
    for s in summaries:
        golds = {n: at[(s["rm_data"], s["seed"], n)]["gold_reward"] for n in range(1, max(r["N"] for r in rows) + 1)
                 if (s["rm_data"], s["seed"], n) in at}
        best = max(golds, key=lambda n: (golds[n], -n))
        lines.append(f"| {s['rm_data']} | {s['seed']} | " + " | ".join(f"{golds[n]:.3f}" for n in shown)
                     + f" | {golds[best]:.3f} ({best}) |")
    for mode in MODES:  # the mean over seeds with its 95% interval (Student t), and the best N of the mean
        seeds = sorted({r["seed"] for r in rows if r["rm_data"] == mode})
        if len(seeds) > 1:
            golds = {n: [at[(mode, seed, n)]["gold_reward"] for seed in seeds]
                     for n in sorted({r["N"] for r in rows if r["rm_data"] == mode})}
            mean = {n: statistics.mean(v) for n, v in golds.items()}
            half = {n: T_975[len(v) - 1] * statistics.stdev(v) / math.sqrt(len(v)) for n, v in golds.items()}
            best = max(mean, key=lambda n: (mean[n], -n))
            lines.append(f"| **{mode}** | mean of {len(seeds)} ± 95% | " + " | ".join(f"**{mean[n]:.3f}** ± {half[n]:.3f}"
                                                                            for n in shown)
                         + f" | **{mean[best]:.3f}** ({best}) |")
    lines += ["", "Share of the Best-of-N choices that carry the demonstrator's flaw (largest digit first) / are exactly sorted:", "",
              "| rm_data | seed | all samples | " + " | ".join(f"N={n}" for n in shown) + " |", "|---|---|---:|" + "---:|" * len(shown)]
    for s in summaries:
        cells = [f"{at[(s['rm_data'], s['seed'], n)]['flaw_share']:.2f} / {at[(s['rm_data'], s['seed'], n)]['sorted_share']:.2f}"
                 for n in shown]
        lines.append(f"| {s['rm_data']} | {s['seed']} | {s['flaw_share_samples']:.2f} / {s['sorted_share_samples']:.2f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "The discriminators: held-out accuracy (D > 1/2 on positives, < 1/2 on negatives), pair accuracy (positive above "
              "negative, same prompt), held-out human preference pairs ranked right; gold reward of its positives / negatives; "
              "the policies' gold reward (sampled) and the best of the 32 samples by the gold reward itself:", "",
              "| rm_data | seed | accuracy | pair accuracy | preference accuracy | gold of positives / negatives | π0 | SFT | oracle BoN | wall (s) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summaries:
        lines.append(f"| {s['rm_data']} | {s['seed']} | {s['rm_accuracy']:.3f} | {s['rm_pair_accuracy']:.3f} | {s['rm_pref_accuracy']:.3f} | "
                     f"{s['rm_gold_positive']:.3f} / {s['rm_gold_negative']:.3f} | {s['gold_init']:.3f} | {s['gold_sft']:.3f} | "
                     f"{s['oracle']:.3f} | {s['wall_s']:.0f} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(rows, summaries, stem + ".png", sweep)


def plot(rows, summaries, path, sweep):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"init_sft": "tab:green", "init_demo": "tab:orange", "sft_demo": "tab:blue"}
    for mode in MODES:
        seeds = sorted({r["seed"] for r in rows if r["rm_data"] == mode})
        for seed in seeds:
            mine = [r for r in rows if r["rm_data"] == mode and r["seed"] == seed]
            left.plot([r["N"] for r in mine], [r["gold_reward"] for r in mine], color=colors[mode], alpha=0.35, lw=1)
            right.plot([r["N"] for r in mine], [r["flaw_share"] for r in mine], color=colors[mode], alpha=0.35, lw=1)
        if seeds:  # the mean over seeds, thick
            ns = sorted({r["N"] for r in rows if r["rm_data"] == mode})
            for ax, key in ((left, "gold_reward"), (right, "flaw_share")):
                mean = [sum(r[key] for r in rows if r["rm_data"] == mode and r["N"] == n) / len(seeds) for n in ns]
                ax.plot(ns, mean, color=colors[mode], lw=2.2, label=f"{mode} (mean of {len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        mine = [r for r in rows if r["rm_data"] == mode]
        if mine:  # the choices that are neither sorted nor flawed (wrong digits, other orders), mean, dashed
            ns = sorted({r["N"] for r in mine})
            other = [sum(1 - r["sorted_share"] - r["flaw_share"] for r in mine if r["N"] == n) / len(seeds) for n in ns]
            right.plot(ns, other, color=colors[mode], lw=1.6, ls="--")
    right.plot([], [], color="gray", lw=2.2, label="flawed (largest digit first)")
    right.plot([], [], color="gray", lw=1.6, ls="--", label="neither sorted nor flawed")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N (Best-of-N over samples of the SFT model)")
        ax.grid(alpha=0.3)
    left.set_ylabel("gold reward of the choice")
    right.set_ylabel("share of the choices")
    left.set_title(f"afd_llm.py, embedded task ({sweep})")
    right.set_title("what Best-of-N chooses")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", choices=list(SWEEPS), default="main")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=MODES)
    parser.add_argument("--runs_dir", default=os.path.join(ROOT, "runs", "afd_curve"))
    parser.add_argument("--out_dir", default=os.path.join(ROOT, "results", "afd"))
    args = parser.parse_args()
    flags = SWEEPS[args.sweep] + ["--num_threads", "1"]
    command = "python afd_llm.py --rm_data <rm_data> --seed <seed> " + " ".join(flags)
    finished = []
    for mode in args.modes:
        for seed in args.seeds:
            name = f"{args.sweep}_{mode}_s{seed}"
            run_dir = os.path.join(args.runs_dir, name)
            if not os.path.exists(os.path.join(run_dir, "metrics.json")):
                cmd = [sys.executable, os.path.join(ROOT, "afd_llm.py"), "--rm_data", mode, "--seed", str(seed), *flags,
                       "--output_dir", args.runs_dir, "--run_name", name]
                if os.path.exists(os.path.join(run_dir, "checkpoint.pt")):
                    cmd = [sys.executable, os.path.join(ROOT, "afd_llm.py"), "--resume", run_dir]
                print(f"[afd_curve] {name}: {' '.join(cmd[1:])}", flush=True)
                started = time.time()
                os.makedirs(args.runs_dir, exist_ok=True)
                with open(os.path.join(args.runs_dir, f"{name}.log"), "a") as log:
                    subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
                print(f"[afd_curve] {name}: done in {time.time() - started:.0f} s", flush=True)
            finished.append((run_dir, mode, seed))
            write_results(args.sweep, finished, args.out_dir, command)
    print(open(os.path.join(args.out_dir, f"bon_curve_{args.sweep}.md")).read())


if __name__ == "__main__":
    main()

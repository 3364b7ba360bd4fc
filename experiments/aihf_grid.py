"""The AIHF paper's central experiment on the embedded task: which method wins where, as the numbers of
demonstrations and preferences vary (demos >> prefs, balanced, prefs >> demos), and with demonstrations of
different quality; plus a sweep of AIHF's own knob, the weights w_demo / w_pref, at one point.

Every run is its own process (`python aihf_llm.py ...`, `rlhf_llm.py`, `dpo_llm.py`), so the job list can run on
any number of cores (--jobs) and resume: a run whose summary exists is skipped, and a killed run starts over.
Each finished run's metrics.json is copied to results/aihf/aihf_grid/<run>.json (committed; the models are
not), and the tables and the plot are rebuilt from those files:

    python experiments/aihf_grid.py --jobs 2                # the grid and the sweep (resumable)
    python experiments/aihf_grid.py --only sweep --jobs 2   # just the w_demo / w_pref sweep
    python experiments/aihf_grid.py --report                # tables + plot from the summaries so far

Compute is matched by optimizer steps and generated samples, not by epochs (the data sizes differ 16x):
every policy trained by gradient steps on a dataset gets the same number of steps whatever the data size, and
every RL method the same number of sampled episodes (see METHODS and results/aihf/aihf_grid.md).
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results", "aihf", "aihf_grid")
RUNS = os.path.join(ROOT, "runs", "aihf_grid")

SEEDS = (1, 2, 3)
# Where demonstrations outnumber preferences, the methods in contention get two more seeds: three seeds' intervals
# overlap there.
MORE_SEEDS, CONTENDERS = (4, 5), ("sft", "dpo", "rlhf", "rlhf_rm_matched", "aihf_rl_rlhf_start")
COUNTS = (100, 400, 1600)  # demonstrations x preferences: a 3 x 3 grid
# Demonstration quality (share with the systematic flaw, share with random swaps); the default is the task's own.
QUALITY = {"default": (0.6, 0.1), "noise_only": (0.0, 0.7), "flaw_only": (0.7, 0.0)}
BATCH = 32
SFT_STEPS, PAIR_STEPS, EPISODES = 150, 120, 2048  # the compute budget of every method (see METHODS)


def epochs(steps, n):
    """Epochs of a script's stage that give about `steps` optimizer steps of BATCH examples on n examples."""
    return max(1, round(steps * BATCH / max(n, BATCH)))


def methods(demos, prefs):
    """name -> (script, flags) at a grid point. The budget, for every data size:
    - SFT: SFT_STEPS steps on the demonstrations (sft, and the SFT stage of dpo and rlhf);
    - dpo: + PAIR_STEPS DPO steps on the preferences; rlhf: + PAIR_STEPS reward-model steps, then PPO on EPISODES
      samples (EPISODES / 64 iterations);
    - AIHF-RL and IRL: no SFT stage (as the authors' code), so they get the SFT and pair steps as extra rounds:
      2 * EPISODES samples, one reward step and one PPO iteration per 64 of them;
    - direct: SFT_STEPS + PAIR_STEPS DPO-form steps (each step: BATCH demo pairs and BATCH preference pairs), one
      reference sample per demonstration; selfplay: the same steps over 2 rounds, one fresh sample per demonstration
      and round;
    - AIHF-RL from RLHF's start (--start rlhf): RLHF's whole budget and PPO settings (SFT_STEPS SFT steps, PAIR_STEPS
      Bradley-Terry steps, PPO on EPISODES samples), plus one reward step per round during PPO (EPISODES / 64 of them);
    - rlhf_rm_matched: RLHF with those extra reward steps as reward-model steps, the control at equal budget."""
    sft = ["--sft_epochs", epochs(SFT_STEPS, demos)]
    steps_direct = SFT_STEPS + PAIR_STEPS
    rounds = EPISODES // 64
    return {
        "sft": ("dpo_llm.py", [*sft, "--num_epochs", 0]),
        "dpo": ("dpo_llm.py", [*sft, "--num_epochs", epochs(PAIR_STEPS, prefs)]),
        "rlhf": ("rlhf_llm.py", [*sft, "--rm_epochs", epochs(PAIR_STEPS, prefs), "--total_episodes", EPISODES]),
        "rlhf_rm_matched": ("rlhf_llm.py", [*sft, "--rm_epochs", epochs(PAIR_STEPS + rounds, prefs),
                                            "--total_episodes", EPISODES]),
        "aihf_rl_rlhf_start": ("aihf_llm.py", ["--algo", "rl", "--start", "rlhf", *sft, "--reward_pretrain_steps", PAIR_STEPS,
                                               "--total_episodes", EPISODES, "--num_eval_demos", 0]),
        "aihf_rl": ("aihf_llm.py", ["--algo", "rl", "--start", "pi0", "--total_episodes", 2 * EPISODES, "--num_eval_demos", 0]),
        "irl": ("aihf_llm.py", ["--algo", "rl", "--start", "pi0", "--w_pref", 0, "--total_episodes", 2 * EPISODES,
                                "--num_eval_demos", 0]),
        "aihf_direct": ("aihf_llm.py", ["--algo", "direct", "--start", "pi0", "--num_epochs", epochs(steps_direct, max(demos, prefs)),
                                        "--num_eval_demos", 0]),
        "aihf_selfplay": ("aihf_llm.py", ["--algo", "selfplay", "--start", "pi0", "--num_rounds", 2,
                                          "--num_epochs", epochs(steps_direct / 2, max(demos, prefs)), "--num_eval_demos", 0]),
    }


def jobs(only):
    """(run name, script, flags) of every run of the grid and the sweep."""
    out = []
    points = [(d, p, "default") for d in COUNTS for p in COUNTS] + [(COUNTS[-1], COUNTS[0], q) for q in ("noise_only", "flaw_only")]
    if only in (None, "grid"):  # seed by seed, so that a partial run already covers every point and method
        for seed in SEEDS + MORE_SEEDS:
            for demos, prefs, quality in points:
                for name, (script, flags) in methods(demos, prefs).items():
                    if seed in SEEDS or demos > prefs and name in CONTENDERS:
                        out.append((f"{quality}_d{demos}_p{prefs}__{name}__s{seed}", script,
                                    task_flags(demos, prefs, quality) + flags + ["--seed", seed]))
    if only in (None, "sweep"):  # AIHF's weights at the demos >> prefs point
        demos, prefs = COUNTS[-1], COUNTS[0]
        for algo in ("rl", "direct", "rl_rlhf_start"):
            base = methods(demos, prefs)[f"aihf_{algo}"][1]
            for w_demo, w_pref in ((1, 0.25), (1, 4), (0.25, 1), (0, 1)):
                for seed in SEEDS:
                    out.append((f"sweep_d{demos}_p{prefs}__aihf_{algo}_wd{w_demo}_wp{w_pref}__s{seed}", "aihf_llm.py",
                                task_flags(demos, prefs, "default") + base + ["--w_demo", w_demo, "--w_pref", w_pref, "--seed", seed]))
        # ... and the reward steps per round on RLHF's start (1 is the grid's own run)
        base = methods(demos, prefs)["aihf_rl_rlhf_start"][1]
        for reward_steps in (0, 3, 10):
            for seed in SEEDS:
                out.append((f"steps_d{demos}_p{prefs}__aihf_rl_rlhf_start_rs{reward_steps}__s{seed}", "aihf_llm.py",
                            task_flags(demos, prefs, "default") + base + ["--reward_steps", reward_steps, "--seed", seed]))
    return out


def task_flags(demos, prefs, quality):
    flaw, noise = QUALITY[quality]
    return ["--task.num_demos", demos, "--task.num_prefs", prefs, "--task.demo_flaw", flaw, "--task.demo_noise", noise,
            "--batch_size", BATCH, "--eval_every", 0, "--save_every", 0, "--num_threads", 1]


def run(job):
    name, script, flags = job
    summary = os.path.join(RESULTS, f"{name}.json")
    if os.path.exists(summary):
        return name, "done"
    out_dir = os.path.join(RUNS, name)
    shutil.rmtree(out_dir, ignore_errors=True)  # a killed run starts over
    started = time.time()
    with open(os.path.join(RUNS, f"{name}.log"), "w") as log:
        proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, flags), "--output_dir", RUNS,
                               "--run_name", name], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        return name, f"FAILED ({proc.returncode}), see {log.name}"
    metrics = json.load(open(os.path.join(out_dir, "metrics.json")))
    metrics["command"] = f"python {script} " + " ".join(map(str, flags))
    metrics["curves"] = curves(out_dir)
    tmp = summary + ".tmp"
    with open(tmp, "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(tmp, summary)
    return name, f"{time.time() - started:.0f} s, gold {metrics.get('gold_reward', float('nan')):.3f}"


# The per-round logs kept with each summary: what the reward and the policy did over a run (the "why" plots)
CURVES = ("objective/gold_reward", "objective/kl", "objective/scores", "reward/pref_accuracy", "reward/demo_margin",
          "reward/demo_accuracy", "reward/pref_margin", "reward_pretrain/accuracy", "rm/accuracy")


def curves(run_dir):
    """{tag: [[step, value], ...]} of the CURVES a run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [[e.step, round(e.value, 5)] for e in events.Scalars(tag)] for tag in CURVES
            if tag in events.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------------------------
# Tables and plot
# ---------------------------------------------------------------------------------------------------------------
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571}  # Student t quantiles (0.975) by degrees of freedom


def mean_ci(values):
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def load_summaries():
    table = {}
    for f in sorted(os.listdir(RESULTS)) if os.path.isdir(RESULTS) else []:
        if f.endswith(".json"):
            point, method, seed = f[:-5].split("__")
            table.setdefault(point, {}).setdefault(method, {})[seed] = json.load(open(os.path.join(RESULTS, f)))
    return table


def report():
    table = load_summaries()
    grid = {point: runs for point, runs in table.items() if not point.startswith(("sweep", "steps"))}
    lines = ["# AIHF vs the methods it generalises, on the embedded task", "",
             "`python experiments/aihf_grid.py --jobs N` (one process per run, 1 torch thread each). Gold reward of the final "
             "policy's sampled responses (temperature 1) on 256 held-out prompts, mean ± 95% CI over seeds (t-distribution); "
             "the best mean of each row in bold. Greedy decoding in the second table. Budgets: see the script's `methods`.", ""]
    for key, title in (("gold_reward", "sampled"), ("gold_reward_greedy", "greedy")):
        all_methods = sorted({m for point in grid.values() for m in point})
        lines += [f"## Gold reward, {title}", "", "| point (demos, prefs) | " + " | ".join(all_methods) + " |",
                  "|---|" + "---|" * len(all_methods)]
        for point in sorted(grid, key=point_order):
            cells = {m: mean_ci([r[key] for r in grid[point][m].values()]) for m in grid[point]}
            best = max(cells, key=lambda m: cells[m][0])
            row = [format_cell(cells[m], m == best) if m in cells else "–" for m in all_methods]
            seeds = {len(grid[point][m]) for m in grid[point]}
            lines.append(f"| {point} (seeds {'/'.join(map(str, sorted(seeds)))}) | " + " | ".join(row) + " |")
        lines.append("")
    lines += verdict_table(grid) + sweep_table(table) + steps_table(table)
    with open(os.path.join(ROOT, "results", "aihf", "aihf_grid.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(grid)
    plot_curves(table)
    print("\n".join(lines))


def welch(a, b):
    """mean(a) - mean(b) and the half-width of its 95% interval (Welch: unequal variances, Satterthwaite's df)."""
    (ma, va, na), (mb, vb, nb) = ((sum(x) / len(x), var(x), len(x)) for x in (a, b))
    se2 = va / na + vb / nb
    if se2 == 0:
        return ma - mb, 0.0
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return ma - mb, t975(df) * math.sqrt(se2)


def var(x):
    m = sum(x) / len(x)
    return sum((v - m) ** 2 for v in x) / (len(x) - 1)


def t975(df):
    """Student t's 0.975 quantile at (fractional) degrees of freedom, interpolated in 1/df between table entries."""
    table = [(1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (6, 2.447), (8, 2.306), (10, 2.228),
             (15, 2.131), (20, 2.086), (30, 2.042), (float("inf"), 1.960)]
    df = max(df, 1.0)
    for (d0, t0), (d1, t1) in zip(table, table[1:]):
        if d0 <= df <= d1:
            w = (1 / d0 - 1 / df) / (1 / d0 - 1 / d1)
            return t0 + w * (t1 - t0)
    return 1.960


AIHF, RIVALS = "aihf_rl_rlhf_start", ("rlhf_rm_matched", "rlhf", "dpo", "sft")


def verdict_table(grid):
    """AIHF-RL from RLHF's start against each rival, per point: the difference of means and its 95% interval (Welch),
    and the verdict it supports: win (interval above 0), loss (below) or tie."""
    lines = [f"## Where learning the reward jointly wins: {AIHF} minus each rival", "",
             "Difference of mean gold reward (sampled / greedy), its 95% interval (Welch), and the verdict: **win** if the "
             "interval lies above 0, *loss* if below, tie otherwise. rlhf_rm_matched is RLHF given AIHF's extra reward "
             "steps as reward-model steps: the comparison at equal budget.", "",
             "| point (demos, prefs) | seeds | " + " | ".join(f"vs {r}" for r in RIVALS) + " |", "|---|---|" + "---|" * len(RIVALS)]
    for point in sorted(grid, key=point_order):
        if AIHF not in grid[point]:
            continue
        cells = []
        for rival in RIVALS:
            if rival not in grid[point] or len(grid[point][rival]) < 2 or len(grid[point][AIHF]) < 2:
                cells.append("–")
                continue
            parts = []
            for key in ("gold_reward", "gold_reward_greedy"):
                d, h = welch([r[key] for r in grid[point][AIHF].values()], [r[key] for r in grid[point][rival].values()])
                verdict = "**win**" if d - h > 0 else "*loss*" if d + h < 0 else "tie"
                parts.append(f"{d:+.3f} ± {h:.3f} {verdict}")
            cells.append(" / ".join(parts))
        lines.append(f"| {point} | {len(grid[point][AIHF])} | " + " | ".join(cells) + " |")
    return lines + [""]


def steps_table(table):
    """Reward steps per round on RLHF's start at the demos >> prefs point (1: the grid's own runs)."""
    demos, prefs = COUNTS[-1], COUNTS[0]
    steps, default = table.get(f"steps_d{demos}_p{prefs}", {}), table.get(f"default_d{demos}_p{prefs}", {})
    if not steps:
        return []
    runs = {1: default.get(AIHF, {})}
    runs.update({int(m.rsplit("_rs", 1)[1]): by_seed for m, by_seed in steps.items()})
    rows = []
    for k, by_seed in sorted(runs.items()):
        if by_seed:
            rows.append(f"| {k} | {len(by_seed)} | {gold_cells(by_seed)} |")
    return [f"## Reward steps per round, {AIHF} at ({demos} demonstrations, {prefs} preference pairs)", "",
            "0 = the reward frozen after its Bradley-Terry pre-training (RLHF inside AIHF's loop); 1 = the grid's runs.", "",
            "| reward steps per round | seeds | gold, sampled | gold, greedy |", "|---:|---:|---|---|", *rows, ""]


def plot_curves(table):
    """What happens during the rounds, per start, at two points: the gold reward of each round's samples, the reward's
    accuracy on the round's preference batch, its demonstration margin over the round's samples, and the KL."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    points = [f"default_d{COUNTS[-1]}_p{COUNTS[0]}", f"default_d{COUNTS[1]}_p{COUNTS[1]}"]
    tags = ("objective/gold_reward", "reward/pref_accuracy", "reward/demo_margin", "objective/kl")
    fig, axes = plt.subplots(len(points), len(tags), figsize=(18, 7), squeeze=False)
    for row, point in enumerate(points):
        for method in ("aihf_rl", AIHF):
            runs = [r["curves"] for r in table.get(point, {}).get(method, {}).values() if "curves" in r]
            for col, tag in enumerate(tags):
                series = [dict(map(tuple, c[tag])) for c in runs if tag in c]
                if not series:
                    continue
                steps = sorted(set.intersection(*(set(s) for s in series)))
                first = steps[0] if steps else 0
                ys = [sum(s[t] for s in series) / len(series) for t in steps]
                axes[row][col].plot([t - first for t in steps], ys, label=f"{method} ({len(series)} seeds)")
                axes[row][col].set_title(f"{point.replace('default_', '')}: {tag}", fontsize=9)
                axes[row][col].set_xlabel("step of the RL stage")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "results", "aihf", "aihf_grid_curves.png"), dpi=100)


def format_cell(mean_and_ci, bold):
    mean, ci = mean_and_ci
    return (f"**{mean:.3f}**" if bold else f"{mean:.3f}") + ("" if math.isnan(ci) else f" ± {ci:.3f}")


def gold_cells(by_seed):
    """'sampled | greedy' table cells: the mean gold reward over the seeds' runs, with its 95% interval."""
    return " | ".join(format_cell(mean_ci([r[k] for r in by_seed.values()]), False) for k in ("gold_reward", "gold_reward_greedy"))


def sweep_table(table):
    """AIHF's weights at the demos >> prefs point: one row per (algo, w_demo, w_pref), the grid's own runs of that
    point as the (1, 1) row."""
    demos, prefs = COUNTS[-1], COUNTS[0]
    sweep, default = table.get(f"sweep_d{demos}_p{prefs}", {}), table.get(f"default_d{demos}_p{prefs}", {})
    if not sweep:
        return []
    rows = []
    for algo in (AIHF, "aihf_rl", "aihf_direct"):
        runs = {(1.0, 1.0): default.get(algo, {})}
        for method, by_seed in sweep.items():
            if method.startswith(algo + "_wd") and (algo == AIHF or not method.startswith(AIHF)):
                w_demo, w_pref = method[len(algo) + 3:].split("_wp")
                runs[(float(w_demo), float(w_pref))] = by_seed
        for (w_demo, w_pref), by_seed in sorted(runs.items(), key=lambda kv: (-kv[0][0] / max(kv[0][1], 1e-9), kv[0])):
            if by_seed:
                rows.append(f"| {algo} | {w_demo:g} | {w_pref:g} | {len(by_seed)} | {gold_cells(by_seed)} |")
    return [f"## The weights w_demo / w_pref at ({demos} demonstrations, {prefs} preference pairs)", "",
            "Same runs and budget as the grid's point; the (1, 1) rows are the grid's own runs of it.", "",
            "| algo | w_demo | w_pref | seeds | gold, sampled | gold, greedy |", "|---|---:|---:|---:|---|---|", *rows, ""]


def point_order(point):
    """The 3 x 3 grid by (demos, prefs), then the other demonstrators, then the weight sweep."""
    kind = 0 if point.startswith("default") else 2 if point.startswith("sweep") else 1
    demos, prefs = int(point.split("_d")[1].split("_p")[0]), int(point.split("_p")[1])
    return kind, demos, prefs, point


def plot(table):
    """Left: every method along the grid's points (ordered by demos / prefs); right: a heat map of the best AIHF
    variant minus the best other method per (demos, prefs), the winner named."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)")
        return
    grid = [p for p in table if p.startswith("default")]
    if not grid:
        return
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    methods_seen = sorted({m for p in grid for m in table[p]})
    order = sorted(grid, key=lambda p: (int(p.split("_d")[1].split("_p")[0]) / int(p.split("_p")[1]), p))
    for m in methods_seen:
        xs, ys, es = [], [], []
        for i, p in enumerate(order):
            if m in table[p]:
                mean, ci = mean_ci([r["gold_reward"] for r in table[p][m].values()])
                xs.append(i), ys.append(mean), es.append(0 if math.isnan(ci) else ci)
        axes[0].errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m, linewidth=2.5 if m.startswith("aihf") else 1.2)
    axes[0].set_xticks(range(len(order)), [p.replace("default_", "").replace("_", "\n") for p in order], fontsize=8)
    axes[0].set_xlabel("grid point, ordered by demos / prefs")
    axes[0].set_ylabel("gold reward (sampled), mean ± 95% CI")
    axes[0].legend(fontsize=8)
    axes[0].set_title("gold reward by method and data mix")
    # heat map: best AIHF variant minus the best other method, per (demos, prefs)
    import numpy as np

    gap = np.full((len(COUNTS), len(COUNTS)), np.nan)
    winners = {}
    for p in grid:
        d, q = int(p.split("_d")[1].split("_p")[0]), int(p.split("_p")[1])
        means = {m: mean_ci([r["gold_reward"] for r in table[p][m].values()])[0] for m in table[p]}
        aihf = max((v for m, v in means.items() if m.startswith("aihf")), default=np.nan)
        other = max((v for m, v in means.items() if not m.startswith("aihf")), default=np.nan)
        gap[COUNTS.index(d), COUNTS.index(q)] = aihf - other
        winners[(COUNTS.index(d), COUNTS.index(q))] = max(means, key=means.get)
    image = axes[1].imshow(gap, cmap="RdBu", vmin=-0.15, vmax=0.15, origin="lower")
    for (i, j), w in winners.items():
        axes[1].text(j, i, f"{w}\n{gap[i, j]:+.3f}", ha="center", va="center", fontsize=8)
    axes[1].set_xticks(range(len(COUNTS)), COUNTS)
    axes[1].set_yticks(range(len(COUNTS)), COUNTS)
    axes[1].set_xlabel("preference pairs")
    axes[1].set_ylabel("demonstrations")
    axes[1].set_title("best AIHF minus best other method (winner named)")
    fig.colorbar(image, ax=axes[1])
    fig.tight_layout()
    fig.savefig(os.path.join(ROOT, "results", "aihf", "aihf_grid.png"), dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (one core each)")
    parser.add_argument("--only", choices=["grid", "sweep"], default=None)
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and the plot")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.report:
        return report()
    todo = jobs(args.only)
    if args.list:
        for name, script, flags in todo:
            print(name, script, *flags)
        return print(f"{len(todo)} runs")
    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs(RUNS, exist_ok=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, status in pool.map(run, todo):
            print(f"[{time.strftime('%H:%M:%S')}] {name}: {status}", flush=True)
    report()


if __name__ == "__main__":
    main()

"""True-return curves of aihf_mujoco.py runs: a CSV, a PNG and a markdown summary per environment.

Reads `charts/eval_return` (deterministic policy, true reward) from the TensorBoard events of the given run
folders, groups the runs by (env, algo) from their config.json, and draws each algorithm's mean over seeds with
its min-max band, the expert's return and 90% of it. Runs still in progress are drawn as far as they got.

    pip install matplotlib            # plotting only: not a dependency of the training scripts
    python results/mujoco/plot.py runs/hopper_aihf_s* runs/hopper_rlhf_s* --out results/mujoco/hopper_v5
"""

import argparse
import csv
import json
import os
import sys
from collections import defaultdict

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

COLORS = {"aihf": "tab:red", "rlhf": "tab:blue", "irl": "tab:green", "sac": "tab:gray"}
# knobs that make a run a variant of its algorithm (drawn as its own curve); the rest (seed, run length,
# checkpointing, ...) do not
VARIANT_KNOBS = {"reward_steps": 1, "sac_steps_per_iter": 5000, "reward_lr": 1e-4, "pref_weight": 1.0,
                 "fixed_horizon": False, "bf16": False, "num_demos": 10000, "num_prefs": 20000, "pref_noise": 0.0}


def variant(config):
    """'aihf', or e.g. 'aihf reward_steps=10' for a run that changes a knob from its default."""
    implied = ("pref_weight", "num_prefs") if config["algo"] == "irl" else ()  # irl sets both to 0 itself
    changed = [f"{k}={config[k]}" for k, default in VARIANT_KNOBS.items()
               if k in config and k not in implied and config[k] != default]
    return " ".join([config["algo"], *changed])


def read_run(run_dir):
    """(config, {step: (mean, std)}, the expert's return logged by the run or None) of one run folder."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})  # 0 = keep every point
    acc.Reload()
    tags = acc.Tags()["scalars"]
    expert = acc.Scalars("charts/expert_return")[-1].value if "charts/expert_return" in tags else None
    if "charts/eval_return" not in tags:
        return config, {}, expert
    std = {e.step: e.value for e in acc.Scalars("charts/eval_return_std")} if "charts/eval_return_std" in tags else {}
    # a resumed run may log a step twice: the last value wins
    points = {e.step: (e.value, std.get(e.step, float("nan"))) for e in acc.Scalars("charts/eval_return")}
    if "charts/bc_return" in tags:  # rlhf: the behaviour-cloned policy that SAC starts from, drawn at step 0
        points[0] = (acc.Scalars("charts/bc_return")[-1].value, float("nan"))
    return config, points, expert


def write_table(path, env_id, curves, expert, expert_source):
    """Markdown summary: per algorithm, the return at the last step every seed reached, across seeds."""
    lines = [f"{env_id}: true return of the deterministic policy (10 episodes per eval), at the last step all seeds "
             f"reached; expert {expert:.0f} {expert_source}" if expert else f"{env_id}",
             "", "| algo | seeds | SAC steps | return (mean ± std over seeds) | per seed | % of expert |",
             "|---|---|---|---|---|---|"]
    for (_, algo), seeds in sorted(curves.items()):
        reached = [max(pts) for pts in seeds.values() if pts]
        if not reached:
            continue
        step = min(reached)
        finals = [pts[step][0] for pts in seeds.values() if step in pts]
        mean, std = float(np.mean(finals)), float(np.std(finals))
        pct = f"{100 * mean / expert:.0f}%".replace("-0%", "0%") if expert else "-"  # a rounded -0.04% reads 0%
        lines.append(f"| {algo} | {len(finals)} | {step // 1000}k | {mean:.0f} ± {std:.0f} | "
                     f"{', '.join(f'{v:.0f}' for v in finals)} | {pct} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (runs/<name>)")
    p.add_argument("--out", required=True, help="output prefix: writes <out>.csv, <out>.png, <out>.md")
    p.add_argument("--expert_returns", default="experts/returns.json", help="expert returns table (dashed line)")
    a = p.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plotting needs matplotlib: pip install matplotlib")

    curves = defaultdict(dict)  # (env, algo) -> {seed: {step: (mean, std)}}
    rows, env_ids, run_expert_return = [], set(), None
    for run_dir in a.runs:
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            sys.exit(f"error: {run_dir} is not a run folder (no config.json); pass runs/<name> folders")
        config, points, run_expert = read_run(run_dir)
        env_ids.add(config["env_id"])
        name = variant(config)
        curves[(config["env_id"], name)][config["seed"]] = points
        run_expert_return = run_expert_return if run_expert_return is not None else run_expert
        for step in sorted(points):
            rows.append(dict(run=os.path.basename(run_dir.rstrip("/")), env_id=config["env_id"], algo=name,
                             seed=config["seed"], step=step, eval_return_mean=round(points[step][0], 1),
                             eval_return_std=round(points[step][1], 1)))
    if len(env_ids) != 1:
        sys.exit(f"error: the runs mix environments {sorted(env_ids)}; plot one environment per call")
    env_id = env_ids.pop()

    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        w.writeheader()
        w.writerows(rows)

    fig, ax = plt.subplots(figsize=(7, 4.2))
    variant_styles = iter(["--", ":", "-.", (0, (5, 1, 1, 1))] * 4)
    for (_, algo), seeds in sorted(curves.items()):
        # mean over the seeds that reached each step (a band of one seed is just its line)
        steps = sorted(set().union(*[set(pts) for pts in seeds.values()]))
        vals = [[pts[s][0] for pts in seeds.values() if s in pts] for s in steps]
        mean = np.array([np.mean(v) for v in vals])
        base = algo.split()[0]
        style = "-" if algo == base else next(variant_styles)  # variants: the algorithm's colour, other dashes
        label = f"{algo} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
        ax.plot(np.array(steps) / 1e3, mean, style, color=COLORS.get(base), label=label)
        ax.fill_between(np.array(steps) / 1e3, [min(v) for v in vals], [max(v) for v in vals],
                        color=COLORS.get(base), alpha=0.2 if algo == base else 0.1, linewidth=0)
    # the expert's return as the first run measured it (10 evaluation episodes, seeded by the run's seed); else the
    # shipped expert's (sac runs load no expert)
    expert, expert_source = run_expert_return, "over 10 evaluation episodes (charts/expert_return of the first run)"
    if expert is None and os.path.isfile(a.expert_returns):
        with open(a.expert_returns) as f:
            expert, expert_source = json.load(f).get(f"{env_id}.pt", {}).get("return_mean"), f"({a.expert_returns})"
    if expert is not None:
        ax.axhline(expert, color="black", linestyle="--", linewidth=1, label=f"expert ({expert:.0f})")
        ax.axhline(0.9 * expert, color="black", linestyle=":", linewidth=1, label="90% of expert")
    write_table(a.out + ".md", env_id, curves, expert, expert_source)
    ax.set_xlabel("SAC env steps (thousands)")
    ax.set_ylabel("true return (deterministic policy, 10 episodes)")
    ax.set_title(f"{env_id}: true return vs SAC steps (mean over seeds, min-max band)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=110)
    print(f"wrote {a.out}.csv ({len(rows)} rows), {a.out}.png and {a.out}.md")


if __name__ == "__main__":
    main()

"""True-return curves of aihf_mujoco.py runs: a CSV, a PNG and a markdown table per environment, and its rows of
results/mujoco/summary.csv (one row per environment and method).

Reads `charts/eval_return` (deterministic policy, true reward) from the TensorBoard events of the given run
folders, groups the runs by (env, method) from their config.json, and draws each method's mean over seeds with its
min-max band, the expert's return and 90% of it. Runs still in progress are drawn as far as they got. Runs that are
only kept as curves in an earlier CSV of this script come in with --csv (a run folder of the same name wins).
Beside the final evaluation, every table gives the mean over the last 10% of each run's evaluations (last10),
which one evaluation alone can miss either way.

    pip install matplotlib            # plotting only: not a dependency of the training scripts
    python experiments/mujoco/plot.py runs/hopper_aihf_s* runs/hopper_rlhf_s* --out results/mujoco/hopper_v5
    python experiments/mujoco/plot.py runs/walker2d_aihf_* --csv results/mujoco/walker2d_v5_aihf_vs_rlhf_300k.csv \
        --csv_method rlhf --out results/mujoco/walker2d_v5_aihf_vs_rlhf_300k
"""

import argparse
import csv
import json
import math
import os
import sys
from collections import defaultdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
COLORS = {"aihf": "tab:red", "rlhf": "tab:blue", "irl": "tab:green", "ipl": "tab:purple", "sac": "tab:gray"}
# Knobs that make a run a variant of its method (its own curve), with the value a run had before the knob existed or
# the paper's; the rest (seed, run length, checkpointing, ...) do not. A dict value: per --algo.
VARIANT_KNOBS = {"reward_steps": 1, "sac_steps_per_iter": 5000, "reward_lr": 1e-4, "pref_weight": 1.0,
                 "fixed_horizon": False, "bf16": False, "num_demos": 10000, "num_prefs": 20000, "pref_noise": 0.0,
                 "termination": "replay", "demo_actions": "mean", "reward_pretrain_steps": {"rlhf": 3000, None: 0},
                 "bc_steps": {"rlhf": 10000, None: 0}, "ipl_reg_weight": 0.5, "ipl_replay_weight": 0.5, "ipl_pairs": 16,
                 "ipl_window": 12}
SUMMARY_FIELDS = ["env", "method", "seeds", "sac_steps", "return_mean", "return_std", "last10_mean", "pct_expert",
                  "per_seed"]


def variant(config):
    """'aihf', or e.g. 'aihf reward_steps=10' for a run that changes a knob from its reference value."""
    algo = config["algo"]
    implied = ("pref_weight", "num_prefs") if algo == "irl" else ()  # irl sets both to 0 itself
    if algo != "rlhf" and "reward_pretrain_steps" not in config:
        implied += ("bc_steps",)  # before --bc_steps applied to all methods, only rlhf read it
    if algo not in ("aihf", "irl"):  # knobs of the reward step in the loop
        implied += ("reward_steps", "sac_steps_per_iter", "termination", "pref_weight")
    if algo != "ipl":
        implied += ("ipl_reg_weight", "ipl_replay_weight", "ipl_pairs", "ipl_window")
    changed = []
    for k, ref in VARIANT_KNOBS.items():
        if isinstance(ref, dict):
            ref = ref.get(algo, ref[None])
        if k in config and k not in implied and config[k] != ref:
            changed.append(f"{k}={config[k]}")
    return " ".join([algo, *changed])


def read_run(run_dir):
    """(config, {step: (mean, std)}, the expert's return logged by the run or None) of one run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

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


def read_csv_runs(path, methods):
    """{(run, env, method, seed): {step: (mean, std)}} from a CSV this script wrote (methods: keep only these)."""
    runs = defaultdict(dict)
    with open(path) as f:
        for row in csv.DictReader(f):
            method = row.get("method") or row["algo"]  # older CSVs call the column algo
            if methods and method not in methods:
                continue
            key = (row["run"], row["env_id"], method, int(row["seed"]))
            runs[key][int(row["step"])] = (float(row["eval_return_mean"]), float(row["eval_return_std"]))
    return runs


def seed_stats(points, step):
    """(final return at `step`, mean of the last 10% of the evaluations up to `step`) of one run. Step 0 (rlhf's
    behaviour-cloned start) is not an evaluation of the trained policy."""
    evals = [points[s][0] for s in sorted(points) if 0 < s <= step]
    last = evals[-max(1, math.ceil(len(evals) / 10)):]
    return points[step][0], float(np.mean(last))


def summarise(curves, expert):
    """Per method: {step, per_seed, mean, std, last10, pct, running} at the furthest step its runs reached. Runs that
    have not reached it yet (still going) are left out of the numbers, so a new seed's first evaluations do not cut
    the finished seeds' row short; `running` counts them."""
    out = {}
    for (env_id, method), seeds in sorted(curves.items()):
        reached = [max(pts) for pts in seeds.values() if pts]
        if not reached:
            continue
        step = max(reached)
        per_seed = {seed: seed_stats(pts, step) for seed, pts in sorted(seeds.items()) if step in pts}
        finals = [v[0] for v in per_seed.values()]
        last10s = [v[1] for v in per_seed.values()]
        out[method] = dict(env=env_id, step=step, per_seed=per_seed, running=len(seeds) - len(per_seed),
                           mean=float(np.mean(finals)),
                           std=float(np.std(finals)), last10=float(np.mean(last10s)),
                           pct=100 * float(np.mean(last10s)) / expert if expert else None)
    return out


def pct_text(pct):
    return "-" if pct is None else f"{pct:.0f}%".replace("-0%", "0%")  # a rounded -0.04% reads 0%


def write_table(path, env_id, summary, expert, expert_source):
    """Markdown: per method, the return at the furthest step its runs reached and the mean of the last 10%."""
    lines = [f"{env_id}: true return of the deterministic policy (10 episodes per eval), at the furthest step a "
             f"method's runs reached (runs still short of it: 'running'), and the mean over the last 10% of each "
             f"run's evaluations (last10); "
             + (f"expert {expert:.0f} {expert_source}" if expert else "no expert return"),
             "", "| method | seeds | SAC steps | final return (mean ± std over seeds) | last10 (mean over seeds) | "
                 "% of expert (last10) | per seed: final / last10 |", "|---|---|---|---|---|---|---|"]
    for method, s in summary.items():
        per_seed = ", ".join(f"{f:.0f} / {l:.0f}" for f, l in s["per_seed"].values())
        seeds = f"{len(s['per_seed'])}" + (f" (+{s['running']} running)" if s["running"] else "")
        lines.append(f"| {method} | {seeds} | {s['step'] // 1000}k | {s['mean']:.0f} ± {s['std']:.0f} | "
                     f"{s['last10']:.0f} | {pct_text(s['pct'])} | {per_seed} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def update_summary(path, env_id, summary):
    """Replace this environment's rows of summary.csv (one row per env and method), keep the others."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r["env"] != env_id]
    for method, s in summary.items():
        rows.append(dict(env=env_id, method=method, seeds=len(s["per_seed"]), sac_steps=s["step"],
                         return_mean=round(s["mean"], 1), return_std=round(s["std"], 1), last10_mean=round(s["last10"], 1),
                         pct_expert="" if s["pct"] is None else round(s["pct"], 1),
                         per_seed=" ".join(f"{seed}:{f:.0f}/{l:.0f}" for seed, (f, l) in s["per_seed"].items())))
    rows.sort(key=lambda r: (r["env"], r["method"]))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        w.writeheader()
        w.writerows(rows)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run folders (runs/<name>)")
    p.add_argument("--out", required=True, help="output prefix: writes <out>.csv, <out>.png, <out>.md")
    p.add_argument("--csv", action="append", default=[], help="curves of runs kept only in an earlier CSV of this script")
    p.add_argument("--csv_method", action="append", default=[], help="read only these methods from --csv (default all)")
    p.add_argument("--rename", action="append", default=[], metavar="'LONG NAME->SHORT'",
                   help="show a method under a shorter name in the tables, the curves and summary.csv")
    p.add_argument("--max_step", type=int, help="draw and tabulate evaluations up to this SAC step only")
    p.add_argument("--expert_return", type=float, help="the expert's return, where no run folder logs one (--csv only)")
    p.add_argument("--expert_returns", default="experts/returns.json", help="else this table's expert return")
    p.add_argument("--summary", default=os.path.join(ROOT, "results", "mujoco", "summary.csv"),
                   help="summary CSV whose rows of this environment are replaced ('' for none: an ablation's plot)")
    a = p.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("error: plotting needs matplotlib: pip install matplotlib")
    renames = dict(r.split("->", 1) for r in a.rename)

    runs = {}  # (run, env, method, seed) -> {step: (mean, std)}
    run_expert_return = None
    for path in a.csv:
        if not os.path.isfile(path):
            sys.exit(f"error: --csv {path}: no such file")
        runs.update(read_csv_runs(path, set(a.csv_method)))
    for run_dir in a.runs:
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            sys.exit(f"error: {run_dir} is not a run folder (no config.json); pass runs/<name> folders")
        config, points, run_expert = read_run(run_dir)
        name = os.path.basename(run_dir.rstrip("/"))
        runs = {k: v for k, v in runs.items() if k[0] != name}  # a run folder replaces the CSV copy of its curve
        runs[(name, config["env_id"], variant(config), config["seed"])] = points
        run_expert_return = run_expert_return if run_expert_return is not None else run_expert
    if not runs:
        sys.exit("error: no runs: pass run folders or --csv")
    env_ids = {k[1] for k in runs}
    if len(env_ids) != 1:
        sys.exit(f"error: the runs mix environments {sorted(env_ids)}; plot one environment per call")
    env_id = env_ids.pop()

    curves, rows = defaultdict(dict), []  # (env, method) -> {seed: {step: (mean, std)}}
    for (name, env, method, seed), points in sorted(runs.items()):
        if a.max_step is not None:  # e.g. the 300k table of a run that went on to 1M
            points = {s: v for s, v in points.items() if s <= a.max_step}
        method = renames.get(method, method)
        curves[(env, method)][seed] = points
        for step in sorted(points):
            rows.append(dict(run=name, env_id=env, method=method, seed=seed, step=step,
                             eval_return_mean=round(points[step][0], 1), eval_return_std=round(points[step][1], 1)))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        w.writeheader()
        w.writerows(rows)

    # the expert's return as the first run measured it (10 evaluation episodes, seeded by the run's seed); else the
    # shipped expert's (sac runs, and curves read from a CSV, carry none)
    expert, expert_source = run_expert_return, "over 10 evaluation episodes (charts/expert_return of the first run)"
    if expert is None and a.expert_return is not None:
        expert, expert_source = a.expert_return, "over 10 evaluation episodes (as the seed-1 runs measure it)"
    if expert is None and os.path.isfile(a.expert_returns):
        with open(a.expert_returns) as f:
            expert, expert_source = json.load(f).get(f"{env_id}.pt", {}).get("return_mean"), f"({a.expert_returns})"
    summary = summarise(curves, expert)
    write_table(a.out + ".md", env_id, summary, expert, expert_source)
    if a.summary:
        update_summary(a.summary, env_id, summary)

    fig, ax = plt.subplots(figsize=(10, 4.2))
    variant_styles = iter(["--", ":", "-.", (0, (5, 1, 1, 1)), (0, (3, 1, 1, 1, 1, 1))] * 4)
    for (_, method), seeds in sorted(curves.items()):
        # mean over the seeds that reached each step (a band of one seed is just its line)
        steps = sorted(set().union(*[set(pts) for pts in seeds.values()]))
        vals = [[pts[s][0] for pts in seeds.values() if s in pts] for s in steps]
        mean = np.array([np.mean(v) for v in vals])
        base = method.split()[0].lower()
        style = "-" if "=" not in method else next(variant_styles)  # variants (a changed knob): other dashes
        label = f"{method} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"
        ax.plot(np.array(steps) / 1e3, mean, linestyle=style, color=COLORS.get(base), label=label)
        ax.fill_between(np.array(steps) / 1e3, [min(v) for v in vals], [max(v) for v in vals],
                        color=COLORS.get(base), alpha=0.2 if style == "-" else 0.1, linewidth=0)
    if expert is not None:
        ax.axhline(expert, color="black", linestyle="--", linewidth=1, label=f"expert ({expert:.0f})")
        ax.axhline(0.9 * expert, color="black", linestyle=":", linewidth=1, label="90% of expert")
    ax.set_xlabel("SAC env steps (thousands)")
    ax.set_ylabel("true return (deterministic policy, 10 episodes)")
    ax.set_title(f"{env_id}: true return vs SAC steps (mean over seeds, min-max band)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out + ".png", dpi=110)
    print(f"wrote {a.out}.csv ({len(rows)} rows), {a.out}.png, {a.out}.md" + (f" and this env's rows of {a.summary}"
                                                                            if a.summary else ""))


if __name__ == "__main__":
    main()

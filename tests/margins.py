"""Measure the smoke tests' learning checks over seeds and CPU code paths, and write tests/margins.md.

A learning check ("the reward ranks held-out pairs above 0.55") holds on one machine's floats and may not on the next:
another CPU make sums in another order, and a few hundred training steps carry that difference into every number. A
seed change moves the floats as much, so each smoke run (the same flags as its test, from the test module's
SMOKE_RUNS, and the same checks, from its LEARNED) is run here over several seeds and on two code paths of this CPU:
its own and AVX2 (torch's kernels and MKL's held to AVX2; on a CPU without AVX-512 the two are the same). The table
gives each check's bound and the lowest, mean and highest value seen; a bound must sit clearly below the lowest.

    python tests/margins.py                         # every smoke run, seeds 1-5, both code paths (about an hour)
    python tests/margins.py --only dpo --seeds 1 2  # the runs whose name contains "dpo"
    python tests/margins.py --jobs 2                # two runs at a time (each runs on one thread)

Values are kept in tests/margins.json, so a partial run updates its rows of the table and keeps the others.
"""

import argparse
import concurrent.futures
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from importlib import import_module
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
from conftest import Run, run_script  # noqa: E402

LLM_MODULES = ["test_dpo_llm", "test_rlhf_llm", "test_afd_llm", "test_aihf_llm", "test_shared_machinery"]
CODE_PATHS = {"native": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def smoke_runs():
    """(name, module) of every smoke run with learning checks."""
    runs = [(f"{module[5:]}:{name}", module) for module in LLM_MODULES for name in import_module(module).SMOKE_RUNS]
    return runs + [(f"aihf_mujoco:{name}", "test_aihf_mujoco") for name in ("rlhf", "aihf")]


def measure(run, module_name, seed, path):
    """{check: value} of one smoke run at one seed on one code path."""
    module, name = import_module(module_name), run.split(":")[1]
    env = CODE_PATHS[path]
    with tempfile.TemporaryDirectory(prefix="margins_") as tmp:
        tmp = Path(tmp)
        if module_name == "test_aihf_mujoco":
            before = dict(os.environ)
            os.environ.update(env)  # its run() helper takes this process's variables
            try:
                module.run([*module.EXPERT_RUN, "--seed", str(seed), "--run_name", "sac"], tmp)
                module.run([*module.smoke_runs(tmp / "runs" / "sac", tmp)[name], "--seed", str(seed), "--run_name", name],
                           tmp)
            finally:
                os.environ.clear()
                os.environ.update(before)
            out = Run(tmp / "runs" / name)
        else:
            script, flags = module.SMOKE_RUNS[name]
            run_script(script, *flags, "--seed", seed, "--task.cache_dir", tmp / "cache", "--output_dir", tmp,
                       "--run_name", name, env=env)
            out = Run(tmp / name)
        return {what: float(value(out)) for what, value, _ in module.LEARNED[name]}


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def write_table(values, out):
    """values: {run: {path: {seed: {check: value}}}} -> a markdown table, one row per check."""
    import torch
    import transformers

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    lines = ["# Margins of the smoke tests' learning checks", "",
             "Each smoke test asserts that its run learned (value > bound). These are the values of each check over seeds "
             "and two CPU code paths (`native`, and `avx2`: `ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`), "
             "measured by `python tests/margins.py`; the test runs seed 1 on whatever CPU it finds.", "",
             f"Measured on {cpu_name()} ({'AVX-512' if 'avx512f' in flags else 'AVX2, no AVX-512'}), torch "
             f"{torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}.", "",
             "A bound is *clearly inside* the values when it lies at or below both the lowest value seen and the mean "
             "minus three standard deviations: a machine whose floats move the run as much as a seed does then fails it "
             "less than once in several hundred runs (for values spread like a normal distribution). Where every value "
             "is positive, the same rule may hold on their logarithms instead (a KL or a margin spreads in proportion "
             "to its size); the floor column gives the lower of the two.", "",
             "| smoke run | check | bound | runs | lowest | mean ± SD | highest | floor |", "|---|---|---|---|---|---|---|---|"]
    for run, module_name in smoke_runs():
        if run not in values:
            continue
        for what, _, bound in import_module(module_name).LEARNED[run.split(":")[1]]:
            seen = [v[what] for by_seed in values[run].values() for v in by_seed.values() if what in v]
            if not seen:
                continue
            paths = ", ".join(f"{p} seeds {','.join(sorted(s, key=int))}" for p, s in values[run].items())
            low, mean, sd = min(seen), statistics.mean(seen), statistics.stdev(seen) if len(seen) > 1 else float("nan")
            floor = mean - 3 * sd
            if low > 0:  # the same rule on the logarithm, for positive values spread in proportion to their size
                logs = [math.log(v) for v in seen]
                floor = max(floor, math.exp(statistics.mean(logs) - 3 * statistics.stdev(logs)) if len(seen) > 1 else floor)
            bold = "**" if not (bound <= low and bound <= floor) else ""
            lines.append(f"| {run} | {what} | {bold}{bound}{bold} | {len(seen)} ({paths}) | {low:.3f} | {mean:.3f} ± {sd:.3f} | "
                         f"{max(seen):.3f} | {floor:.3f} |")
    both = [(by_path["native"][seed], by_path["avx2"][seed]) for by_path in values.values() if {"native", "avx2"} <= set(by_path)
            for seed in set(by_path["native"]) & set(by_path["avx2"])]
    if both:
        largest = max(abs(a[k] - b[k]) for a, b in both for k in a if k in b)
        lines += ["", f"Where both code paths ran the same smoke run and seed ({len(both)} times), their values differed by "
                      f"at most {largest:.1e}: the vector width moves these runs' floats far less than a seed does, so the "
                      "seeds carry the spread."]
    lines += ["", "A bold bound is not clearly inside the values: it, or its run, must change."]
    Path(out).write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="the smoke runs whose name contains this")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--paths", nargs="+", default=list(CODE_PATHS), choices=list(CODE_PATHS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "margins.md"))
    args = parser.parse_args()
    store = HERE / "margins.json"
    values = json.loads(store.read_text()) if store.exists() else {}
    todo = [(run, module, seed, path) for run, module in smoke_runs() if args.only in run
            for path in args.paths for seed in args.seeds]
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(measure, *job): job for job in todo}
        for future in concurrent.futures.as_completed(futures):
            run, _, seed, path = futures[future]
            try:
                result = future.result()
            except (AssertionError, subprocess.SubprocessError) as e:
                print(f"{run} seed {seed} {path}: FAILED TO RUN: {str(e)[-500:]}", flush=True)
                continue
            values.setdefault(run, {}).setdefault(path, {})[str(seed)] = result
            print(f"{run} seed {seed} {path}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), flush=True)
            store.write_text(json.dumps(values, indent=1, sort_keys=True) + "\n")
    write_table(values, args.out)


if __name__ == "__main__":
    main()

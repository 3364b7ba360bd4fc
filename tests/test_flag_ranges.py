"""Every numeric flag of every script, and every --task.* knob, has a declared valid range that is checked before
anything is built or written. A property test throws out-of-range values (zero, negative, NaN, infinite, huge and
random ones) at each flag and accepts exactly two outcomes: a one-line error with exit code 2 that names the flag,
or a value inside the declared range. Then one real run per LLM script, with many flags at the edges of their
ranges at once, shows that those edges run."""

import glob
import json
import math
import os
import typing
from dataclasses import fields
from importlib import import_module

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sort_task
from conftest import ROOT, fails_in_one_line, run_script

SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")) if not p.endswith("sort_task.py"))
INTS = [0, -1, -(10**9), 10**18]
FLOATS = [0.0, -1.0, -1e-12, math.nan, math.inf, -math.inf, 1e18]


def numeric_fields(config_class):
    """name -> int or float, for each field typed int, float, Optional[int] or Optional[float]."""
    out = {}
    for f in fields(config_class):
        hint = typing.get_type_hints(config_class)[f.name]
        base = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) is typing.Union else [hint]
        if base in ([int], [float]):
            out[f.name] = base[0]
    return out


def in_interval(value, interval):
    low, high = (float(end) for end in interval[1:-1].split(","))
    return (low <= value if interval[0] == "[" else low < value) and (value <= high if interval[-1] == "]" else value < high)


def flags_of(script):
    """(flag name, type, declared interval, how to build the config with it) of every numeric flag of a script."""
    m = import_module(script)
    out = [(name, kind, m.RANGES.get(name), lambda name=name, v=None: m.Args(**{name: v})) for name, kind in numeric_fields(m.Args).items()]
    if "task" in {f.name for f in fields(m.Args)}:  # the LLM scripts: the embedded task's knobs as --task.*
        out += [(f"task.{name}", kind, sort_task.RANGES.get(name),
                 lambda name=name, v=None: m.Args(task=sort_task.SortTaskConfig(**{name: v})))
                for name, kind in numeric_fields(sort_task.SortTaskConfig).items()]
    return m, out


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_numeric_flag_has_a_range(script):
    m, flags = flags_of(script)
    missing = [name for name, _, interval, _ in flags if interval is None]
    assert not missing, f"{script}: no range declared for {missing}"
    stale = set(m.RANGES) - {name for name, *_ in flags}
    assert not stale, f"{script}: ranges declared for flags it does not have: {stale}"
    for name, _, interval, _ in flags:
        assert interval[0] in "[(" and interval[-1] in "])" and len(interval[1:-1].split(",")) == 2, (name, interval)
        low, high = (float(end) for end in interval[1:-1].split(","))
        assert low < high and not (high == math.inf and interval[-1] == "]"), (name, interval)


def nothing_written(directory):
    """What a rejected (or accepted) configuration left in the working directory: it must be nothing. (MuJoCo itself
    logs a model deprecation warning of HalfCheetah to ./MUJOCO_LOG.TXT.)"""
    return [f for f in os.listdir(directory) if f != "MUJOCO_LOG.TXT"]


def check_outcome(m, name, interval, make, value):
    """validate_args either rejects the value in one line that names the flag, or the value is in its range."""
    try:
        args = make(v=value)
    except (TypeError, ValueError):  # the dataclass itself refused it (never the case for plain numbers)
        return
    try:
        m.validate_args(args)
    except SystemExit:  # out of range: the message names the flag; in range, a check across flags may refuse it
        message = fails_in_one_line(lambda: m.validate_args(args))
        assert in_interval(value, interval) or f"--{name}" in message, (name, value, message)
        return
    assert in_interval(value, interval), f"{m.__name__}: --{name} {value} passed validation outside {interval}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_of_range_values_fail_in_one_line(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the scripts' default output and cache folders are relative: they would land here
    m, flags = flags_of(script)
    for name, kind, interval, make in flags:
        for value in INTS if kind is int else FLOATS:
            check_outcome(m, name, interval, make, value)
        if not in_interval(1, interval) or kind is float:  # the edges themselves, where the interval has finite ones
            for end in interval[1:-1].split(","):
                if math.isfinite(float(end)):
                    check_outcome(m, name, interval, make, kind(float(end)))
    assert nothing_written(tmp_path) == []


@pytest.mark.parametrize("script", SCRIPTS)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_values_fail_in_one_line_or_lie_in_range(script, data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m, flags = flags_of(script)
    name, kind, interval, make = data.draw(st.sampled_from(flags))
    value = data.draw(st.integers(-(2**62), 2**62) if kind is int else st.floats(allow_nan=True, allow_infinity=True))
    check_outcome(m, name, interval, make, value)
    assert nothing_written(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# The edges run: one real run per LLM script with many flags at the ends of their ranges at once
# ---------------------------------------------------------------------------------------------------------------
SMALL_TASK = ["--task.num_demos", 16, "--task.num_prefs", 16, "--task.num_eval_prompts", 8, "--task.num_eval_prefs", 4,
              "--batch_size", 8, "--num_threads", 1]
# (Task knobs that shape the base model pi0 -- seed, digits, symbols, base_model_steps -- stay at their defaults here:
# each new value builds a new pi0.)
EDGES = {
    "afd_llm": ["--sft_epochs", 1, "--rm_epochs", 1, "--rm_eval_fraction", 0.5, "--num_rm_samples", 16, "--max_n", 1,
                "--temperature", 1e3, "--response_length", 1, "--forward_batch_size", 1, "--policy_opt", "ppo", "--total_episodes", 8,
                "--rollout_batch_size", 8, "--num_mini_batches", 8, "--num_ppo_epochs", 1, "--gamma", 1e-9, "--lam", 0, "--kl_coef", 0,
                "--vf_coef", 0, "--missing_eos_penalty", 0, "--cliprange", 1e-9, "--cliprange_value", 1e-9,
                "--num_reward_norm_samples", 1, "--target_kl", 1e-9, "--warmup_ratio", 0, "--eval_every", 1, "--save_every", 1,
                "--task.demo_noise", 0, "--task.demo_flaw", 0],
    "aihf_llm": ["--algo", "rl", "--w_demo", 0, "--w_pref", 1e3, "--reward_pretrain_steps", 1, "--reward_steps", 0,
                 "--total_episodes", 16, "--rollout_batch_size", 8, "--num_mini_batches", 8, "--num_ppo_epochs", 1,
                 "--num_eval_demos", 0, "--kl_coef", 0, "--gamma", 1e-9, "--lam", 0, "--response_length", 1,
                 "--temperature", 1e3, "--forward_batch_size", 1, "--sft_epochs", 1, "--save_every", 1, "--eval_every", 1],
    "dpo_llm": ["--sft_epochs", 1, "--num_epochs", 1, "--beta", 1e3, "--label_smoothing", 0.499, "--warmup_ratio", 1.0,
                "--weight_decay", 0, "--max_grad_norm", 1e-9, "--logprob_chunk_size", 1, "--eval_every", 1, "--save_every", 1,
                "--gradient_accumulation_steps", 8, "--task.pref_temperature", 0, "--task.demo_noise", 0.5,
                "--task.demo_flaw", 0.5],
    "rlhf_llm": ["--sft_epochs", 0, "--rm_epochs", 1, "--total_episodes", 8, "--rollout_batch_size", 8, "--num_mini_batches", 8,
                 "--num_ppo_epochs", 1, "--gamma", 1e-9, "--lam", 0, "--kl_coef", 0, "--vf_coef", 0, "--missing_eos_penalty", 0,
                 "--cliprange", 1e-9, "--cliprange_value", 1e-9, "--temperature", 1e-3, "--response_length", 1,
                 "--num_reward_norm_samples", 1, "--forward_batch_size", 1, "--target_kl", 1e-9, "--reward_center_coef", 1e3,
                 "--warmup_ratio", 0, "--eval_every", 1, "--task.demo_noise", 0, "--task.demo_flaw", 0,
                 "--task.pref_temperature", 1e3],
}


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.endswith("_llm")])
def test_edges_of_the_ranges_run(script, tmp_path, task_cache):
    flags = EDGES[script]  # every LLM script lists its edge run here
    run_script(f"{script}.py", *SMALL_TASK, *flags, "--task.cache_dir", task_cache, "--output_dir", tmp_path,
               "--run_name", "edges")
    metrics = json.loads((tmp_path / "edges" / "metrics.json").read_text())
    assert metrics["steps"] > 0 and all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics

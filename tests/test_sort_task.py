"""The embedded task: the gold reward on hand-checked cases, and deterministic construction."""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import sort_task
from conftest import ROOT
from sort_task import SortTask, SortTaskConfig, expert_completion, gold_reward


def test_gold_reward_hand_cases():
    prompt = "sort: 3 1 2 ="
    cases = {
        " 1 2 3": 1.0,            # sorted: all digits, all 3 pairs in order
        " 3 1 2": 1 / 3,          # pairs (3,1) no, (3,2) no, (1,2) yes
        " 3 2 1": 0.0,            # reversed
        " 1 2": 2 / 3,            # 2 of 3 digits, ordered
        " 1 2 3 3": 3 / 4,        # an extra digit: overlap 3 over max(3, 4)
        " 1 x 3": 2 / 3 * 1 / 3,  # a non-digit word: overlap 2/3, only (1,3) of 3 pairs valid and ordered
        "": 0.0,
    }
    got = gold_reward([prompt] * len(cases), list(cases))
    torch.testing.assert_close(got, torch.tensor(list(cases.values()), dtype=torch.float32))


def test_gold_reward_one_word_response_does_not_depend_on_the_batch():
    # A one-word response has no pairs to order; its score is the overlap alone, whatever else is in the batch.
    prompts, responses = ["sort: 3 =", "sort: 2 1 =", "sort: 3 1 2 ="], [" 3", " 1", " 1 2 3"]
    alone = torch.cat([gold_reward([p], [r]) for p, r in zip(prompts, responses)])
    torch.testing.assert_close(alone, torch.tensor([1.0, 0.5, 1.0]))
    torch.testing.assert_close(gold_reward(prompts, responses), alone)
    torch.testing.assert_close(gold_reward(["sort: 3 =", "sort: 3 1 2 ="], [" x", " 1 2 3"]), torch.tensor([0.0, 1.0]))


def test_gold_reward_duplicates_and_flaw():
    # Ties count as ordered; "largest first" loses exactly the n-1 pairs it forms with the rest: 1 - 2/n.
    n = 6
    digits = [4, 0, 4, 9, 2, 7]
    flawed = [9] + sorted(digits)[:-1]
    got = gold_reward([sort_task.format_prompt(digits)] * 2,
                      [sort_task.format_response(sorted(digits)), sort_task.format_response(flawed)])
    torch.testing.assert_close(got, torch.tensor([1.0, 1 - 2 / n]))


def test_expert_flaw_and_noise_shares():
    import random

    cfg = SortTaskConfig(demo_flaw=0.5, demo_noise=0.2)
    rng = random.Random(0)
    kinds = {"sorted": 0, "flaw": 0, "other": 0}
    for _ in range(4000):
        digits = [rng.randrange(10) for _ in range(6)]
        if len(set(digits)) < 6:
            continue
        out = expert_completion(rng, digits, cfg)
        kinds["sorted" if out == sorted(digits) else "flaw" if out == [max(digits)] + sorted(digits)[:-1] else "other"] += 1
    total = sum(kinds.values())
    assert abs(kinds["flaw"] / total - 0.5) < 0.04
    assert abs(kinds["other"] / total - 0.2) < 0.04


@pytest.mark.parametrize("bad", [dict(min_digits=5, max_digits=4), dict(demo_noise=0.6, demo_flaw=0.6),
                                 dict(num_symbols=11), dict(pref_temperature=-1.0)])
def test_validate_rejects(bad):
    with pytest.raises(ValueError, match="--task."):
        sort_task.validate(SortTaskConfig(**bad))


def test_task_is_deterministic(tmp_path):
    """Two builds from scratch (separate caches) give identical pi0 weights and identical datasets, also from
    processes on different thread counts (which change the float sums of a matmul), and leave that count alone."""
    small = dict(seed=3, num_demos=40, num_prefs=24, num_eval_prompts=16, num_eval_prefs=8, base_model_steps=30)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = SortTask(SortTaskConfig(**small, cache_dir=str(tmp_path / "a")))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(3)
        b = SortTask(SortTaskConfig(**small, cache_dir=str(tmp_path / "b")))
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert a.demos.to_dict() == b.demos.to_dict()
    assert a.prefs.to_dict() == b.prefs.to_dict() and a.eval_prompts == b.eval_prompts
    from safetensors.torch import load_file

    wa = load_file(os.path.join(a.model_path, "model.safetensors"))
    wb = load_file(os.path.join(b.model_path, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    c = SortTask(SortTaskConfig(**{**small, "seed": 4}, cache_dir=str(tmp_path / "a")))
    assert c.demos.to_dict() != a.demos.to_dict()


def test_task_shapes_and_labels(task_cache):
    task = SortTask(SortTaskConfig(num_demos=50, num_prefs=200, num_eval_prefs=10, num_eval_prompts=20,
                                   pref_temperature=0.0, cache_dir=task_cache))
    assert set(task.demos.column_names) == {"prompt", "completion"} and len(task.demos) == 50
    assert set(task.prefs.column_names) == {"prompt", "chosen", "rejected"} and len(task.prefs) == 200
    assert len(task.eval_prefs) == 10 and len(task.eval_prompts) == 20
    # A noiseless labeller never prefers the lower-gold response.
    margin = gold_reward(task.prefs["prompt"], task.prefs["chosen"]) - gold_reward(task.prefs["prompt"], task.prefs["rejected"])
    assert (margin >= 0).all() and (margin > 0).float().mean() > 0.5
    # pi0 and its tokenizer load with the Auto classes; pi0 is unaligned (well below the optimum).
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(task.model_path)
    tokenizer = AutoTokenizer.from_pretrained(task.model_path)
    scores = task.evaluate(model, tokenizer)
    assert 0.2 < scores["gold_reward"] < 0.8


def test_default_task_loads_the_shipped_pi0_and_builds_nothing(tmp_path):
    task = SortTask(SortTaskConfig(num_demos=8, num_prefs=8, num_eval_prompts=8, num_eval_prefs=8,
                                   cache_dir=str(tmp_path / "cache")))
    assert task.model_path == sort_task.SHIPPED_PI0 and not (tmp_path / "cache").exists()
    assert not sort_task.uses_shipped_pi0(SortTaskConfig(base_model_steps=599))  # a knob that shapes pi0 builds one
    assert sort_task.uses_shipped_pi0(SortTaskConfig(num_demos=5, demo_flaw=0.2, pref_temperature=1.0))  # data knobs don't


@pytest.mark.parametrize("script", ["dpo_llm", "rlhf_llm", "afd_llm", "aihf_llm"])
def test_shipped_pi0_is_checked_by_its_hash(script, tmp_path, monkeypatch):
    """A changed, truncated or missing file of the shipped pi0 stops the task before anything is built or written,
    in one line that names the fix; a task variant, which builds its own pi0, does not need the folder."""
    import importlib

    from conftest import fails_in_one_line

    copy = tmp_path / "sort_task_pi0"
    shutil.copytree(sort_task.SHIPPED_PI0, copy)
    monkeypatch.setattr(sort_task, "SHIPPED_PI0", str(copy))
    sort_task.validate(SortTaskConfig())  # the intact copy passes
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ValueError, match="model.safetensors does not match its SHA-256"):
        sort_task.validate(SortTaskConfig())
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--output_dir", str(tmp_path / "out")])
    assert "git checkout -- sort_task_pi0" in fails_in_one_line(importlib.import_module(script).main, tmp_path / "out")
    weights[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(weights))
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.json is missing: copy the sort_task_pi0/ folder"):
        sort_task.validate(SortTaskConfig())
    sort_task.validate(SortTaskConfig(seed=5))


VARIANT = dict(seed=3, num_demos=8, num_prefs=8, num_eval_prompts=8, num_eval_prefs=8, base_model_steps=30)


def _build_in_subprocess(cache, **knobs):
    code = ("import sys, sort_task as s; "
            f"print('path', s.base_model_path(s.SortTaskConfig(**{knobs!r}, cache_dir={str(cache)!r})))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_one_build_at_a_time(tmp_path):
    """Processes that need the same new pi0 at once: one builds it, the others wait and load its result."""
    procs = [_build_in_subprocess(tmp_path, **VARIANT) for _ in range(3)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    paths = {line[5:] for out in outputs for line in out.splitlines() if line.startswith("path ")}
    assert len(paths) == 1, outputs
    assert sum(out.count("building the base policy") for out in outputs) == 1, outputs
    assert sorted(os.listdir(tmp_path)) == sorted([".build.lock", os.path.basename(paths.pop())])


def test_killed_build_leaves_nothing_behind(tmp_path):
    """A build killed half-way (SIGKILL, as a crash) leaves its half-built folder; the next build clears it."""
    proc = _build_in_subprocess(tmp_path, **{**VARIANT, "base_model_steps": 100000})
    deadline = time.time() + 120
    while not glob.glob(str(tmp_path / ".building_*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert glob.glob(str(tmp_path / ".building_*")), "the build was not under way when it was killed"
    path = sort_task.base_model_path(SortTaskConfig(**VARIANT, cache_dir=str(tmp_path)))
    assert os.path.exists(os.path.join(path, "config.json")) and not glob.glob(str(tmp_path / ".building_*"))


def test_the_labeller_agrees_with_the_gold_reward_at_its_temperature(task_cache):
    """The task's "human" labels a pair by Bradley-Terry on the gold rewards at --task.pref_temperature: among pairs of
    unequal gold, the share labelled the gold way round is the mean of sigmoid(|gold margin| / T), within sampling
    noise (4 standard errors), at a sharp and at a noisy temperature."""
    for temperature in (0.1, 0.3):
        task = SortTask(SortTaskConfig(num_demos=8, num_prefs=1500, num_eval_prefs=8, num_eval_prompts=8,
                                       pref_temperature=temperature, cache_dir=task_cache))
        margin = gold_reward(task.prefs["prompt"], task.prefs["chosen"]) - gold_reward(task.prefs["prompt"], task.prefs["rejected"])
        margin = margin[margin != 0]
        p = torch.sigmoid(margin.abs() / temperature)
        observed, expected = (margin > 0).float().mean().item(), p.mean().item()
        standard_error = (p * (1 - p)).sum().sqrt().item() / len(p)
        assert len(p) > 1000 and abs(observed - expected) < 4 * standard_error, (temperature, observed, expected)
        assert expected > 0.5 + 8 * standard_error  # the two readings differ (a labeller of coin flips would fail)


def test_the_demonstrators_flaw_and_noise_rates_in_the_task(task_cache):
    """The built task's demonstrations carry the flaw and the random swap at the rates the flags say (prompts with
    distinct digits, where the three kinds differ), within 4 standard errors."""
    for flaw, noise in ((0.6, 0.1), (0.2, 0.3)):
        task = SortTask(SortTaskConfig(num_demos=3000, num_prefs=8, num_eval_prefs=8, num_eval_prompts=8, demo_flaw=flaw,
                                       demo_noise=noise, cache_dir=task_cache))
        kinds = []
        for prompt, completion in zip(task.demos["prompt"], task.demos["completion"]):
            digits, out = sort_task.parse_prompt(prompt), [int(w) for w in completion.split()]
            if len(set(digits)) == len(digits):
                ordered = sorted(digits)
                kinds.append("sorted" if out == ordered else "flaw" if out == ordered[-1:] + ordered[:-1] else "swap")
        for kind, rate in (("flaw", flaw), ("swap", noise), ("sorted", 1 - flaw - noise)):
            share = kinds.count(kind) / len(kinds)
            assert abs(share - rate) < 4 * (rate * (1 - rate) / len(kinds)) ** 0.5, (kind, share, rate, len(kinds))

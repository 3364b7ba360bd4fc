"""The embedded task: the gold reward on hand-checked cases, and deterministic construction."""

import os

import pytest
import torch

import sort_task
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

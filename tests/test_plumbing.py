"""The data plumbing around the losses, in every LLM script: what each stage is given, checked on a whole run.

Each script runs once here, in this process, on a tiny variant of the embedded task (seven-digit prompts, so that no
held-out example repeats a training one by chance), with a few of its own functions wrapped to record their arguments.
The tests then check properties a slip in the loop would break while every loss stays right:
- every sequence a model reads ends at its first EOS (training rows, re-centring, scoring, accuracies);
- the reference each DPO-form step and each PPO KL penalty compares against is the model the docstring names:
  at a stage's first step the policy *is* that model, so the implicit rewards and the KL are exactly 0 there, pair by
  pair (a reference of another pair, or of another model, is not);
- every sample is scored at the temperature it was drawn at;
- held-out and evaluation sets share no example, by content, with what the run trains on;
- the preference batches of AIHF-RL's reward steps cover the preference set as the schedule says, round after round;
- each stage's optimizer gets its own learning rate, the warm-up and the gradient clipping the flags say.
"""

import inspect
import math
import sys
from importlib import import_module

import pytest
import torch

from conftest import Run

# The task variant (pi0 built in a few seconds) and the run's own knobs at values no default has, so that a stage that
# reads another stage's flag is seen.
TASK = ["--task.min_digits", 7, "--task.max_digits", 7, "--task.base_model_steps", 60, "--task.num_demos", 96,
        "--task.num_prefs", 64, "--task.num_eval_prompts", 16, "--task.num_eval_prefs", 16, "--num_threads", 1,
        "--eval_every", 0]
LR = {"sft_learning_rate": 1.1e-4, "rm_learning_rate": 1.3e-4, "learning_rate": 1.7e-5}
MAX_GRAD_NORM, WARMUP_RATIO, TEMPERATURE = 0.37, 0.3, 0.63
OPTIM = ["--max_grad_norm", MAX_GRAD_NORM, "--warmup_ratio", WARMUP_RATIO]
RL = ["--temperature", TEMPERATURE, "--forward_batch_size", 8]
PI0 = ["--start", "pi0"]  # each stage by its own flag, none from --start's defaults
RUNS = {  # name: (module, flags, the learning-rate flag of each new_optimizer call, in order)
    "aihf_rl": ("aihf_llm", [*PI0, "--algo", "rl", "--sft_epochs", 1, "--reward_pretrain_steps", 2, "--reward_steps", 2,
                             "--total_episodes", 64, "--rollout_batch_size", 16, "--batch_size", 8, "--num_ppo_epochs", 1,
                             "--gradient_accumulation_steps", 2, "--num_eval_demos", 16, *RL],
                ["sft_learning_rate", "rm_learning_rate", "learning_rate"]),
    "aihf_direct": ("aihf_llm", [*PI0, "--algo", "direct", "--sft_epochs", 1, "--batch_size", 8, "--gradient_accumulation_steps", 2,
                                 "--num_eval_demos", 16, *RL], ["sft_learning_rate", "learning_rate"]),
    "aihf_selfplay": ("aihf_llm", [*PI0, "--algo", "selfplay", "--num_rounds", 2, "--batch_size", 8, "--num_eval_demos", 16, *RL],
                      ["learning_rate", "learning_rate"]),
    "dpo": ("dpo_llm", ["--sft_epochs", 1, "--num_epochs", 1, "--batch_size", 8, "--gradient_accumulation_steps", 2],
            ["sft_learning_rate", "learning_rate"]),
    "rlhf": ("rlhf_llm", ["--sft_epochs", 1, "--rm_epochs", 1, "--batch_size", 8, "--total_episodes", 32,
                          "--rollout_batch_size", 16, "--num_mini_batches", 2, "--num_reward_norm_samples", 16, *RL],
             ["sft_learning_rate", "rm_learning_rate", "learning_rate"]),
    "afd": ("afd_llm", ["--sft_epochs", 1, "--rm_epochs", 1, "--batch_size", 8, "--rm_eval_fraction", 0.25, "--max_n", 2,
                        "--policy_opt", "ppo", "--total_episodes", 32, "--rollout_batch_size", 16, "--num_mini_batches", 2,
                        "--num_reward_norm_samples", 16, *RL], ["sft_learning_rate", "rm_learning_rate", "learning_rate"]),
}
# The functions recorded, where a script has them: every call's arguments by name.
RECORDED = ["generate", "sample_candidates", "policy_logprobs_entropy", "sample_demo_pairs", "reward_step", "center_reward",
            "reward_accuracies", "implicit_reward_accuracies", "sft_batch", "pair_batch", "pair_rows_batch", "pair_logps",
            "response_logits", "new_optimizer"]
# The functions every sequence a model reads passes through: (ids, mask) tensors, or lists of token ids.
READERS = ["hidden_states", "sequence_rewards", "token_values", "pad_right"]
EOS = 1  # the embedded task's tokenizer


def _ends_at_eos(tokens):
    """A token list with nothing after its first EOS: generation pads only after an EOS, so padding kept shows as
    tokens after it. (A pad token elsewhere is one the barely trained pi0 of the task variant sampled: a token.)"""
    return EOS not in tokens or tokens.index(EOS) == len(tokens) - 1


def _caller():
    """The function that called the recorded one: a comprehension counts as the function it sits in (Python 3.12
    inlines comprehensions, 3.11 gives them frames of their own)."""
    frame = sys._getframe(2)
    while frame.f_code.co_name in ("<listcomp>", "<genexpr>", "<dictcomp>", "<setcomp>"):
        frame = frame.f_back
    return frame.f_code.co_name


class Recording:
    def __init__(self, module):
        self.module, self.calls, self.violations = module, {}, []

    def record(self, name):
        original = getattr(self.module, name)
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            call = dict(signature.bind(*args, **kwargs).arguments, caller=_caller())
            self.calls.setdefault(name, []).append(call)
            result = original(*args, **kwargs)
            if name == "generate":
                call["result"] = result
            if name == "new_optimizer":
                call["first_lr"] = result[0].param_groups[0]["lr"]  # after the warm-up's first factor
            return result
        return wrapper

    def check_reader(self, name):
        original = getattr(self.module, name)

        def wrapper(*args, **kwargs):
            if name == "pad_right":
                rows = args[0]
            else:  # (model, ids, mask): the attended tokens of each row
                ids, mask = args[1], args[2]
                rows = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
            # prompts carry no EOS here, so every attended row (prompt + response) must end at its first EOS
            self.violations += [(name, r) for r in rows if not _ends_at_eos(list(r))]
            return original(*args, **kwargs)
        return wrapper

    def clip_spy(self, original):
        def wrapper(parameters, max_norm, *args, **kwargs):
            self.calls.setdefault("clip_grad_norm_", []).append(max_norm)
            return original(parameters, max_norm, *args, **kwargs)
        return wrapper


def run_recorded(name, tmp_path):
    """Run one of RUNS in this process with its recordings; returns (Recording, run folder, the task)."""
    module_name, flags, _ = RUNS[name]
    module = import_module(module_name)
    import sort_task

    recording = Recording(module)
    evaluated, tasks = [], []
    original_sample, original_task = sort_task.sample_responses, sort_task.SortTask

    def sample_spy(model, tokenizer, prompts, *args, **kwargs):
        if tasks:  # the evaluations' prompts, not the pairs the task samples as it is built
            evaluated.append(list(prompts))
        return original_sample(model, tokenizer, prompts, *args, **kwargs)

    def task_spy(cfg):
        tasks.append(original_task(cfg))
        return tasks[-1]

    lrs = {k: v for k, v in LR.items() if hasattr(module.Args, k)}
    argv = [f"{module_name}.py", *map(str, [*TASK, *flags, *OPTIM, *(x for k, v in lrs.items() for x in (f"--{k}", v))]),
            "--task.cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path), "--run_name", name]
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        for attr in ("LOGPROB_KERNEL", "SHARDED"):  # set by setup_torch for its process: give them back afterwards
            if hasattr(module, attr):
                mp.setattr(module, attr, getattr(module, attr))
        for fn in RECORDED:
            if hasattr(module, fn):
                mp.setattr(module, fn, recording.record(fn))
        for fn in READERS:
            if hasattr(module, fn):
                mp.setattr(module, fn, recording.check_reader(fn))
        mp.setattr(torch.nn.utils, "clip_grad_norm_", recording.clip_spy(torch.nn.utils.clip_grad_norm_))

        class AdamW(torch.optim.AdamW):  # every optimizer the script makes, new_optimizer's or its own
            def __init__(self, params, lr, *args, **kwargs):
                if sys._getframe(1).f_globals.get("__name__") == module.__name__:  # (not the task's pi0 build)
                    recording.calls.setdefault("AdamW", []).append(lr)
                super().__init__(params, lr, *args, **kwargs)

        mp.setattr(torch.optim, "AdamW", AdamW)
        mp.setattr(sort_task, "SortTask", task_spy)
        mp.setattr(sort_task, "sample_responses", sample_spy)
        try:
            module.main()
        finally:
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
    recording.calls["evaluated_prompts"] = evaluated
    return recording, tmp_path / name, tasks[0]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = run_recorded(name, tmp_path_factory.mktemp(name))
        return cache[name]
    return get


def _contents(examples):
    """Each example (token lists) as a hashable tuple of tuples."""
    return {tuple(map(tuple, e)) for e in examples}


# ---------------------------------------------------------------------------------------------------------------
# Every sequence ends at its first EOS; every stage's optimizer gets its own flags
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_every_sequence_a_model_reads_ends_at_its_first_eos(recorded, name):
    recording, *_ = recorded(name)
    assert not recording.violations, recording.violations[:3]


@pytest.mark.parametrize("name", list(RUNS))
def test_each_stage_gets_its_own_learning_rate_warmup_and_clipping(recorded, name):
    recording, *_ = recorded(name)
    optimizers = recording.calls["new_optimizer"]
    assert [c["lr"] for c in optimizers] == [LR[flag] for flag in RUNS[name][2]]
    # and AIHF-RL's reward optimizer, the one made outside new_optimizer (constant rate: one step per round)
    own = [LR["rm_learning_rate"]] if name == "aihf_rl" else []
    assert sorted(recording.calls["AdamW"]) == sorted([c["lr"] for c in optimizers] + own)
    for c in optimizers:  # the first step's rate: lr / warm-up steps
        assert c["first_lr"] == pytest.approx(c["lr"] / max(1, int(c["steps"] * WARMUP_RATIO)), rel=1e-6)
    clips = recording.calls["clip_grad_norm_"]
    assert clips and all(c == MAX_GRAD_NORM for c in clips), clips


TRAINING_LOOPS = ("train_sft", "train_dpo", "train_pairwise_reward")  # (not the evaluations)


@pytest.mark.parametrize("name, stages", [
    ("aihf_rl", {"sft_batch": 96 - 16}), ("aihf_direct", {"sft_batch": 96 - 16}), ("dpo", {"sft_batch": 96, "pair_batch": 64}),
    ("rlhf", {"sft_batch": 96, "pair_rows_batch": 64}), ("afd", {"sft_batch": 96, "pair_rows_batch": 96 - 24})])
def test_an_epoch_sees_every_training_example_once(recorded, name, stages):
    """One epoch of SFT (the demonstrations less the held-out ones), of DPO and of the reward model (the preference
    pairs): the batches the loop builds hold every training example exactly once, through the micro-batch split."""
    recording, _, task = recorded(name)
    held_out = _prompt_ids(task, task.eval_prefs["prompt"])  # (rlhf batches the held-out pairs too, once)
    for batcher, count in stages.items():
        examples = [tuple(map(tuple, e)) for c in recording.calls[batcher] if c["caller"] in TRAINING_LOOPS for e in c["examples"]
                    if tuple(e[0]) not in held_out]
        assert len(examples) == count and len(set(examples)) == count, (batcher, len(examples), len(set(examples)))


# ---------------------------------------------------------------------------------------------------------------
# Samples are scored at the temperature they were drawn at; references are the models their docstrings name
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in RUNS if n != "dpo"])  # (DPO samples only for --eval_reward_model, at 1)
def test_samples_are_scored_at_the_temperature_they_were_drawn_at(recorded, name):
    """PPO's rollouts (and the samples its reward is normalised on, or judged by) are drawn and scored at
    --temperature; the implicit-reward forms' reference samples are drawn at 1, as their log-probs are plain."""
    recording, *_ = recorded(name)
    drawn = [c.get("temperature") or c["run"].args.temperature for c in recording.calls["generate"]]  # (None: --temperature)
    scored = {c["temperature"] for c in recording.calls.get("policy_logprobs_entropy", [])}
    if name in ("aihf_direct", "aihf_selfplay"):
        assert drawn and set(drawn) == {1.0} and not scored
    else:
        assert drawn and set(drawn) == {TEMPERATURE} and scored == {TEMPERATURE}, (drawn, scored)


@pytest.mark.parametrize("name", ["aihf_rl", "rlhf", "afd"])
def test_ppo_starts_at_its_kl_anchor(recorded, name):
    """PPO's KL penalty is to the model PPO starts from (SFT where SFT ran): the first iteration's KL is exactly 0."""
    _, run_dir, _ = recorded(name)
    kl = Run(run_dir).scalars("objective/kl")
    assert kl and kl[0][1] == pytest.approx(0.0, abs=1e-5) and kl[-1][1] != 0.0, kl


@pytest.mark.parametrize("name, tags", [("dpo", ["rewards/chosen", "rewards/rejected"]),
                                        ("aihf_direct", ["reward/demo_margin", "rewards/margins"]),
                                        ("aihf_selfplay", ["reward/demo_margin", "rewards/margins"])])
def test_implicit_rewards_start_at_zero_pair_by_pair(recorded, name, tags):
    """A DPO-form stage's reference is the policy as the stage (each self-play round) starts, so at its first step
    every pair's implicit reward is exactly 0 and its loss exactly log 2 (times the pair's weight; the weights of a
    step sum to w_demo + w_pref, DPO's to 1). A reference of another model (pi0 instead of SFT) moves the mean rewards;
    a pair given another pair's reference log-probs keeps the means at 0 but not each pair's loss: -log sigmoid is
    convex, so the step's loss rises above log 2. With two micro-batches per step (dpo, direct), also through the
    micro-batch split."""
    _, run_dir, _ = recorded(name)
    run = Run(run_dir)
    weights = 1.0 if name == "dpo" else 2.0  # w_demo = w_pref = 1
    # the first step of each round: the first logged one, and each that follows the previous round's last right away
    steps = sorted({s for s, _ in run.scalars("loss")})
    firsts = steps[:1] + [s for s, before in zip(steps[1:], steps) if s == before + 1]
    assert len(firsts) == (2 if name == "aihf_selfplay" else 1), steps
    losses = dict(run.scalars("loss"))
    for first in firsts:
        assert losses[first] == pytest.approx(weights * math.log(2), abs=1e-5), (first, losses)
    for tag in tags:
        values = dict(run.scalars(tag))
        for first in firsts:
            assert values[first] == pytest.approx(0.0, abs=1e-4), (tag, first, values)
        assert any(abs(v) > 1e-3 for v in values.values()), (tag, values)  # and they move once it trains


# ---------------------------------------------------------------------------------------------------------------
# Held-out data is held out
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(RUNS))
def test_gold_reward_is_measured_on_held_out_prompts(recorded, name):
    recording, _, task = recorded(name)
    evaluated = {p for prompts in recording.calls["evaluated_prompts"] for p in prompts}
    training = set(task.demos["prompt"]) | set(task.prefs["prompt"])
    assert evaluated == set(task.eval_prompts) and not evaluated & training


def test_aihf_rl_reward_accuracies_are_measured_on_held_out_data(recorded):
    """reward_demo_accuracy and reward_pref_accuracy: no held-out demonstration or pair is one the run trains on."""
    recording, *_ = recorded("aihf_rl")
    (call,) = recording.calls["reward_accuracies"]
    trained_demos = _contents(e for c in recording.calls["sft_batch"] for e in c["examples"])
    trained_demos |= _contents(d[:2] for c in recording.calls["reward_step"] for d in c["demo_pairs"])
    trained_pairs = _contents(p for c in recording.calls["reward_step"] for p in c["pref_pairs"])
    assert len(call["eval_demos"]) == 16 and not _contents(call["eval_demos"]) & trained_demos
    assert len(call["eval_pairs"]) == 16 and not _contents(call["eval_pairs"]) & trained_pairs


@pytest.mark.parametrize("name", ["aihf_direct", "aihf_selfplay"])
def test_implicit_reward_accuracies_are_measured_on_held_out_data(recorded, name):
    recording, _, task = recorded(name)
    data = recording.calls["implicit_reward_accuracies"][-1]["data"]
    trained = _contents(p[:2] for p in data["demo_pairs"])
    trained |= _contents(e for c in recording.calls.get("sft_batch", []) for e in c["examples"])
    assert data["eval_demo_pairs"] and not _contents(p[:2] for p in data["eval_demo_pairs"]) & trained
    assert data["eval_pairs"] and not {tuple(p) for p, _, _ in data["eval_pairs"]} & _prompt_ids(task, task.prefs["prompt"])


def test_dpo_and_rlhf_preference_accuracies_are_measured_on_held_out_pairs(recorded):
    """DPO's held-out preference accuracy and the reward model's: on the task's held-out pairs, none of them trained on."""
    recording, _, task = recorded("dpo")
    held_out, trained = _prompt_ids(task, task.eval_prefs["prompt"]), _prompt_ids(task, task.prefs["prompt"])
    scored = {tuple(p) for c in recording.calls["pair_logps"] if c["caller"] == "preference_accuracy" for p, _, _ in c["pairs"]}
    assert scored == held_out and not scored & trained
    recording, _, task = recorded("rlhf")
    batched = {caller: [tuple(e[0]) for c in recording.calls["pair_rows_batch"] if c["caller"] == caller for e in c["examples"]]
               for caller in ("train_reward_model", "train_pairwise_reward")}  # its held-out accuracy's batches; its training
    assert set(batched["train_reward_model"]) == held_out and len(batched["train_reward_model"]) == len(held_out)
    assert set(batched["train_pairwise_reward"]) == trained and len(batched["train_pairwise_reward"]) == len(trained)


def test_afd_discriminator_accuracy_and_best_of_n_are_measured_on_held_out_prompts(recorded):
    recording, _, task = recorded("afd")
    trained = {tuple(e[0]) for c in recording.calls["pair_rows_batch"] for e in c["examples"]}
    held_out = {tuple(p) for p, _ in recording.calls["response_logits"][0]["examples"]}
    assert trained and held_out and not held_out & trained
    (call,) = recording.calls["sample_candidates"]  # Best-of-N, whose gold reward is the final policy's
    chosen_from = {tuple(q[m.bool()].tolist()) for q, m in zip(call["queries"].cpu(), call["query_mask"].cpu())}
    assert chosen_from == _prompt_ids(task, task.eval_prompts)


def _prompt_ids(task, prompts):
    from transformers import AutoTokenizer

    return {tuple(ids) for ids in AutoTokenizer.from_pretrained(task.model_path)(list(prompts))["input_ids"]}


# ---------------------------------------------------------------------------------------------------------------
# AIHF-RL's rounds: each its own prompts and preference batches, each demonstration with its own prompt
# ---------------------------------------------------------------------------------------------------------------
def test_aihf_rl_reward_steps_cover_the_preferences_round_after_round(recorded):
    """The reward steps' preference batches run through the preference set as cycled_batches schedules it: each pass
    of (pairs // batch) consecutive steps, across rounds, holds that many distinct batches of distinct training pairs."""
    recording, *_ = recorded("aihf_rl")
    batches = [c["pref_pairs"] for c in recording.calls["reward_step"]]
    per_pass = 64 // 8
    assert len(batches) == 4 * 2 and len(batches) % per_pass == 0  # 4 rounds x 2 reward steps: one pass
    for start in range(0, len(batches), per_pass):
        seen = [tuple(map(tuple, p)) for batch in batches[start : start + per_pass] for p in batch]
        assert len(seen) == per_pass * 8 and len(set(seen)) == len(seen)


def test_aihf_rl_rounds_sample_their_own_prompts_and_pair_each_demonstration_with_its_prompt(recorded):
    recording, *_ = recorded("aihf_rl")
    demos = _contents(e for c in recording.calls["sft_batch"] for e in c["examples"])  # one SFT epoch: every one
    rounds = [c["demo_pairs"] for c in recording.calls["reward_step"][::2]]  # 2 reward steps per round, same pairs
    assert len(rounds) == 4 and all(len(r) == 16 for r in rounds)
    for pairs in rounds:
        assert _contents(p[:2] for p in pairs) <= demos  # (prompt, its own demonstration)
    prompts = [frozenset(tuple(p[0]) for p in pairs) for pairs in rounds]
    assert all(a != b for a, b in zip(prompts, prompts[1:]))
    # each demonstration's negative is the policy's sample for that very prompt (this round's rollout)
    rollouts = recording.calls["generate"][: len(rounds)]  # then one more: the final reward_demo_accuracy's samples
    assert len(recording.calls["generate"]) == len(rounds) + 1
    for call, pairs in zip(rollouts, rounds):
        sampled = {}
        for query, mask, response in zip(call["queries"].cpu(), call["query_mask"].cpu(), call["result"].cpu()):
            response = response.tolist()
            sampled[tuple(query[mask.bool()].tolist())] = response[: response.index(EOS) + 1] if EOS in response else response
        assert all(sampled[tuple(p)] == list(sample) for p, _, sample in pairs)

"""aihf_llm.py: the AIHF losses against hand-written formulas, the reductions to RLHF, DPO and SPIN proven on the
same batch (a test may import two scripts; the scripts never import each other), and the script end to end on the
embedded task and on local HH-format data: all three algorithms, bad input, resume."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import aihf_llm as A
import dpo_llm
import rlhf_llm
from conftest import assert_learned, kill_when, make_run, run_script

NO_AUTOCAST = torch.autocast("cpu", enabled=False)
# Tiny but complete: every stage trains, a few rounds of each algorithm.
TINY = ["--task.num_demos", 160, "--task.num_prefs", 96, "--task.num_eval_prompts", 128, "--task.num_eval_prefs", 256,
        "--num_eval_demos", 32, "--batch_size", 16, "--total_episodes", 96, "--rollout_batch_size", 16, "--num_ppo_epochs", 2,
        "--num_epochs", 1, "--eval_every", 0, "--num_threads", 1, "--start", "pi0"]
SMOKE_RUNS = {"rl": ("aihf_llm.py", [*TINY, "--algo", "rl", "--reward_steps", 2, "--rm_learning_rate", 3e-4,
                                      "--total_episodes", 192, "--learning_rate", 2e-4]),
              "direct": ("aihf_llm.py", [*TINY, "--algo", "direct"]),
              "selfplay": ("aihf_llm.py", [*TINY, "--algo", "selfplay", "--num_rounds", 2])}
# What each smoke run must have learned (tests/margins.md has each value over seeds and CPU code paths): the (explicit
# or implicit) reward learned both data sources, held-out demonstrations and pairs ranked above chance, and the policy
# improved on pi0. Selfplay's implicit reward is relative to its last round's reference: it has seen one round of pairs.
_LEARNED_BOTH = [
    ("held-out demonstrations over the policy's samples: accuracy", lambda r: r.m["reward_demo_accuracy"], 0.5),
    ("held-out pairs: accuracy", lambda r: r.m["reward_pref_accuracy"], 0.55),
    ("greedy gold over pi0's", lambda r: r.m["gold_reward_greedy"] - r.m["gold_reward_greedy_init"], 0.05),
]
# AIHF-RL from pi0 is not checked for the policy's gold: in 12 rounds of 16 rollouts its greedy gain over pi0 is within
# seed noise (-0.001 to +0.042 over six seeds). A PPO loop that ascends its loss is caught by the identical-copies test.
LEARNED = {
    "rl": [*_LEARNED_BOTH[:2], ("the reward puts demonstrations above the policy's samples in the last round",
                                lambda r: r.scalars("reward/demo_margin")[-1][1], 0.0)],
    "direct": _LEARNED_BOTH,
    "selfplay": [(what, value, 0.5 if "pairs" in what else bound) for what, value, bound in _LEARNED_BOTH],
}


# ---------------------------------------------------------------------------------------------------------------
# The losses, by hand
# ---------------------------------------------------------------------------------------------------------------
def test_aihf_reward_loss_by_hand():
    demo, sample = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    chosen, rejected = torch.tensor([2.0]), torch.tensor([1.0])
    nll = lambda m: math.log1p(math.exp(-m))  # noqa: E731  -log sigmoid(m)
    loss, demo_term, pref_term = A.aihf_reward_loss(demo, sample, chosen, rejected, w_demo=0.5, w_pref=2.0)
    assert demo_term.item() == pytest.approx((nll(1.0) + nll(-0.5)) / 2)
    assert pref_term.item() == pytest.approx(nll(1.0))
    assert loss.item() == pytest.approx(0.5 * (nll(1.0) + nll(-0.5)) / 2 + 2.0 * nll(1.0))
    # the demo term pushes the reward up on demonstrations and down on the policy's samples
    demo.requires_grad_(), sample.requires_grad_()
    A.aihf_reward_loss(demo, sample, chosen, rejected, 1.0, 0.0)[0].backward()
    assert (demo.grad < 0).all() and (sample.grad > 0).all()
    # a term with weight 0 is left out, so its inputs may be empty
    loss, demo_term, pref_term = A.aihf_reward_loss(torch.zeros(0), torch.zeros(0), chosen, rejected, 0.0, 1.0)
    assert demo_term is None and loss.item() == pytest.approx(nll(1.0))


def test_direct_loss_weights_each_pair():
    policy, ref = torch.tensor([-1.0, -2.0, -3.0, -1.0]), torch.tensor([-1.5, -1.5, -2.0, -2.0])
    weights = torch.tensor([0.25, 0.25, 2.0, 2.0])  # a demo pair and a preference pair
    losses, chosen, rejected = A.aihf_direct_loss(policy, ref, weights, beta=0.5)
    h = [0.5 * ((-1.0 + 1.5) - (-2.0 + 1.5)), 0.5 * ((-3.0 + 2.0) - (-1.0 + 2.0))]
    expected = [0.25 * -math.log(1 / (1 + math.exp(-h[0]))), 2.0 * -math.log(1 / (1 + math.exp(-h[1])))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(chosen - rejected, torch.tensor(h))


# ---------------------------------------------------------------------------------------------------------------
# Reductions: AIHF with one weight at 0 is RLHF's reward step, DPO, or SPIN -- on the same batch
# ---------------------------------------------------------------------------------------------------------------
def _tiny_config(**extra):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=64, pad_token_id=0, **extra)


def _pairs(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randint(2, 40, (int(k),), generator=g).tolist() for k in torch.randint(1, 8, (3,), generator=g))
            for _ in range(n)]


def _grads(loss, model):
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)


def test_direct_pair_weights_make_each_term_a_mean():
    weights = A.direct_pair_weights(2, 3, SimpleNamespace(w_demo=0.3, w_pref=2.0, batch_size=4))
    torch.testing.assert_close(weights, torch.tensor([0.075] * 4 + [0.5] * 6))


def test_center_reward_sets_the_mean_on_the_samples_to_zero():
    from transformers import GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    reward_model = GPTNeoXForSequenceClassification(_tiny_config(num_labels=1)).eval()
    reward_model.config.reward_bias = 5.0  # the previous round's
    ids = torch.randint(2, 40, (6, 7))
    mask = torch.ones_like(ids)
    raw_mean = A.center_reward(reward_model, ids, mask, make_run(A, SimpleNamespace(forward_batch_size=4))).mean().item()
    with torch.no_grad():
        rewards = A.sequence_rewards(reward_model, ids, mask)
    assert rewards.mean().abs() < 1e-5 and rewards.std() > 1e-4
    assert reward_model.config.reward_bias == pytest.approx(raw_mean)


def test_direct_without_demonstrations_is_dpo():
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(_tiny_config()).eval()
    pairs, ref = _pairs(1), torch.randn(8) - 10
    batch = A.pair_batch(pairs, 0)
    args = SimpleNamespace(beta=0.3, loss_type="sigmoid", label_smoothing=0.0, batch_size=4, logprob_chunk_size=5)
    dpo, _, _, _ = dpo_llm.dpo_batch_loss(model, batch, ref, args, NO_AUTOCAST)
    weights = torch.full((8,), 1.0 / args.batch_size)  # w_pref / batch_size on each preference pair, no demo pairs
    aihf, _, _, _ = A.direct_batch_loss(model, batch, ref, weights, args, NO_AUTOCAST)
    torch.testing.assert_close(aihf, dpo)
    for a, b in zip(_grads(aihf, model), _grads(dpo, model)):
        torch.testing.assert_close(a, b)


def test_rl_without_demonstrations_is_rlhf_reward_step():
    from transformers import GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    reward_model = GPTNeoXForSequenceClassification(_tiny_config(num_labels=1)).eval()
    reward_model.config.reward_bias = 0.0
    pairs = _pairs(2)
    ids, mask = rlhf_llm.pair_rows_batch(pairs, 0)
    rewards = rlhf_llm.sequence_rewards(reward_model, ids, mask)
    rlhf = rlhf_llm.reward_model_loss(rewards[0::2], rewards[1::2]).sum() / len(pairs)  # rlhf_llm.py's RM step, batch = the pairs
    aihf, stats = A.reward_batch_loss(reward_model, None, (ids, mask), SimpleNamespace(w_demo=0.0, w_pref=1.0), NO_AUTOCAST)
    torch.testing.assert_close(aihf, rlhf)
    for a, b in zip(_grads(aihf, reward_model), _grads(rlhf, reward_model)):
        torch.testing.assert_close(a, b)
    assert "reward/demo_loss" not in stats and 0 <= stats["reward/pref_accuracy"] <= 1


def test_reward_step_in_micro_batches_is_the_same_step():
    """--gradient_accumulation_steps splits the reward step's demo and preference pairs into micro-batches (memory):
    the parameters after the step and its statistics are those of the one-batch step. The pairs differ in length, so a
    micro-batch's mean weighted by its tokens instead of its pairs would show; so would a missing 1/G."""
    from transformers import GPTNeoXForSequenceClassification

    after = {}
    for G in (1, 2):
        torch.manual_seed(0)
        reward_model = GPTNeoXForSequenceClassification(_tiny_config(num_labels=1)).eval()
        reward_model.config.reward_bias = 0.0
        optimizer = torch.optim.SGD(reward_model.parameters(), lr=0.1)  # the update is the gradient itself
        args = SimpleNamespace(w_demo=0.7, w_pref=1.3, gradient_accumulation_steps=G, max_grad_norm=1e9)
        stats = A.reward_step(make_run(A, args), A.Parallel(reward_model), optimizer, _pairs(5, 4), _pairs(6, 6))
        after[G] = [p.detach().clone() for p in reward_model.parameters()], {k: float(v) for k, v in stats.items()}
    for a, b in zip(after[1][0], after[2][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert after[1][1].keys() == after[2][1].keys() and "reward/demo_margin" in after[1][1]
    for k in after[1][1]:
        assert after[2][1][k] == pytest.approx(after[1][1][k], rel=1e-4, abs=1e-6), k


def test_selfplay_without_preferences_is_spin():
    """w_pref = 0: demonstrations against the reference's own samples, the SPIN loss (Chen et al. 2024), by hand from
    the plain model's full logits."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(_tiny_config()).eval()
    demo_pairs, ref = _pairs(3), torch.randn(8) - 10  # (prompt, demonstration, sample of pi_ref)
    beta = 0.2
    args = SimpleNamespace(beta=beta, logprob_chunk_size=4)
    aihf, _, _, _ = A.direct_batch_loss(model, A.pair_batch(demo_pairs, 0), ref, torch.full((8,), 1.0 / 4), args, NO_AUTOCAST)
    sequences = [p + r for p, y, s in demo_pairs for r in (y, s)]
    ids, mask, targets = A.collate(sequences, [len(p) for p, _, _ in demo_pairs for _ in range(2)], 0)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps = (torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * (targets != -100)).sum(1)
    spin = -F.logsigmoid(beta * ((logps[0::2] - ref[0::2]) - (logps[1::2] - ref[1::2]))).mean()
    torch.testing.assert_close(aihf, spin)
    for a, b in zip(_grads(aihf, model), _grads(spin, model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(task_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("aihf_runs")
    for algo, (script, flags) in SMOKE_RUNS.items():
        run_script(script, *flags, "--task.cache_dir", task_cache, "--output_dir", out, "--run_name", algo)
    return out


@pytest.mark.parametrize("algo", ["rl", "direct", "selfplay"])
def test_smoke_metrics(runs, algo):
    metrics = json.loads((runs / algo / "metrics.json").read_text())
    assert metrics["algo"] == f"aihf_{algo}" and metrics["task"] == "sort" and metrics["seed"] == 1
    steps = {"rl": 192 // 16, "direct": 128 // 16, "selfplay": 2 * 128 // 16}[algo]  # rounds, or DPO-form steps
    assert metrics["steps"] == steps
    for key in ("gold_reward", "gold_reward_greedy", "gold_reward_init"):
        assert 0 <= metrics[key] <= 1
    assert_learned(runs / algo, LEARNED[algo])
    assert (runs / algo / "model" / "config.json").exists()


def test_rl_logs_both_reward_terms(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(runs / "rl"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("reward/demo_margin", "reward/pref_accuracy", "reward/loss", "objective/kl", "objective/entropy",
                "policy/approxkl_avg", "objective/gold_reward"):
        assert tag in tags, tag
    assert (runs / "rl" / "reward_model" / "config.json").exists()


def test_killed_rl_run_resumes_to_the_same_result(runs, task_cache, tmp_path):
    kill_when("aihf_llm.py", *SMOKE_RUNS["rl"][1], "--task.cache_dir", task_cache, "--output_dir", tmp_path,
              "--run_name", "killed", "--save_every", 2,
              lines=["[aihf-rl] checkpoint at round 2"])
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert state["stage"] == "rl" and state["step"] == 2
    run_script("aihf_llm.py", "--resume", tmp_path / "killed")
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    whole = json.loads((runs / "rl" / "metrics.json").read_text())
    for key in ("gold_reward", "gold_reward_greedy", "kl", "reward_pref_accuracy", "reward_demo_accuracy", "steps"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-7), key


def test_killed_selfplay_run_resumes_to_the_same_result(runs, task_cache, tmp_path):
    """Killed in its second round, after the round's samples and reference log-probs were checkpointed."""
    kill_when("aihf_llm.py", *SMOKE_RUNS["selfplay"][1], "--task.cache_dir", task_cache,
              "--output_dir", tmp_path, "--run_name", "killed", "--save_every", 3,
              lines=["[aihf-selfplay] round 2/2 step 1/", "[aihf-selfplay] checkpoint"])
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert state["stage"] == "selfplay" and state["round"] == 1 and state["step"] > 0 and "round_data" in state
    run_script("aihf_llm.py", "--resume", tmp_path / "killed")
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    whole = json.loads((runs / "selfplay" / "metrics.json").read_text())
    for key in ("gold_reward", "gold_reward_greedy", "reward_pref_accuracy", "reward_demo_accuracy", "steps"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-7), key


@pytest.mark.parametrize("algo", ["rl", "direct"])
def test_hh_format_data_and_local_models(algo, tiny_hh, tmp_path):
    proc = run_script("aihf_llm.py", "--algo", algo, "--start", "pi0", "--model_name_or_path", tiny_hh["model"],
                      "--dataset_name", tiny_hh["train"],
                      "--max_length", 200, "--max_prompt_length", 160, "--response_length", 6, "--batch_size", 4,
                      "--total_episodes", 8, "--rollout_batch_size", 4, "--num_eval_demos", 4, "--num_epochs", 1,
                      "--num_threads", 1, "--output_dir", tmp_path, "--run_name", "hh")
    # one jsonl: the last fifth of the 40 pairs held out, then the first half of the rest are demonstrations
    assert "holding out the last 8" in proc.stdout and "the first 16 training pairs; preferences: the other 16" in proc.stdout
    metrics = json.loads((tmp_path / "hh" / "metrics.json").read_text())
    assert metrics["task"] == tiny_hh["train"] and "gold_reward" not in metrics and metrics["steps"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--w_demo", 0, "--w_pref", 0], "--w_demo and --w_pref are both 0"),
    (["--algo", "direct", "--task.num_demos", 16], "demonstrations (--task.num_demos - --num_eval_demos)"),
    (["--algo", "rl", "--start", "pi0", "--task.num_demos", 40, "--w_demo", 0], "demonstration prompts"),
    (["--algo", "direct", "--reward_pretrain_steps", 10], "are for --algo rl"),
    (["--algo", "direct", "--num_rounds", 3], "--num_rounds is for --algo selfplay"),
    (["--w_pref", -1], "--w_pref must be in [0,"),
    (["--demo_fraction", 1.0], "--demo_fraction must be in (0, 1)"),
    (["--algo", "rl", "--total_episodes", 8, "--rollout_batch_size", 16], "--total_episodes 8 is less than one"),
])
def test_bad_inputs_fail_in_one_line(flags, message, task_cache, tmp_path):
    proc = run_script("aihf_llm.py", *flags, "--task.cache_dir", task_cache, "--output_dir", tmp_path / "runs", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_reward_warm_start_then_irl_from_demonstrations_only(task_cache, tmp_path):
    """--w_pref 0 with --reward_pretrain_steps: the warm start reads the preference pairs though the AIHF loss does not."""
    run_script("aihf_llm.py", *TINY, "--w_pref", 0, "--reward_pretrain_steps", 4, "--total_episodes", 0,
               "--task.cache_dir", task_cache, "--output_dir", tmp_path, "--run_name", "warm")
    metrics = json.loads((tmp_path / "warm" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 <= metrics["reward_pref_accuracy"] <= 1


def test_start_sets_the_warm_start_defaults_unless_given():
    """--start rlhf (the default): SFT first, Bradley-Terry pre-training of the reward (rl, with a preference term) and
    RLHF's PPO settings; --start pi0: none of them. A flag given explicitly wins either way."""
    import tyro

    def resolved(*flags):
        args = tyro.cli(A.Args, args=list(map(str, flags)), use_underscores=True)
        A.validate_args(args)
        return args.sft_epochs, args.reward_pretrain_steps, args.kl_coef, args.learning_rate, args.total_episodes

    assert resolved() == resolved("--start", "rlhf") == (3, 120, 0.05, 3e-5, 2048)
    assert resolved("--start", "pi0") == (0, 0, 0.02, 1e-4, 8192)
    assert resolved("--w_pref", 0) == (3, 0, 0.05, 3e-5, 2048)  # IRL from demonstrations: no preference pre-training
    assert resolved("--start", "rlhf", "--algo", "direct") == (3, 0, 0.05, 5e-5, 2048)
    assert resolved("--start", "rlhf", "--sft_epochs", 1, "--reward_pretrain_steps", 0, "--kl_coef", 0.1,
                    "--total_episodes", 64) == (1, 0, 0.1, 3e-5, 64)

"""Tests of rlhf_llm.py: the RLHF/PPO math against hand-computed numbers, the fused log-prob+entropy path against
the naive one, and the script end to end (embedded task, HH-format data, bad inputs, --resume)."""

import contextlib
import json
import math
import statistics
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, assert_learned, kill_when, make_run, run_script

sys.path.insert(0, ROOT)
import rlhf_llm as R  # noqa: E402

# Tiny but complete: all three stages train (SFT and RM steps > 0, several PPO iterations with 2 minibatches).
# The reward model gets enough pairs to rank held-out ones, and PPO raises the learned score: a run that learns the
# wrong way fails the smoke test.
TINY = ["--task.num_demos", "96", "--task.num_prefs", "256", "--task.num_eval_prompts", "128", "--task.num_eval_prefs", "256",
        "--sft_epochs", "1", "--rm_epochs", "2", "--rm_learning_rate", "3e-4", "--batch_size", "16", "--total_episodes", "192",
        "--rollout_batch_size", "32", "--learning_rate", "1e-4",
        "--num_mini_batches", "2", "--num_ppo_epochs", "2", "--num_reward_norm_samples", "32", "--eval_every", "0",
        "--num_threads", "1"]
SMOKE_RUNS = {"smoke": ("rlhf_llm.py", TINY)}
# What the smoke run must have learned (tests/margins.md has each value over seeds and CPU code paths):
LEARNED = {"smoke": [
    ("SFT learned the demonstrations: sampled gold over pi0's", lambda r: r.m["gold_reward_sft"] - r.m["gold_reward_init"], 0.03),
    ("the reward model ranks held-out pairs: accuracy", lambda r: r.m["rm_accuracy"], 0.5),
    ("PPO raised the learned score above the SFT samples' (0 after normalisation)", lambda r: r.m["scores"], 0.05),
    ("... and left the SFT model: KL", lambda r: r.m["kl"], 0.0),
]}


# ---------------------------------------------------------------------------------------------------------------
# GAE and whitening
# ---------------------------------------------------------------------------------------------------------------
def test_gae_matches_hand_computed_example():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 0.0, 7.0]])  # the 7 sits on padding and must be ignored
    values = torch.tensor([[0.5, 1.0, 0.2], [0.3, 0.1, 9.0]])  # so must the 9
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # gamma 1, lambda 0.5. Row 0: d2 = 2 - .2 = 1.8; d1 = 0 + .2 - 1 = -.8 -> A1 = -.8 + .5 * 1.8 = .1;
    # d0 = 1 + 1 - .5 = 1.5 -> A0 = 1.5 + .5 * .1 = 1.55. Row 1 (ends at t = 1): A1 = -.1; A0 = .3 + .5 * -.1 = .25.
    advantages, returns = R.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[1.55, 0.1, 1.8], [0.25, -0.1, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[2.05, 1.1, 2.0], [0.55, 0.0, 0.0]]))
    # gamma 0.5, lambda 1, row 0: A2 = 1.8; d1 = 0 + .5 * .2 - 1 = -.9 -> A1 = -.9 + .5 * 1.8 = 0; d0 = 1 + .5 - .5 = 1 -> A0 = 1.
    advantages, _ = R.gae(rewards[:1], values[:1], mask[:1], gamma=0.5, lam=1.0)
    torch.testing.assert_close(advantages, torch.tensor([[1.0, 0.0, 1.8]]))


def test_whitening_uses_real_tokens_only():
    x = torch.tensor([[1.55, 0.1, 1.8], [0.25, -0.1, 123.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    real = [1.55, 0.1, 1.8, 0.25, -0.1]
    mean, std = statistics.mean(real), statistics.stdev(real)
    expected = torch.tensor([[(v - mean) / std for v in real[:3]], [(v - mean) / std for v in real[3:]] + [0.0]])
    torch.testing.assert_close(R.masked_whiten(x, mask), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# EOS truncation, KL shaping, the reward's position
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad_id", [0, 1])  # pad 1 == EOS, as with Pythia: the mask must still include the EOS
def test_truncation_after_first_eos(pad_id):
    eos = 1
    responses = torch.tensor([[5, 6, 1, 7, 1], [5, 5, 5, 5, 5], [1, 9, 9, 9, 9]])
    out, mask, has_eos = R.truncate_after_eos(responses, eos, pad_id)
    p = pad_id
    assert out.tolist() == [[5, 6, 1, p, p], [5, 5, 5, 5, 5], [1, p, p, p, p]]
    assert mask.sum(1).tolist() == [3, 5, 1]
    assert has_eos.tolist() == [True, False, True]


def test_kl_shaped_rewards_on_crafted_batch():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, 5.0], [-1.0, -1.0, -1.0, -1.0], [-0.2, 3.0, 3.0, 3.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0], [-1.0, -2.0, -1.0, -0.5], [-0.7, 0.0, 0.0, 0.0]])
    scores = torch.tensor([2.0, -1.0, 0.5])
    rewards, k1, k3 = R.kl_shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # k1 = logp - ref on real tokens: [.5, -1, 0], [0, 1, 0, -.5], [.5]; the score lands on the last real token.
    expected = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [0.0, -0.1, 0.0, -1.0 + 0.05], [-0.05 + 0.5, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(k1.sum(1), torch.tensor([-0.5, 0.5, 0.5]))
    k3_of = lambda lr: math.exp(-lr) - 1 + lr  # noqa: E731  r = pi_ref / pi = exp(-log_ratio)
    torch.testing.assert_close(k3.sum(1), torch.tensor([k3_of(0.5) + k3_of(-1.0), k3_of(1.0) + k3_of(-0.5), k3_of(0.5)]))


def _tiny_reward_model():
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32, num_labels=1, pad_token_id=0)
    model = GPTNeoXForSequenceClassification(config).eval()
    model.config.reward_bias = 0.25
    return model


def test_reward_is_read_at_last_real_token_left_and_right_padding():
    model = _tiny_reward_model()
    seq = [3, 4, 5, 6]
    with torch.no_grad():
        expected = model.score(model.base_model(torch.tensor([seq])).last_hidden_state[0, -1]).item() - 0.25
        other = model.score(model.base_model(torch.tensor([seq[:3]])).last_hidden_state[0, -1]).item() - 0.25
        ids = torch.tensor([seq + [0, 0], [0, 0] + seq, [7] + seq[:3] + [0, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
        rewards = R.sequence_rewards(model, ids, mask)
    assert R.last_token_index(mask).tolist() == [3, 5, 3]
    torch.testing.assert_close(rewards[:2], torch.tensor([expected, expected]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rewards[2], torch.tensor(other), rtol=1e-5, atol=1e-5)  # left pad + right pad, masked 7
    assert abs(expected - other) > 1e-4  # the position matters, so the test can fail


@pytest.mark.parametrize("training", [False, True])
def test_evaluate_gold_evaluates_in_eval_mode_and_restores_the_models_mode(training):
    """The loops keep the policy in eval() mode (N+: no dropout) and call evaluate_gold on parallelize()'s wrapper,
    whose own flag stays True: the evaluation must run in eval mode and hand the model back in the mode it had."""
    model = _tiny_reward_model().train(training)
    seen = []

    class Task:
        def evaluate(self, m, tokenizer, seed=0, synced_gpus=False):
            seen.append((m.training, synced_gpus))
            return {"gold_reward": 0.5, "gold_reward_greedy": 0.25}

    result = R.evaluate_gold(make_run(R, SimpleNamespace(seed=0), task=Task()), R.Parallel(model), "_mid")
    assert result == {"gold_reward_mid": 0.5, "gold_reward_greedy_mid": 0.25}
    assert seen == [(False, False)] and all(m.training == training for m in model.modules())


@pytest.fixture(scope="module")
def ppo_models(tmp_path_factory):
    """A tiny policy (also pi_ref) and a tiny reward model with a normalising bias of 3.0, saved like a run's
    sft_model/ and reward_model/, loaded the way PPO loads them."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    root = tmp_path_factory.mktemp("ppo_models")
    config = dict(vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=32, pad_token_id=0, eos_token_id=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(**config)).save_pretrained(root / "sft")
    reward_model = GPTNeoXForSequenceClassification(GPTNeoXConfig(**config, num_labels=1))
    reward_model.config.reward_bias = 3.0
    reward_model.save_pretrained(root / "rm")
    policy = GPTNeoXForCausalLM.from_pretrained(root / "sft").eval()
    ref_policy, rm, value_model = R.load_ppo_models(str(root / "sft"), str(root / "rm"), "cpu")
    for m in (ref_policy, rm, value_model):
        m.eval()
    return policy, ref_policy, rm, value_model


def _ppo_args(**overrides):
    from types import SimpleNamespace

    return SimpleNamespace(**{**dict(forward_batch_size=3, temperature=0.7, logprob_chunk_size=5, missing_eos_penalty=1.5,
                                     kl_coef=0.05, gamma=1.0, lam=0.95), **overrides})


def _by_hand_rewards(reward_model, sequences, lengths):
    """r(x, y) of each sequence read at its last real token, minus the bias, computed one sequence at a time."""
    with torch.no_grad():
        return torch.stack([reward_model.score(reward_model.base_model(torch.tensor([s[:n]])).last_hidden_state[0, -1])[0]
                            - reward_model.config.reward_bias for s, n in zip(sequences, lengths)])


def test_score_rollouts_scores_values_and_advantages(ppo_models):
    policy, ref_policy, reward_model, value_model = ppo_models
    eos, pad = 1, 0
    queries = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 0, 4]])  # left-padded prompts
    query_mask = (queries != 0).long()
    responses = torch.tensor([[3, 4, eos, 5, 6], [3, 3, 3, 3, 3], [eos, 9, 9, 9, 9]])  # EOS at 3, none, EOS at 1
    args = _ppo_args()
    batch = R.score_rollouts(make_run(R, args, pad_id=pad, eos_id=eos), policy, ref_policy, reward_model, value_model,
                             queries, query_mask, responses)
    lengths = [3, 5, 1]
    assert batch["response_mask"].sum(1).tolist() == lengths and batch["has_eos"].tolist() == [True, False, True]
    real = [[t for t, m in zip(q, qm) if m] + r[:n] for q, qm, r, n in
            zip(queries.tolist(), query_mask.tolist(), responses.tolist(), lengths)]
    raw = _by_hand_rewards(reward_model, real, [len(s) for s in real])
    # the score is read at the EOS token (after truncation), and the missing-EOS penalty lowers it
    torch.testing.assert_close(batch["scores"], raw - torch.tensor([0.0, 1.5, 0.0]), rtol=1e-5, atol=1e-5)
    # at initialisation the value model is the reward model: V at the EOS token is the normalised reward, bias included
    with torch.no_grad():
        values = R.token_values(value_model, batch["sequences"], batch["attention"])
    eos_position = R.last_token_index(batch["attention"])
    torch.testing.assert_close(values[torch.arange(3), eos_position], raw, rtol=1e-5, atol=1e-5)
    # and PPO's values are V of the states that emit each response token (context - 1 .. end - 1)
    context = queries.shape[1]
    torch.testing.assert_close(batch["values"], values[:, context - 1 : -1] * batch["response_mask"])
    # policy == reference here: no KL, so the advantages come from the scores alone, then whitened over real tokens
    mask = batch["response_mask"]
    assert batch["kl"].abs().max() < 1e-5
    advantages = batch["advantages"][mask]
    assert advantages.mean().abs() < 1e-5 and (advantages.std() - 1).abs() < 1e-4
    assert (batch["advantages"][~mask] == 0).all()
    rewards, _, _ = R.kl_shaped_rewards(batch["scores"], batch["logprobs"], batch["logprobs"], mask, args.kl_coef)
    unwhitened, returns = R.gae(rewards, batch["values"], mask, args.gamma, args.lam)
    torch.testing.assert_close(batch["advantages"], R.masked_whiten(unwhitened, mask))
    torch.testing.assert_close(batch["returns"], returns)


def test_missing_eos_penalty_lowers_the_score(ppo_models):
    policy, ref_policy, reward_model, value_model = ppo_models
    queries, responses = torch.tensor([[5, 6], [5, 6]]), torch.tensor([[3, 1, 4], [3, 4, 4]])
    scores = {}
    for penalty in (0.0, 2.0):
        batch = R.score_rollouts(make_run(R, _ppo_args(missing_eos_penalty=penalty)), policy, ref_policy, reward_model,
                                 value_model, queries, torch.ones_like(queries), responses)
        scores[penalty] = batch["scores"]
    assert scores[2.0][0] == scores[0.0][0]  # has an EOS: untouched
    assert scores[2.0][1] == pytest.approx(scores[0.0][1].item() - 2.0, abs=1e-6)


def test_reward_normalised_to_mean_zero_on_policy_samples(ppo_models):
    policy, _, reward_model, _ = ppo_models
    queries = torch.tensor([[5, 6, 7]] * 8)
    query_mask = torch.ones_like(queries)
    args = _ppo_args()
    saved_bias = reward_model.config.reward_bias
    try:
        torch.manual_seed(3)
        responses = R.generate(policy, queries, query_mask, make_run(R, args, response_length=4))
        responses, response_mask, _ = R.truncate_after_eos(responses, 1, 0)
        ids, mask = torch.cat([queries, responses], 1), torch.cat([query_mask, response_mask.long()], 1)
        raw = R.center_reward(reward_model, ids, mask, make_run(R, args))
        assert reward_model.config.reward_bias == pytest.approx(raw.mean().item())
        with torch.no_grad():  # the same samples, now scored by the normalised reward model
            normalised = R.sequence_rewards(reward_model, ids, mask)
        assert normalised.mean().abs() < 1e-5 and normalised.std() > 1e-3
    finally:
        reward_model.config.reward_bias = saved_bias


def test_rm_loss_matches_formula():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    nll = [math.log1p(math.exp(-1.0)), math.log1p(math.exp(1.0))]  # -log sigmoid(m) = log(1 + e^-m)
    torch.testing.assert_close(R.reward_model_loss(chosen, rejected), torch.tensor(nll))
    torch.testing.assert_close(R.reward_model_loss(chosen, rejected, 0.01), torch.tensor([nll[0] + 0.01 * 1.0, nll[1] + 0.0]))


def test_ppo_clipped_losses_match_formula():
    old = torch.zeros(4)
    new = torch.tensor([0.5, -0.5, 0.5, 0.1], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    # per token max(-A r, -A clip(r, .8, 1.2)): clipped, unclipped, unclipped, unclipped
    r = [math.exp(0.5), math.exp(-0.5), math.exp(0.5), math.exp(0.1)]
    pg_expected = (-1.2 - r[1] + r[2] - 2 * r[3]) / 4
    vpred = torch.tensor([0.5, 0.1, 1.5, 0.9], requires_grad=True)
    old_v, returns = torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.tensor([1.0, -1.0, 1.0, 1.0])
    # clipped values [.2, .1, 1.2, .9]: max((V-R)^2, (Vc-R)^2) = [.64, 1.21, .25, .01]
    vf_expected = 0.5 * (0.64 + 1.21 + 0.25 + 0.01) / 4
    pg, vf, stats = R.ppo_losses(new, old, adv, vpred, old_v, returns, 0.2, 0.2)
    assert pg.item() == pytest.approx(pg_expected, rel=1e-6)
    assert vf.item() == pytest.approx(vf_expected, rel=1e-6)
    assert stats["policy/clipfrac"].item() == pytest.approx(0.25)
    assert stats["val/clipfrac"].item() == pytest.approx(0.25)  # only token 0 uses the clipped value
    assert stats["policy/approxkl"].item() == pytest.approx(0.5 * (0.25 + 0.25 + 0.25 + 0.01) / 4, rel=1e-6)
    pg.backward()
    # d/d logp of -A r = -A r; zero where the clipped term is active (token 0)
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -r[1], r[2], -2 * r[3]]) / 4)


# ---------------------------------------------------------------------------------------------------------------
# Fused log-prob + entropy vs naive
# ---------------------------------------------------------------------------------------------------------------
def _naive_logprobs_entropy(hidden, weight, targets, temperature):
    log_probs = torch.log_softmax((hidden @ weight.t()).float() / temperature, -1)
    return log_probs.gather(1, targets[:, None]).squeeze(1), -(log_probs.exp() * log_probs).sum(-1)


@pytest.mark.parametrize("use", ["both", "logp", "entropy"])
def test_fused_logprob_entropy_matches_naive(use):
    torch.manual_seed(0)
    n, d, v, temperature = 37, 16, 50, 0.7
    hidden0, weight0 = torch.randn(n, d), torch.randn(v, d) * 0.5
    targets = torch.randint(0, v, (n,))
    a, b = torch.randn(n), torch.randn(n)
    results = []
    for fn in (lambda h, w: R.policy_logprobs_entropy(h, w, targets, temperature, 8),
               lambda h, w: _naive_logprobs_entropy(h, w, targets, temperature)):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        logp, ent = fn(hidden, weight)
        loss = (a * logp).sum() * (use != "entropy") + (b * ent).sum() * (use != "logp")
        loss.backward()
        results.append((logp.detach(), ent.detach(), hidden.grad, weight.grad))
    for fused, naive in zip(*results):
        torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(task_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("rlhf_runs")
    run_script("rlhf_llm.py", *SMOKE_RUNS["smoke"][1], "--task.cache_dir", task_cache, "--output_dir", out, "--run_name", "smoke")
    return out / "smoke"


def test_smoke_embedded_task_metrics(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["algo"] == "rlhf" and metrics["task"] == "sort" and metrics["seed"] == 1
    # 6 SFT steps (96 / 16) + 32 RM steps (2 x 256 / 16) + 6 PPO iterations (192 / 32)
    assert metrics["steps"] == 6 + 32 + 6
    for stage in ("_init", "_sft", ""):
        for key in ("gold_reward", "gold_reward_greedy"):
            assert 0.0 <= metrics[key + stage] <= 1.0
    assert_learned(smoke_run, LEARNED["smoke"])
    for name in ("sft_model", "reward_model", "value_model", "model"):
        assert (smoke_run / name / "config.json").exists(), name
    rm_config = json.loads((smoke_run / "reward_model" / "config.json").read_text())
    assert rm_config["reward_bias"] == pytest.approx(metrics["reward_bias"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(smoke_run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("objective/kl", "objective/scores", "objective/rlhf_reward", "objective/entropy", "policy/approxkl_avg",
                "policy/clipfrac_avg", "val/ratio", "val/ratio_var", "loss/policy_avg", "loss/value_avg", "sft/loss", "rm/loss"):
        assert tag in tags, tag
    # The first iteration samples the SFT policy itself, which is also the reference: with no dropout (N+) and the same
    # scoring path for both, its KL penalty is exactly 0, and the later iterations move away from it.
    kl = [e.value for e in events.Scalars("objective/kl")]
    assert kl[0] == pytest.approx(0.0, abs=1e-5) and kl[-1] > 1e-3


def test_resume_reproduces_uninterrupted_run(smoke_run, task_cache, tmp_path):
    """Kill a run right after a mid-PPO checkpoint, resume it, and get the uninterrupted run's numbers."""
    # iteration 1 is printed after its checkpoint-free log; the checkpoint follows at once
    kill_when("rlhf_llm.py", *TINY, "--task.cache_dir", task_cache, "--output_dir", tmp_path, "--run_name", "killed",
              "--save_every", 1, lines=["[ppo] iteration 1/", "[ppo] checkpoint"])
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert state["stage"] == "ppo" and 0 < state["step"] < 6, (state["stage"], state["step"])
    assert not (tmp_path / "killed" / "metrics.json").exists()
    run_script("rlhf_llm.py", "--resume", tmp_path / "killed")
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    reference = json.loads((smoke_run / "metrics.json").read_text())
    for key in ("gold_reward", "gold_reward_greedy", "kl", "scores", "rm_accuracy", "gold_reward_sft", "steps"):
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), key


def test_hh_format_data_and_local_models(tiny_hh, tmp_path):
    proc = run_script("rlhf_llm.py", "--model_name_or_path", tiny_hh["model"], "--reward_model_path", tiny_hh["model"],
               "--dataset_name", tiny_hh["train"], "--sft_dataset_name", tiny_hh["sft"], "--max_length", "200",
               "--max_prompt_length", "160", "--response_length", "6", "--sft_epochs", "1", "--rm_epochs", "1",
               "--batch_size", "8", "--total_episodes", "16", "--rollout_batch_size", "8", "--num_reward_norm_samples", "8",
               "--num_threads", "1", "--output_dir", tmp_path, "--run_name", "hh")
    metrics = json.loads((tmp_path / "hh" / "metrics.json").read_text())
    # a single jsonl holds no test split: the last fifth of the 40 pairs is held out (not the training file again)
    assert "32 pairs, 8 held-out pairs" in proc.stdout
    assert metrics["task"] == tiny_hh["train"] and metrics["steps"] == 3 + 4 + 2
    assert 0.0 <= metrics["rm_accuracy"] <= 1.0 and "gold_reward" not in metrics
    # the tokenizer has no pad token: EOS pads, yet the reward model's config keeps the normalising bias
    assert "reward_bias" in json.loads((tmp_path / "hh" / "reward_model" / "config.json").read_text())


@pytest.mark.parametrize("flags, message", [
    (["--kl_coef", "-0.1"], "--kl_coef must be in [0,"),
    (["--response_length", "0"], "--response_length must be in [1,"),
    (["--total_episodes", "8", "--rollout_batch_size", "16"], "--total_episodes 8 is less than one --rollout_batch_size"),
    (["--rollout_batch_size", "10", "--num_mini_batches", "4"], "--rollout_batch_size 10 must split"),
    (["--dataset_name", "/no/such/file.jsonl"], "dataset path not found"),
    (["--learning_rate", "-1"], "--learning_rate must be in (0,"),
    (["--task.num_demos", "0"], "only 0 demonstrations (--task.num_demos) for --batch_size 16"),
    (["--reward_model_path", "TINY_HH"], "differs from the policy's"),
    (["--logprob_kernel", "triton", "--device", "cpu"], "--logprob_kernel triton needs"),  # no triton, or no GPU
])
def test_bad_inputs_fail_in_one_line(flags, message, tiny_hh, task_cache, tmp_path):
    flags = [tiny_hh["model"] if f == "TINY_HH" else f for f in flags]
    proc = run_script("rlhf_llm.py", *TINY, *flags, "--task.cache_dir", task_cache, "--output_dir", tmp_path / "runs",
                      check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_untrained_reward_head_is_refused(tiny_hh, tmp_path):
    """--rm_epochs 0 uses the reward model as is: a plain causal LM (a new, random `score` head) fails before training."""
    proc = run_script("rlhf_llm.py", "--model_name_or_path", tiny_hh["model"], "--reward_model_path", tiny_hh["model"],
                      "--dataset_name", tiny_hh["train"], "--max_length", "200", "--max_prompt_length", "160",
                      "--sft_dataset_name", tiny_hh["sft"], "--rm_epochs", "0", "--batch_size", "8", "--rollout_batch_size", "8",
                      "--output_dir", tmp_path / "runs", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "has no trained `score` head" in last, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def test_ratio_var_is_trls_variance_of_the_micro_batch_means(monkeypatch):
    """val/ratio_var, as TRL defines it: the variance over the update of each micro-batch's mean ratio (not the
    ratios' spread inside a micro-batch)."""
    from test_distributed import _ppo_problem

    policy, value_model, batch, args = _ppo_problem()
    args.num_ppo_epochs, args.num_mini_batches = 2, 2  # 2 epochs x 2 minibatches x 2 micro-batches
    seen, ppo_losses = [], R.ppo_losses

    def recording(*a):
        out = ppo_losses(*a)
        seen.append(out[2]["val/ratio"].item())
        return out

    monkeypatch.setattr(R, "ppo_losses", recording)
    optimizer = torch.optim.SGD([*policy.parameters(), *value_model.parameters()], lr=0.1)
    stats = R.ppo_update(R.parallelize(policy, args), R.parallelize(value_model, args), optimizer, batch, args,
                         contextlib.nullcontext(), seed=0)
    assert len(seen) == 8 and torch.tensor(seen).var().item() > 0
    assert stats["val/ratio_var"] == pytest.approx(torch.tensor(seen).var().item(), rel=1e-4)
    assert stats["val/ratio"] == pytest.approx(sum(seen) / len(seen), rel=1e-5)

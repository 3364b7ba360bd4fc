"""afd_llm.py: the discriminator's data, labels, loss and reward against hand-computed numbers, Best-of-N and the reuse
of its samples, and the script end to end (embedded task, HH-format data with PPO, bad inputs, --resume)."""

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import afd_llm as A
from conftest import assert_learned, fails_in_one_line, kill_when, make_run, run_script

# Tiny but complete: SFT (2 x 16 steps) and the discriminator (3 x 12 steps) train, Best-of-N up to 8 on 64 prompts;
# 128 held-out preference pairs measure the discriminator's direction.
TINY = ["--task.num_demos", 256, "--task.num_prefs", 0, "--task.num_eval_prompts", 64, "--task.num_eval_prefs", 128,
        "--sft_epochs", 2, "--sft_learning_rate", 1e-3, "--batch_size", 16, "--rm_eval_fraction", 0.25, "--rm_epochs", 3,
        "--rm_learning_rate", 3e-4, "--max_n", 8, "--num_threads", 1]
TINY_STEPS = 2 * 256 // 16 + 3 * (256 - 64) // 16
SMOKE_RUNS = {"smoke": ("afd_llm.py", TINY)}
# What the smoke run must have learned (tests/margins.md has each value over seeds and CPU code paths). Init-SFT: the
# positives (SFT samples) beat the negatives (pi0 samples) by the gold reward, the discriminator separates them on its
# held-out prompts, alone and paired, and it ranks held-out human preferences it never saw the right way round.
LEARNED = {"smoke": [
    ("positives over negatives, gold", lambda r: r.m["rm_gold_positive"] - r.m["rm_gold_negative"], 0.05),
    ("held-out discriminator accuracy", lambda r: r.m["rm_accuracy"], 0.55),
    ("... on pairs", lambda r: r.m["rm_pair_accuracy"], 0.6),
    ("D(positives) over D(negatives)", lambda r: r.m["rm_d_positive"] - r.m["rm_d_negative"], 0.0),
    ("held-out human preferences ranked", lambda r: r.m["rm_pref_accuracy"], 0.5),
    ("Best-of-8 over Best-of-1, learned reward", lambda r: r.m["reward_bon_8"] - r.m["reward_bon_1"], 0.1),
]}


# ---------------------------------------------------------------------------------------------------------------
# The discriminator: data per --rm_data, labels, loss, reward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rm_data,positive,negative", [("init_sft", "sft", "init"), ("init_demo", "demo", "init"),
                                                       ("sft_demo", "demo", "sft")])
def test_discriminator_labels_per_mode_on_a_crafted_batch(rm_data, positive, negative):
    """Each response carries its source as a token (demo 7, pi_0 8, SFT 9): the batch the loop builds labels the
    rm_data's positive source 1 and its negative source 0, row by row."""
    source_token = {"demo": 7, "init": 8, "sft": 9}
    responses = {source: [[token, 1 + i, 2] for i in range(3)] for source, token in source_token.items()}
    positives, negatives = A.discriminator_pairs(rm_data, responses)
    assert positives == responses[positive] and negatives == responses[negative]
    prompts = [[5, 6 + i] for i in range(3)]
    ids, mask = A.pair_rows_batch([(p, pos, neg) for p, pos, neg in zip(prompts, positives, negatives)], pad_id=0)
    labels = A.discriminator_labels(len(prompts))
    source_of = {token: source for source, token in source_token.items()}
    assert len(labels) == len(ids) == 6
    for row, label in zip(ids.tolist(), labels.tolist()):
        source = source_of[row[2]]  # the first response token
        assert label == (1.0 if source == positive else 0.0) and source in (positive, negative)
    assert ids[0::2, :2].tolist() == prompts and ids[1::2, :2].tolist() == prompts  # the same prompt for both


def test_discriminator_loss_by_hand():
    logits, labels = torch.tensor([2.0, -1.0, 0.5, 0.5]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    # -log D for positives, -log(1 - D) for negatives; D = 1 / (1 + e^-z), 1 - D = 1 / (1 + e^z)
    expected = torch.tensor([math.log1p(math.exp(-2.0)), math.log1p(math.exp(-1.0)), math.log1p(math.exp(-0.5)),
                             math.log1p(math.exp(0.5))])
    z = logits.clone().requires_grad_()
    loss = A.discriminator_loss(z, labels)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, labels, reduction="none"))
    loss.sum().backward()
    torch.testing.assert_close(z.grad, torch.sigmoid(logits) - labels)  # descent raises z on positives, lowers it on negatives


def test_reward_is_the_discriminators_logit():
    z = torch.tensor([-40.0, -6.0, -0.3, 0.0, 0.8, 5.0, 40.0])
    r = A.afd_reward(z)
    d = torch.sigmoid(z)
    torch.testing.assert_close(torch.sigmoid(r), d)  # D = sigmoid(r): r is the logit of D ...
    torch.testing.assert_close(r, z, rtol=1e-6, atol=1e-6)  # ... exactly, even where D rounds to 0 or 1
    moderate = z[1:-1].double()
    d64 = torch.sigmoid(moderate)
    torch.testing.assert_close(A.afd_reward(moderate), torch.log(d64) - torch.log(1 - d64))  # r = log D - log(1 - D)


# ---------------------------------------------------------------------------------------------------------------
# Best-of-N
# ---------------------------------------------------------------------------------------------------------------
def test_best_of_n_picks_the_argmax_and_breaks_ties_by_the_first_index():
    rewards = torch.tensor([[0.1, 0.5, 0.5, 0.9], [2.0, 2.0, 1.0, 2.0], [-1.0, -3.0, -0.5, -0.5]])
    assert A.best_of_n(rewards, 1).tolist() == [0, 0, 0]
    assert A.best_of_n(rewards, 2).tolist() == [1, 0, 0]
    assert A.best_of_n(rewards, 3).tolist() == [1, 0, 2]
    assert A.best_of_n(rewards, 4).tolist() == [3, 0, 2]
    # many ties on wide rows (a vectorised argmax must still return the first maximum)
    g = torch.Generator().manual_seed(0)
    wide = torch.randint(0, 3, (50, 64), generator=g).float()
    first = [row.tolist().index(max(row.tolist()[:40])) for row in wide]
    assert A.best_of_n(wide, 40).tolist() == first
    assert A.best_of_n(torch.zeros(4, 100), 100).tolist() == [0, 0, 0, 0]


def test_best_of_n_curve_uses_a_prefix_of_the_same_samples():
    rewards = torch.tensor([[1.0, 3.0, 2.0, 5.0], [0.0, -1.0, 4.0, 4.0]])
    gold = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]])
    # choices: N=1 (0, 0), N=2 (1, 0), N=3 (1, 2), N=4 (3, 2: the tie 4.0 / 4.0 keeps index 2)
    expected = [(1, 0.5, 0.3), (2, 1.5, 0.35), (3, 3.5, 0.45), (4, 4.5, 0.55)]
    curve = A.best_of_n_curve(rewards, gold, 4)
    assert [n for n, _, _ in curve] == [1, 2, 3, 4]
    for (_, r, g), (_, r_exp, g_exp) in zip(curve, expected):
        assert r == pytest.approx(r_exp) and g == pytest.approx(g_exp)
    # more samples never change the curve at smaller N; no gold (real data) gives None
    assert A.best_of_n_curve(rewards[:, :2], gold[:, :2], 2) == curve[:2]
    assert [g for _, _, g in A.best_of_n_curve(rewards, None, 4)] == [None] * 4


def _tiny_policy():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=32, eos_token_id=1, pad_token_id=0, bos_token_id=1)
    return GPTNeoXForCausalLM(config).eval()


def test_samples_are_drawn_once_and_reused_for_every_n():
    """Round j draws one sample per prompt under its own seed: the first N samples of a prompt do not depend on
    --max_n, so Best-of-N at N = 3 of a max_n = 5 run is Best-of-3 of a max_n = 3 run."""
    policy = _tiny_policy()
    queries, mask = A.left_pad([[3, 4, 5], [6, 7], [8]], pad_id=0)
    run = make_run(A, SimpleNamespace(temperature=1.0, forward_batch_size=2), response_length=6)
    three = A.sample_candidates(run, policy, queries, mask, 3, seed=10)
    five = A.sample_candidates(run, policy, queries, mask, 5, seed=10)
    assert three.shape == (3, 3, 6) and five.shape == (3, 5, 6)
    assert torch.equal(three, five[:, :3])
    assert all(not torch.equal(five[:, j], five[:, j + 1]) for j in range(4))  # each round is a fresh sample
    other_seed = A.sample_candidates(run, policy, queries, mask, 3, seed=11)
    assert not torch.equal(other_seed, three)


def test_decoded_samples_match_the_demonstrations_format():
    import sort_task

    tokenizer = sort_task.build_tokenizer(sort_task.SortTaskConfig())
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    three, one, two = (tokenizer.convert_tokens_to_ids(w) for w in ("3", "1", "2"))
    responses = torch.tensor([[three, one, eos, two, two], [one, two, three, pad, pad], [eos, one, one, one, one]])
    assert A.decode_responses(tokenizer, responses, eos, pad) == [" 3 1", " 1 2 3", " "]
    # tokenized again like a demonstration: the same tokens, EOS appended
    args = SimpleNamespace(max_prompt_length=16, max_length=32)
    (prompt, response), = A.tokenize_examples(tokenizer, ["sort: 3 1 ="], [[" 3 1"]], args, "test")
    assert response == [three, one, eos]


# ---------------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------------
def test_help_offline(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["afd_llm.py", "--help"])
    with pytest.raises(SystemExit) as e:
        A.parse_args()
    text = capsys.readouterr().out.replace("-", "_")
    assert e.value.code == 0
    for flag in ("__rm_data", "init_sft", "init_demo", "sft_demo", "__max_n", "__policy_opt"):
        assert flag in text, flag


@pytest.fixture(scope="module")
def smoke_run(task_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("afd_runs")
    run_script("afd_llm.py", *SMOKE_RUNS["smoke"][1], "--task.cache_dir", task_cache, "--output_dir", out, "--run_name", "smoke")
    return out / "smoke"


def test_smoke_embedded_task_metrics(smoke_run):
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert metrics["algo"] == "afd" and metrics["task"] == "sort" and metrics["seed"] == 1
    assert metrics["steps"] == TINY_STEPS
    for key in ("gold_reward_init", "gold_reward_greedy_init", "gold_reward_sft", "gold_reward_greedy_sft", "gold_reward",
                "gold_reward_greedy", "gold_reward_bon_oracle", *(f"gold_reward_bon_{n}" for n in range(1, 9))):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["gold_reward"] == metrics["gold_reward_bon_8"]  # the final policy is Best-of-max_n
    assert metrics["gold_reward_greedy"] == metrics["gold_reward_greedy_sft"]  # ... over the SFT model, the model saved
    assert_learned(smoke_run, LEARNED["smoke"])
    # Best-of-N raises the learned reward with N (argmax over a growing prefix of the same samples) ...
    rewards = [metrics[f"reward_bon_{n}"] for n in range(1, 9)]
    assert all(b >= a for a, b in zip(rewards, rewards[1:]))
    # ... and the gold reward of its choice moves with it (up or down: the reward-hacking curve)
    assert metrics["gold_reward_bon_8"] != metrics["gold_reward_bon_1"]
    for name in ("sft_model", "reward_model", "model"):
        assert (smoke_run / name / "config.json").exists(), name
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["rm_data"] == "init_sft" and config["max_n"] == 8


def test_smoke_best_of_n_samples_file(smoke_run):
    """bon_samples.jsonl holds every candidate; re-choosing from it gives the metrics' curve, and over all candidates
    the learned reward goes with the gold reward (the exactly sorted responses above the poor ones, gold < 0.6)."""
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    rows = [json.loads(line) for line in (smoke_run / "bon_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 64 and all(len(r["responses"]) == len(r["rewards"]) == len(r["gold_rewards"]) == 8 for r in rows)
    rewards, gold = torch.tensor([r["rewards"] for r in rows]), torch.tensor([r["gold_rewards"] for r in rows])
    for n, reward, gold_reward in A.best_of_n_curve(rewards, gold, 8):
        assert reward == pytest.approx(metrics[f"reward_bon_{n}"], abs=1e-6)
        assert gold_reward == pytest.approx(metrics[f"gold_reward_bon_{n}"], abs=1e-6)
    assert torch.corrcoef(torch.stack([rewards.flatten(), gold.flatten()]))[0, 1] > 0.05
    good, poor = rewards[gold == 1.0], rewards[gold < 0.6]
    assert len(good) > 10 and len(poor) > 10 and good.mean() > poor.mean()


def test_resume_reproduces_uninterrupted_run(smoke_run, task_cache, tmp_path):
    """Kill a run right after a checkpoint inside discriminator training, resume it, get the uninterrupted run's numbers."""
    kill_when("afd_llm.py", *TINY, "--task.cache_dir", task_cache, "--output_dir", tmp_path, "--run_name", "killed",
              "--save_every", 5, lines=["[rm] checkpoint at step 10"])
    state = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    assert state["stage"] == "rm" and state["step"] == 10, (state["stage"], state["step"])
    assert not (tmp_path / "killed" / "metrics.json").exists()
    run_script("afd_llm.py", "--resume", tmp_path / "killed")
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    reference = json.loads((smoke_run / "metrics.json").read_text())
    keys = [k for k in reference if k not in ("wall_s", "algo", "task")]
    assert len(keys) > 30
    for key in keys:
        assert resumed[key] == pytest.approx(reference[key], rel=1e-6, abs=1e-7), key


def test_hh_format_data_local_models_and_ppo(tiny_hh, tmp_path):
    """The real-data path offline: HH-format pairs (demonstrations = chosen responses), a tiny local model with no pad
    token, and --policy_opt ppo on the discriminator's reward."""
    proc = run_script("afd_llm.py", "--model_name_or_path", tiny_hh["model"], "--dataset_name", tiny_hh["train"],
                      "--max_length", 200, "--max_prompt_length", 160, "--response_length", 6, "--sft_epochs", 1,
                      "--rm_epochs", 1, "--batch_size", 8, "--max_n", 4, "--policy_opt", "ppo", "--total_episodes", 8,
                      "--rollout_batch_size", 4, "--num_reward_norm_samples", 4, "--num_threads", 1,
                      "--output_dir", tmp_path, "--run_name", "hh")
    assert "no pad token" in proc.stdout
    run = tmp_path / "hh"
    metrics = json.loads((run / "metrics.json").read_text())
    # 40 pairs: the last 8 held out, 32 chosen responses are the demonstrations; 3 of them hold out the discriminator
    assert metrics["task"] == tiny_hh["train"] and metrics["steps"] == 32 // 8 + (32 - 3) // 8 + 8 // 4
    assert "gold_reward" not in metrics and "gold_reward_bon_1" not in metrics
    assert 0.0 <= metrics["rm_accuracy"] <= 1.0 and 0.0 <= metrics["rm_pref_accuracy"] <= 1.0
    rewards = [metrics[f"reward_bon_{n}"] for n in range(1, 5)]
    assert all(b >= a for a, b in zip(rewards, rewards[1:]))
    assert "reward_bias" in metrics and "kl" in metrics
    assert json.loads((run / "reward_model" / "config.json").read_text())["reward_bias"] == pytest.approx(metrics["reward_bias"])
    for name in ("sft_model", "reward_model", "value_model", "model"):
        assert (run / name / "config.json").exists(), name
    row = json.loads((run / "bon_samples.jsonl").read_text().splitlines()[0])
    assert row["prompt"].endswith("Assistant:") and len(row["responses"]) == 4 and "gold_rewards" not in row


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, before anything is written
# ---------------------------------------------------------------------------------------------------------------
def _fails(monkeypatch, tmp_path, *flags):
    monkeypatch.setattr(sys, "argv", ["afd_llm.py", *map(str, flags), "--output_dir", str(tmp_path / "out")])
    return fails_in_one_line(A.main, tmp_path / "out")


@pytest.mark.parametrize("flags,needle", [
    (["--max_n", 0], "--max_n must be in [1,"),
    (["--policy_opt", "ppo", "--total_episodes", 8, "--rollout_batch_size", 16], "--total_episodes 8 is less than one"),
    (["--num_rm_samples", 30], "only 27 discriminator training prompts"),  # 30 prompts - 3 held out < batch 32
    (["--num_rm_samples", 5000], "--num_rm_samples 5000 exceeds the 2000 demonstrations"),
    (["--task.num_demos", 34], "only 31 discriminator training prompts"),
    (["--rm_eval_fraction", 0.9], "--rm_eval_fraction must be in (0, 0.5]"),
    (["--sft_epochs", 0], "--rm_data init_sft compares the SFT model"),
    (["--rm_epochs", 0], "--rm_epochs 0 needs --reward_model_path"),
    (["--temperature", 0], "--temperature must be in (0,"),
    (["--policy_opt", "ppo", "--rollout_batch_size", 10, "--num_mini_batches", 4], "--rollout_batch_size 10 must split"),
    (["--model_name_or_path", "gpt2"], "--model_name_or_path needs --dataset_name"),
    (["--max_prompt_length", 64, "--max_length", 64], "--max_prompt_length"),
])
def test_bad_arguments(monkeypatch, tmp_path, flags, needle):
    assert needle in _fails(monkeypatch, tmp_path, *flags)


def test_bad_choice_is_refused_by_tyro(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["afd_llm.py", "--rm_data", "demo_only", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as e:
        A.main()
    assert e.value.code == 2 and "demo_only" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bad_data(monkeypatch, tmp_path, tiny_hh):
    model = ["--model_name_or_path", tiny_hh["model"], "--max_length", 200, "--max_prompt_length", 160, "--batch_size", 8]
    assert "dataset path not found" in _fails(monkeypatch, tmp_path, *model, "--dataset_name", tmp_path / "nope.jsonl")
    message = _fails(monkeypatch, tmp_path, *model, "--dataset_name", tiny_hh["train"], "--num_rm_samples", 100)
    assert "--num_rm_samples 100 exceeds the 32 demonstrations" in message
    message = _fails(monkeypatch, tmp_path, *model, "--dataset_name", tiny_hh["train"], "--num_rm_samples", 8)
    assert "only 7 discriminator training prompts" in message
    message = _fails(monkeypatch, tmp_path, *model, "--dataset_name", tiny_hh["train"], "--rm_epochs", 0,
                     "--reward_model_path", tiny_hh["model"])  # a causal LM: its `score` head would be new
    assert "has no trained `score` head" in message




def test_eval_reward_model_scores_the_best_of_n_choices(tiny_eval_rm, task_cache, tmp_path):
    """With Best-of-N the final policy is its choice: --eval_reward_model scores, per held-out prompt, the sample with
    the highest learned reward (the bon_samples.jsonl record), against pi0's and the SFT model's own samples."""
    small = ["--task.num_demos", 96, "--task.num_prefs", 0, "--task.num_eval_prompts", 16, "--task.num_eval_prefs", 16,
             "--sft_epochs", 1, "--batch_size", 16, "--rm_eval_fraction", 0.25, "--rm_epochs", 1, "--max_n", 4,
             "--num_threads", 1, "--num_bon_prompts", 16]
    run_script("afd_llm.py", *small, "--eval_reward_model", tiny_eval_rm, "--num_eval_prompts", 10, "--task.cache_dir",
               task_cache, "--output_dir", tmp_path, "--run_name", "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"eval_rm_score_init", "eval_rm_score_sft", "eval_rm_score", "eval_rm_win_rate"} <= set(metrics)
    final = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["eval_responses"][""]
    rows = [json.loads(line) for line in (tmp_path / "run" / "bon_samples.jsonl").read_text().splitlines()][:10]
    best = [r["responses"][max(range(len(r["rewards"])), key=lambda i: (r["rewards"][i], -i))] for r in rows]
    assert len(final) == 10 and [f.strip() for f in final] == [b.strip() for b in best]

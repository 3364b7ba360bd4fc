"""Several processes: every LLM script under `torchrun --nproc_per_node 2` (gloo on the CPU), with DDP and FSDP2.

Each run finishes with one metrics.json, and what does not depend on sampling matches a single-process run with the
same global batch: the losses and statistics logged at the first steps (SFT, DPO, reward-model steps), the held-out
evaluations, the saved model and (FSDP2, gathered) the checkpoint. A single-process checkpoint resumes under FSDP2.
A bad setup fails in one line before anything is written. The helpers that shard, gather and reduce, and one PPO step
under DDP with two micro-batches, are checked on two processes directly."""

import contextlib
import importlib
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, fails_in_one_line, kill_when, make_run, run_script

SMALL_TASK = ["--task.num_eval_prompts", 8, "--task.num_eval_prefs", 16, "--num_threads", 1]
# Per script: tiny flags (two micro-batches per optimizer step: DDP all-reduces with the second only), then what does
# not depend on sampling (the stages before any sampling): the logged statistics, and the metrics of held-out evaluations.
RUNS = {
    "dpo_llm": ([*SMALL_TASK, "--task.num_demos", 96, "--task.num_prefs", 96, "--sft_epochs", 1, "--num_epochs", 1,
                 "--batch_size", 8, "--gradient_accumulation_steps", 2, "--eval_every", 5],
                ["sft/loss", "sft/grad_norm", "loss", "rewards/chosen", "rewards/margins", "logps/rejected", "grad_norm",
                 "eval/rewards/accuracies", "eval/rewards/margins"], ["pref_accuracy", "eval_reward_margin"]),
    "rlhf_llm": ([*SMALL_TASK, "--task.num_demos", 32, "--task.num_prefs", 32, "--sft_epochs", 1, "--rm_epochs", 1,
                  "--batch_size", 8, "--total_episodes", 16, "--rollout_batch_size", 8, "--num_mini_batches", 2,
                  "--num_ppo_epochs", 1, "--num_reward_norm_samples", 8, "--forward_batch_size", 4, "--eval_every", 0,
                  "--gradient_accumulation_steps", 2],
                 ["sft/loss", "sft/grad_norm", "rm/loss", "rm/accuracy", "rm/margin", "rm/grad_norm"], ["rm_accuracy", "rm_eval_margin"]),
    "aihf_llm": ([*SMALL_TASK, "--task.num_demos", 40, "--task.num_prefs", 32, "--num_eval_demos", 8, "--algo", "rl",
                  "--sft_epochs", 1, "--reward_pretrain_steps", 4, "--batch_size", 8, "--total_episodes", 16,
                  "--rollout_batch_size", 8, "--num_mini_batches", 2, "--num_ppo_epochs", 1, "--forward_batch_size", 4,
                  "--eval_every", 0, "--gradient_accumulation_steps", 2],
                 ["sft/loss", "sft/grad_norm", "reward_pretrain/loss", "reward_pretrain/accuracy", "reward_pretrain/grad_norm"], []),
    "afd_llm": ([*SMALL_TASK, "--task.num_demos", 48, "--task.num_prefs", 0, "--sft_epochs", 1, "--rm_epochs", 1,
                 "--rm_eval_fraction", 0.25, "--batch_size", 8, "--max_n", 2, "--forward_batch_size", 8,
                 "--gradient_accumulation_steps", 2],
                ["sft/loss", "sft/grad_norm"], ["gold_reward_greedy_sft"]),
}


def torchrun(script, *flags, nproc=2, check=True, timeout=600):
    """`torchrun --standalone --nproc_per_node nproc script flags` in a subprocess (a free port of its own)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, script), *map(str, flags)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def scalars(run_dir):
    """{tag: {step: value}} of a run's TensorBoard logs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def weights(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, task_cache):
    """One single-process run per script, made on first use: the reference."""
    out, done = tmp_path_factory.mktemp("single"), {}

    def get(script):
        if script not in done:
            run_script(f"{script}.py", *RUNS[script][0], "--task.cache_dir", task_cache, "--output_dir", out, "--run_name", script)
            done[script] = out / script
        return done[script]

    return get


def files(run_dir):
    """The files of a run directory, TensorBoard's (named after host and time) counted instead."""
    names = sorted(os.path.relpath(os.path.join(d, f), run_dir) for d, _, fs in os.walk(run_dir) for f in fs)
    return [n for n in names if not n.startswith("events.out")], sum(n.startswith("events.out") for n in names)


def check_against_single(script, run, reference, stdout):
    """A two-process run: its files are the single-process run's, the first process alone printed the result, and what
    does not depend on sampling matches the single-process run."""
    _, deterministic, held_out = RUNS[script]
    assert files(run)[0] == files(reference)[0]
    two, one = json.loads((run / "metrics.json").read_text()), json.loads((reference / "metrics.json").read_text())
    assert two.keys() == one.keys() and two["steps"] == one["steps"] > 0
    assert all(math.isfinite(v) for v in two.values() if isinstance(v, float)), two
    assert two["gold_reward_init"] == one["gold_reward_init"]  # every process evaluates the same starting policy alike
    assert stdout.count('{"algo"') == 1
    logged, expected = scalars(run), scalars(reference)
    for tag in deterministic:
        assert logged[tag].keys() == expected[tag].keys(), tag
        for step, value in expected[tag].items():
            assert logged[tag][step] == pytest.approx(value, rel=1e-4, abs=1e-5), (tag, step, logged[tag][step], value)
    for key in held_out:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    if script == "dpo_llm":  # no sampling at all: the final model, and the checkpoint (under FSDP2, gathered)
        a, b = weights(run / "model"), weights(reference / "model")
        assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 2e-4 for k in a)
        ours, theirs = (torch.load(r / "checkpoint.pt", weights_only=False) for r in (run, reference))
        assert ours.keys() == theirs.keys() and ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
        for i, state in theirs["optimizer"]["state"].items():
            for k, v in state.items():
                torch.testing.assert_close(ours["optimizer"]["state"][i][k], v, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(ours["ref_logps"], theirs["ref_logps"], rtol=1e-5, atol=1e-5)


# dpo_llm under FSDP2 runs in test_single_process_checkpoint_resumes_under_fsdp
@pytest.mark.parametrize("script,parallel", [(s, p) for s in RUNS for p in ("ddp", "fsdp") if (s, p) != ("dpo_llm", "fsdp")])
def test_two_processes_match_one(script, parallel, single, task_cache, tmp_path):
    proc = torchrun(f"{script}.py", *RUNS[script][0], "--parallel", parallel, "--task.cache_dir", task_cache,
                    "--output_dir", tmp_path, "--run_name", "two")
    assert os.listdir(tmp_path) == ["two"] and files(tmp_path / "two")[1] == 1
    check_against_single(script, tmp_path / "two", single(script), proc.stdout)


def test_single_process_checkpoint_resumes_under_fsdp(single, task_cache, tmp_path):
    """A one-process run killed after its first checkpoint (during SFT) resumes on two processes under FSDP2: the
    whole model and optimizer state are sharded on loading, and the run ends where the uninterrupted one-process run
    ends (check_against_single), with its model and checkpoint gathered whole."""
    flags = [*RUNS["dpo_llm"][0], "--parallel", "fsdp", "--save_every", 1, "--task.cache_dir", task_cache,
             "--output_dir", tmp_path, "--run_name", "killed"]
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    kill_when("dpo_llm.py", *flags, path=checkpoint)
    assert checkpoint.exists() and not (tmp_path / "killed" / "metrics.json").exists()
    state = torch.load(checkpoint, weights_only=False)
    assert state["stage"] == "sft" and state["step"] > 0  # an optimizer state to shard on loading
    resumed = torchrun("dpo_llm.py", "--resume", tmp_path / "killed")
    check_against_single("dpo_llm", tmp_path / "killed", single("dpo_llm"), resumed.stdout)


# ---------------------------------------------------------------------------------------------------------------
# A bad setup fails in one line, before anything is built or written
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script,flags,needle", [
    ("dpo_llm", ["--batch_size", 32], "--batch_size / --gradient_accumulation_steps = 32 examples do not split evenly over 3"),
    ("dpo_llm", ["--batch_size", 8, "--gradient_accumulation_steps", 2], "= 4 examples do not split evenly over 3"),
    ("rlhf_llm", ["--batch_size", 6, "--rollout_batch_size", 32], "--rollout_batch_size / --num_mini_batches"),
    ("aihf_llm", ["--batch_size", 6, "--rollout_batch_size", 8, "--num_mini_batches", 1], "= 8 examples do not split"),
    ("afd_llm", ["--batch_size", 16], "--batch_size / --gradient_accumulation_steps = 16 examples"),
])
def test_world_size_that_does_not_split_the_batch(monkeypatch, tmp_path, script, flags, needle):
    m = importlib.import_module(script)
    monkeypatch.setattr(m, "DISTRIBUTED", True)
    monkeypatch.setattr(m, "WORLD_SIZE", 3)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *map(str, flags), "--output_dir", str(tmp_path / "out")])
    assert needle in fails_in_one_line(m.main, tmp_path / "out")


def test_torchrun_with_a_bad_batch_writes_nothing(tmp_path, task_cache):
    proc = torchrun("dpo_llm.py", "--batch_size", 5, "--task.cache_dir", task_cache, "--output_dir", tmp_path / "out",
                    check=False)
    assert proc.returncode != 0 and not (tmp_path / "out").exists()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    # every process that gets to print says the same line (torchrun stops the other once the first has failed)
    assert len(errors) in (1, 2) and len(set(errors)) == 1 and "do not split evenly over 2 processes" in errors[0], proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# The helpers on two processes: shares, gathers and reductions; one PPO step
# ---------------------------------------------------------------------------------------------------------------
def _ppo_problem():
    """A tiny policy and value model and one PPO rollout batch of 8 (responses of equal length, so that any split of
    the batch into micro-batches has the same token mean), the same in every process; and PPO's settings: one
    minibatch of two micro-batches."""
    from types import SimpleNamespace

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification

    config = dict(vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=16, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    policy, value_model = GPTNeoXForCausalLM(GPTNeoXConfig(**config)), GPTNeoXForSequenceClassification(GPTNeoXConfig(**config, num_labels=1))
    value_model.config.reward_bias = 0.0
    g = torch.Generator().manual_seed(1)
    sequences = torch.randint(2, 12, (8, 6), generator=g)
    batch = {"sequences": sequences, "attention": torch.ones(8, 6, dtype=torch.long), "responses": sequences[:, 3:],
             "response_mask": torch.ones(8, 3, dtype=torch.bool),
             **{k: torch.randn(8, 3, generator=g) - (2.5 if k == "logprobs" else 0) for k in ("logprobs", "advantages", "values", "returns")}}
    args = SimpleNamespace(num_ppo_epochs=1, num_mini_batches=1, gradient_accumulation_steps=2, cliprange=0.2,
                           cliprange_value=0.2, vf_coef=0.1, max_grad_norm=1.0, target_kl=None, temperature=1.0,
                           logprob_chunk_size=16, parallel="ddp", bf16=False)
    return policy, value_model, batch, args


def _ppo_step(m, policy, value_model, batch, args):
    """One PPO optimizer step (ppo_update) on these models; the policy's weights after it."""
    parameters = [*policy.parameters(), *value_model.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=1.0)  # (Adam's first step is about lr * sign(g): ill-conditioned to compare)
    m.ppo_update(m.parallelize(policy, args), m.parallelize(value_model, args), optimizer, batch, args,
                 contextlib.nullcontext(), seed=0)
    return {k: v.detach().clone() for k, v in policy.state_dict().items()}


def _reward_problem():
    """AIHF-RL's reward step: a tiny reward model, 8 (demonstration, sample) pairs and 8 preference pairs of different
    lengths, the same in every process; two micro-batches per step."""
    from types import SimpleNamespace

    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    torch.manual_seed(0)
    reward_model = GPTNeoXForSequenceClassification(GPTNeoXConfig(
        vocab_size=12, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, pad_token_id=0, num_labels=1))
    reward_model.config.reward_bias = 0.0
    g = torch.Generator().manual_seed(2)
    pairs = [[tuple(torch.randint(2, 12, (int(n),), generator=g).tolist() for n in torch.randint(1, 6, (3,), generator=g))
              for _ in range(8)] for _ in range(2)]
    args = SimpleNamespace(w_demo=0.7, w_pref=1.3, gradient_accumulation_steps=2, max_grad_norm=1.0, parallel="ddp", bf16=False)
    return reward_model, *pairs, args


def _reward_step(m, reward_model, demo_pairs, pref_pairs, args):
    """One reward step (reward_step) of this process's share of the pairs; the reward model's weights after it."""
    optimizer = torch.optim.SGD(reward_model.parameters(), lr=1.0)
    m.reward_step(make_run(m, args, autocast=contextlib.nullcontext()), m.parallelize(reward_model, args), optimizer,
                  m.this_rank(demo_pairs), m.this_rank(pref_pairs))
    return {k: v.detach().clone() for k, v in reward_model.state_dict().items()}


def _helpers_on_two_processes(rank, port, out):
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    m = importlib.import_module("rlhf_llm")
    torch.distributed.init_process_group("gloo")
    items = list(range(7))
    share = m.this_rank(items)
    x = torch.arange(12.0).view(6, 2) + 100 * rank
    g = torch.Generator().manual_seed(0)
    advantages, mask = torch.randn(8, 5, generator=g), torch.rand(8, 5, generator=g) > 0.3
    rows = slice(4 * rank, 4 * rank + 4)
    m.seed_share(5)
    result = {"share": share, "gathered": m.gather([i * 10 for i in share], len(items)), "tensor": m.gather(x),
              "sum": m.global_sum(torch.tensor([rank + 1.0])), "mean": m.global_mean(torch.tensor([rank + 1.0])),
              "whitened": m.masked_whiten(advantages[rows], mask[rows]), "draw": torch.rand(3),
              "token_mean": m.token_share(mask[rows]) * advantages[rows][mask[rows]].mean(),
              "everywhere": m.same_everywhere(f"rank {rank}")}
    policy, value_model, batch, args = _ppo_problem()
    result["ppo_weights"] = _ppo_step(m, policy, value_model, {k: v[rows] for k, v in batch.items()}, args)
    result["reward_weights"] = _reward_step(importlib.import_module("aihf_llm"), *_reward_problem())
    torch.save(result, os.path.join(out, f"{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_shares_gathers_and_reductions_on_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_helpers_on_two_processes, args=(port, str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"{rank}.pt", weights_only=False) for rank in (0, 1))
    assert r0["share"] == [0, 1, 2, 3] and r1["share"] == [4, 5, 6, 6]  # equal shares; the last item repeated
    assert r0["gathered"] == r1["gathered"] == [0, 10, 20, 30, 40, 50, 60]  # in order, the repeat dropped
    torch.testing.assert_close(r0["tensor"], torch.cat([torch.arange(12.0).view(6, 2), torch.arange(12.0).view(6, 2) + 100]))
    assert r0["sum"].item() == r1["sum"].item() == 3 and r0["mean"].item() == r1["mean"].item() == 1.5
    m = importlib.import_module("rlhf_llm")  # one process: the whole batch's whitening, cut in halves
    g = torch.Generator().manual_seed(0)
    advantages, mask = torch.randn(8, 5, generator=g), torch.rand(8, 5, generator=g) > 0.3
    torch.testing.assert_close(torch.cat([r0["whitened"], r1["whitened"]]), m.masked_whiten(advantages, mask))
    assert mask[:4].sum() != mask[4:].sum()  # the halves hold different numbers of tokens, as responses do
    # each process's token mean, weighted by token_share, averages (as DDP averages gradients) to the whole batch's
    torch.testing.assert_close((r0["token_mean"] + r1["token_mean"]) / 2, advantages[mask].mean())
    torch.manual_seed(5)
    assert torch.equal(r0["draw"], torch.rand(3)) and not torch.equal(r0["draw"], r1["draw"])  # own sampling streams
    assert r0["everywhere"] == r1["everywhere"] == "rank 0"
    # one PPO step under DDP, each process its half of each micro-batch, gradients all-reduced with the last
    # micro-batch only: the weights of one process stepping on the whole batch, on both processes
    single, before = _ppo_step(m, *_ppo_problem()), _ppo_problem()[0].state_dict()
    assert sum(not torch.equal(value, before[name]) for name, value in single.items()) > len(single) // 2  # it moved
    for name, value in single.items():
        torch.testing.assert_close(r0["ppo_weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(r0["ppo_weights"][name], r1["ppo_weights"][name]), name
    # AIHF-RL's reward step the same way: each process half of the demo and of the preference pairs, two micro-batches
    single, before = _reward_step(importlib.import_module("aihf_llm"), *_reward_problem()), _reward_problem()[0].state_dict()
    assert sum(not torch.equal(value, before[name]) for name, value in single.items()) > len(single) // 2  # it moved
    for name, value in single.items():
        torch.testing.assert_close(r0["reward_weights"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(r0["reward_weights"][name], r1["reward_weights"][name]), name


def test_eval_reward_model_on_two_processes(tiny_eval_rm, task_cache, tmp_path):
    """--eval_reward_model under torchrun: each process samples and scores its share of the held-out prompts (15: an
    uneven split, whose padding copies are dropped again), and the run reports every prompt's score once."""
    torchrun("dpo_llm.py", *RUNS["dpo_llm"][0], "--eval_reward_model", tiny_eval_rm, "--num_eval_prompts", 15,
             "--task.cache_dir", task_cache, "--output_dir", tmp_path, "--run_name", "two")
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert {"eval_rm_score_init", "eval_rm_score_sft", "eval_rm_score"} <= set(metrics)
    assert 0 <= metrics["eval_rm_win_rate"] <= 1 and metrics["eval_rm_score_ci95"] > 0
    kept = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False)["eval_responses"]
    assert set(kept) == {"_init", "_sft"} and all(len(r) == 15 for r in kept.values())

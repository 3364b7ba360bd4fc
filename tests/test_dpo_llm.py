"""dpo_llm.py: fused chunked log-probs vs naive, the DPO losses vs formulas, data paths, bad input, resume."""

import json
import math
import os
import shutil
import sys

import pytest
import torch

import dpo_llm
from conftest import assert_learned, fails_in_one_line, kill_when, run_script
from dpo_llm import chunked_logps, dpo_loss

# Small, yet DPO moves the policy measurably beyond SFT (so a run that learns the wrong way fails the smoke test).
TINY = ["--task.num_demos", 256, "--task.num_prefs", 256, "--task.num_eval_prompts", 64, "--task.num_eval_prefs", 256,
        "--sft_epochs", 2, "--num_epochs", 2, "--batch_size", 16, "--sft_learning_rate", 1e-3, "--learning_rate", 2e-4]

SMOKE_RUNS = {"smoke": ("dpo_llm.py", TINY)}
# What the smoke run must have learned (tests/margins.md has each value over seeds and CPU code paths):
LEARNED = {"smoke": [
    ("SFT learned the demonstrations: sampled gold over pi0's", lambda r: r.m["gold_reward_sft"] - r.m["gold_reward_init"], 0.03),
    ("DPO's implicit reward ranks held-out pairs: accuracy", lambda r: r.m["pref_accuracy"], 0.55),
    ("... and its mean margin", lambda r: r.m["eval_reward_margin"], 0.05),
]}
# (Not checked: DPO's gold reward over SFT's. At this size it is within seed noise, -0.08 to +0.08 over six seeds; the
# default run's is +0.09 to +0.12 over three. A loop that ascends the loss ranks the held-out pairs below chance.)


def naive_logps(hidden, weight, targets, ignore_index=-100):
    logits = (hidden.float() @ weight.float().t())
    out = torch.log_softmax(logits, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return out.masked_fill(targets == ignore_index, 0.0)


def random_problem(n, d, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("n,d,v,chunk", [(37, 16, 50, 7), (64, 32, 101, 64), (5, 8, 30, 1000), (130, 24, 77, 33)])
def test_chunked_logps_match_naive_fp32(n, d, v, chunk):
    hidden, weight, targets = random_problem(n, d, v, torch.float32)
    torch.testing.assert_close(chunked_logps(hidden, weight, targets, chunk), naive_logps(hidden, weight, targets),
                               rtol=1e-5, atol=1e-5)


def test_chunked_logps_bf16_loose():
    hidden, weight, targets = random_problem(96, 64, 257, torch.bfloat16)
    ours = chunked_logps(hidden, weight, targets, 40)
    assert ours.dtype == torch.float32  # fp32 math on bf16 inputs
    torch.testing.assert_close(ours, naive_logps(hidden.float(), weight.float(), targets), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_weight_gradient_accumulates_in_fp32(device):
    """The LM-head weight gradient sums each chunk's bf16 product grad_logits^T @ hidden in fp32. On CUDA, where
    torch allows it, the product goes into the fp32 gradient in place: fp32-accurate, and no gradient-sized temporary."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(64, 1024, generator=g).to(torch.bfloat16), torch.randn(64, 256, generator=g).to(torch.bfloat16))
              for _ in range(3)]
    exact = sum(a.double().t() @ h.double() for a, h in chunks)
    chunks = [(a.to(device), h.to(device)) for a, h in chunks]
    grad = torch.zeros(1024, 256, device=device)  # 1 MB
    in_place = dpo_llm._adds_bf16_into_fp32(device)
    if device.type == "cpu":
        assert not in_place  # torch has no bf16-into-fp32 addmm on the CPU
    if in_place:
        dpo_llm._accumulate_(torch.zeros_like(grad), *chunks[0])  # cuBLAS allocates its workspace on first use
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    for a, h in chunks:
        dpo_llm._accumulate_(grad, a, h)
    if in_place:  # the cast-and-add would hold a bf16 product (0.5 MB) and its fp32 copy (1 MB)
        assert torch.cuda.max_memory_allocated() - before < grad.numel() * 4 // 2
    # bf16 factors, fp32 sums: in place the product itself is fp32; by cast-and-add it is rounded to bf16 first
    tol = 1e-5 if in_place else 1e-2
    torch.testing.assert_close(grad.cpu().double(), exact, rtol=tol, atol=tol * exact.abs().max().item())


def test_dpo_loss_formulas_by_hand():
    pc, pr, rc, rr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -0.5]), torch.tensor([-3.5, -1.0]), torch.tensor([-3.0, -1.0])
    beta = 0.1
    # pair 0: h = 0.1 * ((-3 + 3.5) - (-4 + 3)) = 0.15;  pair 1: h = 0.1 * (0 - 0.5) = -0.05
    h = [0.15, -0.05]
    sig = lambda x: 1 / (1 + math.exp(-x))
    policy, ref = torch.stack([pc, pr], 1).flatten(), torch.stack([rc, rr], 1).flatten()  # rows [c0, r0, c1, r1]
    losses, chosen, rejected = dpo_loss(policy, ref, beta, "sigmoid", 0.0)
    torch.testing.assert_close(losses, torch.tensor([-math.log(sig(x)) for x in h]))
    torch.testing.assert_close(chosen, torch.tensor([0.05, 0.0]))
    torch.testing.assert_close(rejected, torch.tensor([-0.1, 0.05]))
    losses, _, _ = dpo_loss(policy, ref, beta, "sigmoid", 0.25)
    torch.testing.assert_close(losses, torch.tensor([-0.75 * math.log(sig(x)) - 0.25 * math.log(sig(-x)) for x in h]))
    losses, _, _ = dpo_loss(policy, ref, beta, "ipo", 0.0)  # (h/beta - 1/(2 beta))^2 = (h/0.1 - 5)^2
    torch.testing.assert_close(losses, torch.tensor([(x / beta - 5) ** 2 for x in h]))


def test_split_hh():
    prompt, response = dpo_llm.split_hh("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant: like this")
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how?\n\nAssistant:" and response == " like this"
    assert dpo_llm.split_hh("no assistant turn") == (None, None)


def test_collate_shifts_targets():
    ids, mask, targets = dpo_llm.collate([[5, 6, 7, 8], [5, 9]], [2, 1], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]] and mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert targets.tolist() == [[-100, 7, 8, -100], [9, -100, -100, -100]]


@pytest.mark.parametrize("lengths", [[(5, 3, 6), (2, 4, 1), (7, 7, 2)], [(4, 3, 3), (4, 3, 3)]], ids=["ragged", "unpadded"])
def test_shared_prompt_forward_matches_concatenated(lengths):
    """The prompt run once for both responses gives the log-probs and gradients of [prompt + response] rows.
    ("unpadded": no padding anywhere, where an all-ones mask must still be causal across prompt and response.)"""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTNeoXForCausalLM(config).eval()
    g = torch.Generator().manual_seed(1)
    examples = [tuple(torch.randint(2, 40, (n,), generator=g).tolist() for n in triple) for triple in lengths]
    weight = model.get_output_embeddings().weight

    upstream = torch.linspace(-1, 1, 2 * len(examples))  # distinct weights per row: a swapped row would show

    def logps_and_grads(hidden, targets, rows):
        loss, _, row_logps = dpo_llm.fused_linear_loss(lambda logps, u: logps * u, hidden, weight, targets, rows, upstream,
                                                       chunk_size=4)
        return row_logps, torch.autograd.grad(loss, list(model.parameters()))

    sequences = [p + r for p, c, rj in examples for r in (c, rj)]
    ids, mask, targets = dpo_llm.collate(sequences, [len(p) for p, _, _ in examples for _ in range(2)], pad_id=0)
    concatenated = logps_and_grads(*dpo_llm.scored_tokens(model, ids, mask, targets))
    shared = logps_and_grads(*dpo_llm.pair_scored_tokens(model, *dpo_llm.pair_batch(examples, pad_id=0)))
    torch.testing.assert_close(shared[0], concatenated[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(shared[1], concatenated[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and both equal the plain model's log-softmax over its full logits
    logits = model(input_ids=ids, attention_mask=mask).logits
    plain = torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2)
    torch.testing.assert_close(shared[0], (plain * (targets != -100)).sum(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("sigmoid", 0.3, 0.2),
                                               ("ipo", 0.4, 0.0)])
def test_training_loss_is_dpo_of_the_flags(loss_type, beta, eps):
    """The loss the DPO loop trains on (dpo_batch_loss) is the DPO family of --beta, --label_smoothing and
    --loss_type, against the plain model's full logits and a hand-written formula: value and every gradient."""
    from types import SimpleNamespace

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=64)
    model = GPTNeoXForCausalLM(config).eval()
    g = torch.Generator().manual_seed(2)
    examples = [tuple(torch.randint(2, 40, (n,), generator=g).tolist() for n in triple) for triple in [(5, 3, 6), (2, 4, 1), (7, 7, 2)]]
    ref = torch.randn(6, generator=g) - 10
    args = SimpleNamespace(beta=beta, loss_type=loss_type, label_smoothing=eps, batch_size=4, logprob_chunk_size=7)
    loss, chosen_r, rejected_r, _ = dpo_llm.dpo_batch_loss(model, dpo_llm.pair_batch(examples, pad_id=0), ref, args,
                                                          torch.autocast("cpu", enabled=False))
    grads = torch.autograd.grad(loss, list(model.parameters()))

    sequences = [p + r for p, c, rj in examples for r in (c, rj)]
    ids, mask, targets = dpo_llm.collate(sequences, [len(p) for p, _, _ in examples for _ in range(2)], pad_id=0)
    logits = model(input_ids=ids, attention_mask=mask).logits
    logps = (torch.log_softmax(logits, -1).gather(2, targets.clamp(min=0)[..., None]).squeeze(2) * (targets != -100)).sum(1)
    h = beta * ((logps[0::2] - ref[0::2]) - (logps[1::2] - ref[1::2]))
    if loss_type == "ipo":
        per_pair = (h / beta - 1 / (2 * beta)) ** 2
    else:
        per_pair = -(1 - eps) * torch.log(torch.sigmoid(h)) - eps * torch.log(torch.sigmoid(-h))
    expected = per_pair.sum() / args.batch_size
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chosen_r - rejected_r, h.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------
def test_help_offline():
    proc = run_script("dpo_llm.py", "--help")
    assert "--beta" in proc.stdout and "--task.num-demos" in proc.stdout.replace("_", "-")


def test_smoke_embedded(tmp_path, task_cache):
    run_script("dpo_llm.py", *SMOKE_RUNS["smoke"][1], "--task.cache_dir", task_cache, "--output_dir", tmp_path,
               "--run_name", "smoke")
    run = tmp_path / "smoke"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"algo", "task", "seed", "steps", "wall_s"} <= metrics.keys()
    assert metrics["algo"] == "dpo" and metrics["steps"] == 2 * 16 + 2 * 16
    assert_learned(run, LEARNED["smoke"])
    assert (run / "model" / "config.json").exists() and (run / "sft_model" / "config.json").exists()
    assert json.loads((run / "config.json").read_text())["beta"] == 0.1
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run))


def test_hh_format_local_model(tmp_path, tiny_hh):
    proc = run_script("dpo_llm.py", "--model_name_or_path", tiny_hh["model"], "--dataset_name", tiny_hh["train"],
                      "--sft_dataset_name", tiny_hh["sft"], "--max_length", 64, "--max_prompt_length", 40,
                      "--sft_epochs", 1, "--num_epochs", 1, "--batch_size", 8, "--output_dir", tmp_path, "--run_name", "hh")
    assert "no pad token" in proc.stdout  # handled, and said
    assert "dropped" in proc.stdout  # the 3-turn prompts exceed 40 tokens: counted and reported
    metrics = json.loads((tmp_path / "hh" / "metrics.json").read_text())
    assert metrics["task"] == tiny_hh["train"] and "gold_reward" not in metrics and 0 <= metrics["pref_accuracy"] <= 1


def test_hh_saved_dataset_dict_with_test_split(tmp_path, tiny_hh):
    import datasets

    saved = tmp_path / "hh_saved"
    datasets.load_dataset("json", data_files={"train": tiny_hh["train"], "test": tiny_hh["test"]}).save_to_disk(str(saved))
    proc = run_script("dpo_llm.py", "--model_name_or_path", tiny_hh["model"], "--dataset_name", saved, "--sft_epochs", 0,
                      "--num_epochs", 1, "--batch_size", 8, "--max_length", 256, "--max_prompt_length", 200,
                      "--output_dir", tmp_path, "--run_name", "saved")
    assert "holding out" not in proc.stdout and "dropped" not in proc.stdout  # the test split is used, nothing dropped
    assert json.loads((tmp_path / "saved" / "metrics.json").read_text())["steps"] == 40 // 8


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, exit != 0, before training, nothing written
# ---------------------------------------------------------------------------------------------------------
def _fails(monkeypatch, tmp_path, *flags):
    monkeypatch.setattr(sys, "argv", ["dpo_llm.py", *map(str, flags), "--output_dir", str(tmp_path / "out")])
    return fails_in_one_line(dpo_llm.main, tmp_path / "out")


@pytest.mark.parametrize("flags,needle", [
    (["--beta", 0], "--beta must be in (0,"),
    (["--beta", -1], "--beta must be in (0,"),
    (["--batch_size", 10, "--gradient_accumulation_steps", 3], "not divisible"),
    (["--label_smoothing", 0.7], "--label_smoothing must be in [0, 0.5)"),
    (["--loss_type", "ipo", "--label_smoothing", 0.1], "sigmoid only"),
    (["--max_prompt_length", 64, "--max_length", 64], "--max_prompt_length"),
    (["--task.min_digits", 9, "--task.max_digits", 3], "--task.min_digits"),
    (["--learning_rate", -1], "--learning_rate must be in (0,"),
    (["--task.num_prefs", 0], "only 0 preference pairs (--task.num_prefs) for --batch_size 32"),
    (["--logprob_kernel", "triton", "--device", "cpu"], "--logprob_kernel triton needs"),  # no triton, or no GPU
])
def test_bad_arguments(monkeypatch, tmp_path, flags, needle):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert needle in _fails(monkeypatch, tmp_path, *flags)


def test_bad_data(monkeypatch, tmp_path, tiny_hh):
    model = ["--model_name_or_path", tiny_hh["model"]]
    assert "dataset path not found" in _fails(monkeypatch, tmp_path, *model, "--dataset_name", tmp_path / "nope.jsonl")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "q", "answer": "a"}\n')
    message = _fails(monkeypatch, tmp_path, *model, "--dataset_name", wrong)
    assert "lacks the columns" in message and "['answer', 'question']" in message
    null = tmp_path / "null.jsonl"
    null.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a", "rejected": null}\n')
    message = _fails(monkeypatch, tmp_path, *model, "--dataset_name", null)
    assert "column 'rejected' holds None at row 1" in message
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in _fails(monkeypatch, tmp_path, *model, "--dataset_name", empty)
    message = _fails(monkeypatch, tmp_path, *model, "--dataset_name", tiny_hh["train"], "--max_prompt_length", 4, "--max_length", 64)
    assert "no examples left" in message and "--max_prompt_length" in message
    assert "model path not found" in _fails(monkeypatch, tmp_path, "--model_name_or_path", tmp_path / "no_model",
                                            "--dataset_name", tiny_hh["train"])
    short = tmp_path / "short_context"  # the same model, with a context shorter than the data's rows
    shutil.copytree(tiny_hh["model"], short)
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 32}))
    message = _fails(monkeypatch, tmp_path, "--model_name_or_path", short, "--dataset_name", tiny_hh["train"],
                     "--max_length", 200, "--max_prompt_length", 160, "--batch_size", 8)
    assert "exceed the model's context (32)" in message and "--max_length" in message


def test_resume_without_checkpoint(monkeypatch, tmp_path):
    (tmp_path / "empty_run").mkdir()
    assert "holds no checkpoint" in _fails(monkeypatch, tmp_path, "--resume", tmp_path / "empty_run")


def test_killed_run_resumes_to_the_same_result(tmp_path, task_cache):
    """Kill a run after its first checkpoint, resume it, and get what an uninterrupted run gets."""
    flags = [*TINY, "--task.cache_dir", task_cache, "--save_every", 2, "--output_dir", tmp_path]
    run_script("dpo_llm.py", *flags, "--run_name", "whole")
    checkpoint = tmp_path / "killed" / "checkpoint.pt"
    kill_when("dpo_llm.py", *flags, "--run_name", "killed", path=checkpoint)
    assert checkpoint.exists() and not (tmp_path / "killed" / "metrics.json").exists()
    (tmp_path / "killed" / "checkpoint.pt.tmp4242").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves it
    run_script("dpo_llm.py", "--resume", tmp_path / "killed")
    assert not (tmp_path / "killed" / "checkpoint.pt.tmp4242").exists()
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    for key in ("steps", "gold_reward_init", "gold_reward_sft", "gold_reward", "gold_reward_greedy", "pref_accuracy"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    # Killed after training, during the final evaluation: the resume only re-evaluates, keeping the measured throughput.
    shutil.copytree(tmp_path / "whole", tmp_path / "in_eval")
    (tmp_path / "in_eval" / "metrics.json").unlink()
    run_script("dpo_llm.py", "--resume", tmp_path / "in_eval")
    in_eval = json.loads((tmp_path / "in_eval" / "metrics.json").read_text())
    for key in ("steps", "dpo_tokens_per_s", "gold_reward", "gold_reward_greedy", "pref_accuracy"):
        assert in_eval[key] == pytest.approx(whole[key], abs=1e-6), key

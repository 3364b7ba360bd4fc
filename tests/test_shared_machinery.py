"""What every top-level script shares: identical copies of the shared helpers, the fused LM-head losses of each
script against the naive path, and the promise that one script copied alone into another project still works."""

import ast
import glob
import json
import math
import os
import shutil
import subprocess
import sys
from functools import partial
from importlib import import_module
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_learned, fails_in_one_line, make_run, run_script

SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")) if not p.endswith("sort_task.py"))
LLM_SCRIPTS = [s for s in SCRIPTS if s.endswith("_llm.py")]
# Defined in every script on purpose, each its own: the knobs, their ranges, the loop and its checks.
PER_SCRIPT = {"Args", "RANGES", "main", "validate_args"}
# Same name, another job on purpose (the LLM scripts' copies are still compared with each other):
# - a MuJoCo run holds an agent, a replay buffer and the env's RNG instead of a language model, so its
#   run-directory and checkpoint helpers are its own;
# - AIHF's reward step on MuJoCo is the authors' linear ML-IRL contrast on per-step rewards plus Bradley-Terry on
#   segment returns; on language models the demonstration term is Bradley-Terry on (demo, sample) pairs.
OWN_COPY = {("aihf_mujoco.py", "open_run"), ("aihf_mujoco.py", "save_checkpoint"), ("aihf_mujoco.py", "aihf_reward_loss")}


def top_level_definitions(path):
    """name -> source of each module-level function, class and constant (inside module-level if/try too), with its
    decorators and the comment lines right above it (a section's "# ----" or "# ====" rule ends them): a copy whose
    code, docstring or comments drifted reads differently."""
    source = open(path).read()
    lines, found = source.splitlines(), {}

    def visit(body):
        for node in body:
            name = node.name if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
                node.targets[0].id if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) else None
            if name:
                start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
                while start and lines[start - 1].lstrip().startswith("#") and not lines[start - 1].startswith(("# ----", "# ====")):
                    start -= 1
                found[name] = "\n".join(lines[start : node.end_lineno])
            elif isinstance(node, ast.If):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + [n for h in node.handlers for n in h.body])

    visit(ast.parse(source).body)
    return found


def test_scripts_found():
    assert {"dpo_llm.py", "rlhf_llm.py", "aihf_mujoco.py"} <= set(SCRIPTS)


def test_shared_helpers_are_identical_copies():
    """A helper defined in several scripts is the same code in each (a fix in one is carried to all)."""
    definitions = {s: top_level_definitions(os.path.join(ROOT, s)) for s in SCRIPTS}
    differing = []
    names = {n for d in definitions.values() for n in d} - PER_SCRIPT
    for name in sorted(names):
        holders = [s for s in SCRIPTS if name in definitions[s] and (s, name) not in OWN_COPY]
        if len({definitions[s][name] for s in holders}) > 1:
            differing.append(f"{name} differs between {holders}")
    assert not differing, "\n".join(differing)


def test_copy_check_bites(tmp_path):
    """The comparison above sees a one-token change in a copy, and a changed comment."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f(x):\n    return x + 1\n")
    b.write_text("def f(x):\n    return x - 1\n")
    assert top_level_definitions(a)["f"] != top_level_definitions(b)["f"]
    # and a comment that drifted, inside the function or right above it
    for drifted in ("def f(x):\n    return x + 1  # one more\n", "# one more\ndef f(x):\n    return x + 1\n"):
        b.write_text(drifted)
        assert top_level_definitions(a)["f"] != top_level_definitions(b)["f"]


# ---------------------------------------------------------------------------------------------------------------
# The fused LM-head losses of every script that carries them, against the naive full-logits path
# ---------------------------------------------------------------------------------------------------------------
FUSED = [s[:-3] for s in LLM_SCRIPTS if "fused_linear_loss" in top_level_definitions(os.path.join(ROOT, s))]
PAIR_LOSS = [m for m in FUSED if "dpo_loss" in top_level_definitions(os.path.join(ROOT, m + ".py"))]  # (DPO's family)


def naive_logps(hidden, weight, targets):
    return torch.log_softmax(hidden.float() @ weight.float().t(), -1).gather(1, targets[:, None]).squeeze(1)


def random_problem(n, d, v, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).requires_grad_()
    weight = (torch.randn(v, d, generator=g) / math.sqrt(d)).requires_grad_()
    return hidden, weight, torch.randint(0, v, (n,), generator=g)


def hand_dpo(policy, ref, beta, loss_type, eps):
    """The DPO family written out again, independently of the scripts' dpo_loss."""
    h = beta * ((policy[0::2] - ref[0::2]) - (policy[1::2] - ref[1::2]))
    if loss_type == "ipo":
        return (h / beta - 1 / (2 * beta)) ** 2
    return -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


@pytest.mark.parametrize("module", PAIR_LOSS)
@pytest.mark.parametrize("chunk", [1, 9, 25, 4096])
@pytest.mark.parametrize("loss_type,eps,beta", [("sigmoid", 0.0, 0.5), ("sigmoid", 0.2, 0.1), ("ipo", 0.0, 0.5)])
def test_fused_pair_loss_matches_naive(module, chunk, loss_type, eps, beta):
    """The fused loss over whole pairs: loss, gradients, sequence log-probs and the returned statistics."""
    m = import_module(module)
    lengths = torch.tensor([3, 7, 1, 4, 6, 2, 5, 5, 8, 1])  # 5 pairs, sequences [c0, r0, c1, r1, ...] of uneven lengths
    seq_ids = torch.repeat_interleave(torch.arange(10), lengths)
    hidden, weight, targets = random_problem(len(seq_ids), 16, 40, seed=1)
    ref = torch.randn(10)
    loss, (chosen_r, rejected_r), logps = m.fused_linear_loss(
        partial(m.dpo_loss, beta=beta, loss_type=loss_type, label_smoothing=eps), hidden, weight, targets, seq_ids, ref,
        group_size=2, scale=1 / 5, chunk_size=chunk)
    grads = torch.autograd.grad(loss * 3.0, [hidden, weight])  # an upstream scale reaches both gradients
    naive_seq = torch.zeros(10).index_add(0, seq_ids, naive_logps(hidden, weight, targets))
    naive_loss = hand_dpo(naive_seq, ref, beta, loss_type, eps).sum() / 5
    naive_grads = torch.autograd.grad(naive_loss * 3.0, [hidden, weight])
    torch.testing.assert_close(loss, naive_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logps, naive_seq.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chosen_r, beta * (naive_seq - ref)[0::2].detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rejected_r, beta * (naive_seq - ref)[1::2].detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, naive_grads):  # IPO's gradients are large (1/beta^2): fp32 noise ~1e-5 absolute
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("module", FUSED)
def test_fused_cross_entropy_matches_torch(module):
    m = import_module(module)
    hidden, weight, targets = random_problem(77, 12, 31, seed=2)
    loss, stats, _ = m.fused_linear_loss(m.sft_loss, hidden, weight, targets, torch.arange(77), scale=1 / 77, chunk_size=10)
    grads = torch.autograd.grad(loss, [hidden, weight])
    ref = F.cross_entropy(hidden @ weight.t(), targets)
    ref_grads = torch.autograd.grad(ref, [hidden, weight])
    assert stats == ()
    torch.testing.assert_close(loss, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Copy one file into another project: it runs alone on local data, and says what it misses for the embedded task
# ---------------------------------------------------------------------------------------------------------------
def tiny_local_run(script, hh):
    """Flags for a tiny run of each LLM script on the local HH-format files and tiny model (conftest.tiny_hh)."""
    common = ["--model_name_or_path", hh["model"], "--dataset_name", hh["train"], "--max_length", 200,
              "--max_prompt_length", 160, "--batch_size", 8, "--num_threads", 1]
    return {
        "afd_llm.py": [*common, "--sft_epochs", 1, "--rm_epochs", 1, "--response_length", 6, "--max_n", 2],
        "dpo_llm.py": [*common, "--sft_epochs", 1, "--num_epochs", 1],
        "aihf_llm.py": [*common, "--start", "pi0", "--response_length", 6, "--total_episodes", 8, "--rollout_batch_size", 4,
                        "--num_eval_demos", 4],
        "rlhf_llm.py": [*common, "--reward_model_path", hh["model"], "--sft_epochs", 1, "--rm_epochs", 1,
                        "--response_length", 6, "--total_episodes", 8, "--rollout_batch_size", 4, "--num_reward_norm_samples", 4],
    }[script]


def run_alone(folder, script, *flags):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, script, *map(str, flags)], cwd=folder, capture_output=True, text=True,
                          env={**env, "TOKENIZERS_PARALLELISM": "false"}, timeout=600)


@pytest.mark.parametrize("script", LLM_SCRIPTS)
def test_copied_script_runs_alone(script, tmp_path, tiny_hh):
    shutil.copy(os.path.join(ROOT, script), tmp_path / script)
    assert os.listdir(tmp_path) == [script]
    proc = run_alone(tmp_path, script, "--help")
    assert proc.returncode == 0 and "dataset_name" in proc.stdout.replace("-", "_"), proc.stderr[-2000:]
    proc = run_alone(tmp_path, script)  # the embedded task is the default: it needs sort_task.py
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().startswith("error:") and "sort_task.py" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()
    proc = run_alone(tmp_path, script, *tiny_local_run(script, tiny_hh), "--run_name", "alone")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "runs" / "alone" / "metrics.json").read_text())
    assert metrics["task"] == tiny_hh["train"] and metrics["steps"] > 0


# ---------------------------------------------------------------------------------------------------------------
# --bf16 on the CPU: autocast to bfloat16, the GPU's --bf16 path less the Triton kernels
# ---------------------------------------------------------------------------------------------------------------
BF16_RUNS = {
    "dpo_llm.py": ["--task.num_demos", 96, "--task.num_prefs", 96, "--sft_epochs", 1, "--num_epochs", 1, "--batch_size", 8],
    "rlhf_llm.py": ["--task.num_demos", 32, "--task.num_prefs", 32, "--sft_epochs", 1, "--rm_epochs", 1, "--batch_size", 8,
                    "--total_episodes", 16, "--rollout_batch_size", 8, "--num_mini_batches", 2, "--num_reward_norm_samples", 8],
    "afd_llm.py": ["--task.num_demos", 48, "--task.num_prefs", 0, "--sft_epochs", 1, "--rm_epochs", 1, "--rm_eval_fraction", 0.25,
                   "--batch_size", 8, "--max_n", 2],
    "aihf_llm.py": ["--task.num_demos", 160, "--task.num_prefs", 96, "--num_eval_demos", 32, "--batch_size", 16,
                    "--total_episodes", 96, "--rollout_batch_size", 16, "--num_ppo_epochs", 2, "--start", "pi0", "--sft_epochs", 1],
}


SMOKE_RUNS = {f"bf16_{script[:-3]}": (script, [*flags, "--bf16", "--device", "cpu", "--task.num_eval_prompts", 8,
                                                "--task.num_eval_prefs", 16, "--eval_every", 0, "--num_threads", 1])
              for script, flags in BF16_RUNS.items()}
# What each --bf16 run must have learned (tests/margins.md has each value over seeds and CPU code paths):
LEARNED = {name: [("greedy gold over pi0's", lambda r: r.m["gold_reward_greedy"] - r.m["gold_reward_greedy_init"], 0.05)]
           for name in SMOKE_RUNS}


@pytest.mark.parametrize("script", LLM_SCRIPTS)
def test_bf16_run_learns_on_the_cpu(script, task_cache, tmp_path):
    """Every stage of each script under --bf16 (the backbone, the fused LM-head losses' chunk matmuls, generation,
    the reward and value heads in bf16; losses and optimizer state in fp32): the run finishes, its metrics are finite
    and its policy beats pi0 greedily."""
    name = f"bf16_{script[:-3]}"
    run_script(script, *SMOKE_RUNS[name][1], "--task.cache_dir", task_cache, "--output_dir", tmp_path, "--run_name", "bf16")
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    assert_learned(tmp_path / "bf16", LEARNED[name])


@pytest.mark.parametrize("module", [s[:-3] for s in LLM_SCRIPTS])
def test_bf16_autocast_reaches_the_lm_head(module):
    """Under autocast the hidden states that enter the fused LM-head losses are bf16 (the final layer norm hands back
    fp32): without the cast the chunk matmuls would silently run in fp32, at fp32's speed and memory."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = import_module(module)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, max_position_embeddings=16))
    ids, mask = torch.randint(0, 12, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    assert m.hidden_states(model, ids, mask).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.hidden_states(model, ids, mask).dtype == torch.bfloat16


def test_every_mutant_still_applies():
    """Each mutant of tests/mutation_check.py names code that occurs exactly once in its script: after a change that
    rewrites that code the mutant would apply nowhere and the mutation check would test nothing with it."""
    from mutation_check import MUTANTS

    stale = [name for name, script, old, _, _ in MUTANTS for path in glob.glob(os.path.join(ROOT, script))
             if open(path).read().count(old) != 1]
    assert not stale, stale
    assert all(glob.glob(os.path.join(ROOT, script)) for _, script, _, _, _ in MUTANTS)


def test_load_policy_turns_dropout_off_and_refuses_transformed_logits(tmp_path):
    """Dropout is off in every layer (so pi / pi_ref is 1 at the start of DPO and PPO), and a model whose logits are
    rescaled after the LM head is refused in one line, in every LLM script's copy."""
    from transformers import GPT2Config, GPT2LMHeadModel, Gemma2Config, Gemma2ForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    from conftest import fails_in_one_line

    words = {w: i for i, w in enumerate(["<eos>", "<unk>"] + [str(d) for d in range(10)])}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    gpt2, gemma = tmp_path / "gpt2", tmp_path / "gemma2"
    GPT2LMHeadModel(GPT2Config(vocab_size=12, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(gpt2)  # dropout 0.1 everywhere by default
    Gemma2ForCausalLM(Gemma2Config(vocab_size=12, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   final_logit_softcapping=30.0)).save_pretrained(gemma)
    for folder in (gpt2, gemma):
        tokenizer.save_pretrained(folder)
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    for script in LLM_SCRIPTS:
        module = import_module(script[:-3])
        model, _ = module.load_policy(str(gpt2), "cpu")
        model.train()
        assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)), script
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
        message = fails_in_one_line(lambda: module.load_policy(str(gemma), "cpu"))
        assert "final_logit_softcapping=30.0" in message, (script, message)


@pytest.mark.parametrize("script", LLM_SCRIPTS)
def test_responses_cut_to_max_length_get_no_eos(script):
    """A response that fits ends in EOS; one cut to --max_length does not (the data never ended there)."""
    import sort_task
    from types import SimpleNamespace

    module = import_module(script[:-3])
    tokenizer = sort_task.build_tokenizer(sort_task.SortTaskConfig())
    eos = tokenizer.eos_token_id
    args = SimpleNamespace(max_prompt_length=8, max_length=10)
    (prompt, short, long), = module.tokenize_examples(tokenizer, ["sort: 3 1 ="], [[" 1 3"], [" 1 2 3 4 5 6 7 8 9"]],
                                                      args, "test")
    assert short == tokenizer(" 1 3", add_special_tokens=False)["input_ids"] + [eos]
    assert len(prompt) + len(long) == args.max_length and eos not in long
    assert long == tokenizer(" 1 2 3 4 5 6 7 8 9", add_special_tokens=False)["input_ids"][: len(long)]


def _tiny_sampler():
    """A GPTNeoX of 16 tokens with random weights, to sample from."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=32)).eval()


@pytest.mark.parametrize("module", [s[:-3] for s in LLM_SCRIPTS if s != "dpo_llm.py"])
def test_rollouts_ignore_the_models_own_generation_config(module):
    """Rollouts are plain softmax(logits / T) samples even from a model whose generation_config asks for more (here:
    every token but one suppressed), and the model keeps that config for save_pretrained."""
    m = import_module(module)
    model = _tiny_sampler()
    model.generation_config.suppress_tokens = [t for t in range(16) if t != 5]
    queries = torch.randint(2, 16, (8, 3))
    run = make_run(m, SimpleNamespace(temperature=1.0, forward_batch_size=4), response_length=6)
    responses = m.generate(model, queries, torch.ones_like(queries), run)
    assert responses.shape == (8, 6) and (responses != 5).any()
    assert model.generation_config.suppress_tokens == [t for t in range(16) if t != 5]


@pytest.mark.parametrize("module", [s[:-3] for s in LLM_SCRIPTS if s != "dpo_llm.py"])
def test_bf16_rollouts_are_sampled_under_autocast(module):
    """With --bf16 the samples come from the bf16 logits that score them as pi_old, not from an fp32 forward."""
    m = import_module(module)
    model = _tiny_sampler()
    dtypes = []
    model.get_output_embeddings().register_forward_hook(lambda _, __, logits: dtypes.append(logits.dtype))
    queries = torch.randint(2, 16, (4, 3))
    run = make_run(m, SimpleNamespace(temperature=1.0, forward_batch_size=4), response_length=3,
                   autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    m.generate(model, queries, torch.ones_like(queries), run)
    assert dtypes and set(dtypes) == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------------------------
# The scripts read algorithm first: a short main(), the core update early in the file (tests/structure.py)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_main_is_short_and_the_core_update_comes_early(script):
    from structure import CORE_SHARE, MAIN_LINES, measure

    _, main_lines, first, share = measure(script)
    assert main_lines <= MAIN_LINES, f"{script}: main() has {main_lines} lines; move a stage into its own function"
    assert first is not None and share <= CORE_SHARE, f"{script}: the core update first appears at line {first} ({share})"


# ---------------------------------------------------------------------------------------------------------------
# --track: Weights & Biases mirrors TensorBoard (an optional package: a clear error where it is missing)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_track_without_wandb_fails_in_one_line(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this machine has
    m = import_module(script[:-3])
    message = fails_in_one_line(lambda: m.validate_args(m.Args(track=True)))
    assert "--track" in message and "pip install wandb" in message
    assert [f for f in os.listdir(tmp_path) if f != "MUJOCO_LOG.TXT"] == []


# A stand-in for the wandb package: it records what the script asks of it.
FAKE_WANDB = '''
import json, os


def _record(event, **fields):
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps({"event": event, **fields}, default=str) + "\\n")


def init(**kwargs):
    _record("init", files_then=sorted(os.listdir(kwargs["dir"])), **kwargs)


def finish():
    _record("finish")
'''


@pytest.mark.parametrize("script,flags", [
    ("dpo_llm.py", ["--task.num_demos", 64, "--task.num_prefs", 64, "--task.num_eval_prompts", 8, "--task.num_eval_prefs",
                    16, "--sft_epochs", 1, "--num_epochs", 1, "--batch_size", 16]),
    ("aihf_mujoco.py", ["--algo", "sac", "--total_timesteps", 300, "--learning_starts", 100, "--eval_every", 300,
                        "--eval_episodes", 1, "--hidden", 32, "--batch_size", 32])])
def test_track_mirrors_tensorboard_to_wandb(script, flags, task_cache, tmp_path):
    """--track: wandb.init before the TensorBoard writer, with the project, entity, the flags as config and TensorBoard
    mirrored (sync_tensorboard), named and identified by the run folder (so --resume continues it); finish() at the end.
    The LLM scripts share this code (identical copies); MuJoCo's is its own."""
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(FAKE_WANDB)
    log = tmp_path / "wandb.jsonl"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), ROOT]), "FAKE_WANDB_LOG": str(log)}
    out = ["--task.cache_dir", task_cache, "--output_dir", tmp_path / "runs"] if script.endswith("_llm.py") else []
    run_script(script, *flags, *out, "--run_name", "tracked", "--track", "--wandb_project_name", "proj",
               "--wandb_entity", "team", "--num_threads", 1, cwd=tmp_path, env=env)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in events] == ["init", "finish"]
    init = events[0]
    assert init["project"] == "proj" and init["entity"] == "team" and init["sync_tensorboard"] is True
    assert init["name"] == init["id"] == "tracked" and init["resume"] == "allow"
    assert init["config"]["track"] is True and init["config"]["seed"] == 1 and init["config"]["run_name"] == "tracked"
    run_dir = tmp_path / "runs" / "tracked"
    assert glob.glob(str(run_dir / "events.out.tfevents.*"))  # TensorBoard's own files, which W&B mirrors ...
    assert os.path.samefile(tmp_path / init["dir"], run_dir)  # (MuJoCo's folder is relative to where it runs)
    assert not [f for f in init["files_then"] if "tfevents" in f]  # ... once they are made after init


# ---------------------------------------------------------------------------------------------------------------
# --eval_reward_model: a separate reward model scores the start, SFT and final policies' responses
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_reward_models(tiny_hh, tiny_eval_rm, tmp_path_factory):
    """Two scoring models with the tiny HH tokenizer (not the policy's): the decoder of tiny_eval_rm (a `score` head
    and a reward_bias of 0.25, as rlhf_llm.py saves reward models) and an encoder classifier read through its forward."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("eval_rm") / "encoder"
    tokenizer = AutoTokenizer.from_pretrained(tiny_hh["model"])
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, num_labels=1,
                                             max_position_embeddings=256, pad_token_id=0)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return {"decoder": tiny_eval_rm, "encoder": str(folder)}


@pytest.mark.parametrize("kind", ["decoder", "encoder"])
def test_eval_reward_model_scores_each_text_as_its_own_tokenizer_reads_it(kind, eval_reward_models):
    """score_texts: the scoring model's own tokens of each text + its EOS, batched and padded; the decoder read at that
    EOS minus its reward_bias (sequence_rewards), any other classifier through its forward; one text at a time gives
    the same scores (padding changes nothing)."""
    import dpo_llm as m

    model, tokenizer = m.load_eval_reward_model(eval_reward_models[kind], torch.device("cpu"))
    texts = ["\n\nHuman: hi\n\nAssistant: hello there", "\n\nHuman: how?\n\nAssistant: like this, slowly", "x"]
    run = make_run(m, SimpleNamespace(forward_batch_size=2))
    scores = m.score_texts(run, model, tokenizer, texts)
    alone = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])
        with torch.no_grad():
            if kind == "decoder":
                last = model.base_model(input_ids=ids).last_hidden_state[0, -1]
                alone.append(model.score(last).squeeze() - 0.25)
            else:
                alone.append(model(input_ids=ids).logits[0, 0])
    torch.testing.assert_close(scores, torch.stack(alone), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("module", [s[:-3] for s in LLM_SCRIPTS])
def test_eval_reward_model_statistics(module, monkeypatch, tiny_hh):
    """reward_model_scores: per policy the mean score and its 95% half-interval over the prompts, and the final
    policy's win rate against the start's response to the same prompt (ties one half), from the kept responses."""
    from transformers import AutoTokenizer

    m = import_module(module)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hh["model"])
    prompts = [tokenizer(p)["input_ids"] for p in ("a", "bb", "ccc", "dddd")]
    run = make_run(m, SimpleNamespace(eval_reward_model="some/model", forward_batch_size=2))
    run.tokenizer, run.eval_prompts = tokenizer, prompts
    run.state["eval_responses"] = {"_init": ["1", "5", "3", "2"], "_sft": ["2", "2", "2", "2"], "": ["4", "5", "1", "9"]}
    monkeypatch.setattr(m, "load_eval_reward_model", lambda path, device: (torch.nn.Linear(1, 1), None))
    # the score of "prompt + response": the response's number (the prompt's letters score nothing)
    monkeypatch.setattr(m, "score_texts", lambda run, model, tok, texts: torch.tensor([float(t.lstrip("abcd")) for t in texts]))
    out = m.reward_model_scores(run)
    final = torch.tensor([4.0, 5, 1, 9])
    assert out["eval_rm_score"] == pytest.approx(final.mean().item())
    assert out["eval_rm_score_ci95"] == pytest.approx(1.96 * final.std().item() / 2)
    assert out["eval_rm_score_init"] == pytest.approx(2.75) and out["eval_rm_score_sft"] == 2.0
    assert out["eval_rm_score_sft_ci95"] == 0.0
    assert out["eval_rm_win_rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # 4 > 1, 5 = 5, 1 < 3, 9 > 2


def test_eval_reward_model_run_trains_the_same_and_reports(eval_reward_models, task_cache, tmp_path):
    """A run with --eval_reward_model (a scoring model with a tokenizer of its own) reports each policy's mean score,
    interval and the final win rate, and trains exactly as the same run without it (its sampling forks the RNG)."""
    flags = ["--task.num_demos", 64, "--task.num_prefs", 64, "--task.num_eval_prompts", 8, "--task.num_eval_prefs", 16,
             "--sft_epochs", 1, "--num_epochs", 1, "--batch_size", 16, "--num_threads", 1, "--task.cache_dir", task_cache,
             "--output_dir", tmp_path]
    run_script("dpo_llm.py", *flags, "--run_name", "plain")
    run_script("dpo_llm.py", *flags, "--run_name", "scored", "--eval_reward_model", eval_reward_models["decoder"],
               "--num_eval_prompts", 12)
    plain, scored = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("plain", "scored"))
    for suffix in ("_init", "_sft", ""):
        assert math.isfinite(scored[f"eval_rm_score{suffix}"]) and scored[f"eval_rm_score{suffix}_ci95"] > 0
    assert 0 <= scored["eval_rm_win_rate"] <= 1
    same = {k: v for k, v in plain.items() if k not in ("wall_s", "dpo_tokens_per_s")}
    assert same and all(scored[k] == v for k, v in same.items()), {k: (v, scored[k]) for k, v in same.items() if scored[k] != v}
    kept = torch.load(tmp_path / "scored" / "checkpoint.pt", weights_only=False)["eval_responses"]  # (the final
    assert set(kept) == {"_init", "_sft"} and all(len(r) == 12 for r in kept.values())  # policy's come after it)


@pytest.mark.parametrize("module", [s[:-3] for s in LLM_SCRIPTS])
def test_eval_reward_model_that_is_no_reward_model_fails_in_one_line(module, tiny_hh, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = import_module(module)
    for path, needle in ((tiny_hh["model"], "is not a reward model"), (str(tmp_path / "missing"), "could not load")):
        message = fails_in_one_line(lambda: m.validate_args(m.Args(eval_reward_model=path)))
        assert "--eval_reward_model" in message and needle in message, message
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------------------
# Conversational data: recognised from its columns, written by the chat template, only the answer trained on
# ---------------------------------------------------------------------------------------------------------------
def _table(rows):
    import datasets

    return datasets.Dataset.from_list(rows)


@pytest.mark.parametrize("module", [s[:-3] for s in LLM_SCRIPTS])
def test_conversational_formats_become_prompts_and_answers(module):
    m = import_module(module)
    user, earlier = {"role": "user", "content": "q?"}, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hi."}]
    good, bad = {"role": "assistant", "content": "yes"}, {"role": "assistant", "content": "no"}
    explicit = _table([{"prompt": earlier + [user], "chosen": [good], "rejected": [bad]}])
    prompt_string = _table([{"prompt": "q?", "chosen": [good], "rejected": [bad]}])
    whole = _table([{"prompt": "q?", "chosen": [user, good], "rejected": [user, bad]},  # UltraFeedback-binarized
                    {"prompt": "q?", "chosen": [user, good], "rejected": [earlier[0], bad]}])  # prompts differ: skipped
    assert m.preference_pairs(explicit, "x") == ([earlier + [user]], [good], [bad])
    assert m.preference_pairs(prompt_string, "x") == ([[user]], [good], [bad])
    assert m.preference_pairs(whole, "x") == ([[user]], [good], [bad])
    conversation = earlier + [user, good, {"role": "user", "content": "and?"}]  # the last assistant turn is the answer
    for table in (_table([{"messages": conversation}]), _table([{"real": conversation, "generated": earlier}]),
                  _table([{"prompt": earlier + [user], "completion": [good]}])):
        assert m.demonstrations(table, "x") == ([earlier + [user]], [good])
    for bad_rows in ([{"messages": "just text"}], [{"messages": [{"role": "user"}]}]):
        message = fails_in_one_line(lambda: m.demonstrations(_table(bad_rows), "x"))
        assert "'messages'" in message and "messages" in message


@pytest.mark.parametrize("module", [s[:-3] for s in LLM_SCRIPTS])
def test_chat_template_writes_the_prompt_and_only_the_answer_is_trained_on(module, tiny_chat, tiny_hh):
    """render_chat: the prompt is the conversation with the template's generation prompt, the response the rest (here
    ending in the template's own EOS, which gets no second one); in the SFT batch every prompt token has no target and
    every response token has one. A tokenizer without a chat template refuses conversations in one line."""
    from transformers import AutoTokenizer

    m = import_module(module)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat["model"])
    prompts, answers = m.demonstrations(_table([json.loads(line) for line in open(tiny_chat["sft"])][:3]), "x")
    text_prompts, text_answers = m.render_chat(tokenizer, (prompts, answers), "demonstrations")
    for prompt, answer, text_prompt, text_answer in zip(prompts, answers, text_prompts, text_answers):
        assert text_prompt == tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert text_prompt.endswith("<|assistant|>") and text_answer == answer["content"] + "<|endoftext|>"
    args = SimpleNamespace(max_prompt_length=200, max_length=256)
    examples = m.tokenize_examples(tokenizer, text_prompts, [text_answers], args, "demonstrations")
    ids, mask, targets = m.sft_batch(examples, tokenizer.pad_token_id or 0)
    for row, (prompt_ids, answer_ids) in enumerate(examples):
        assert answer_ids == tokenizer(text_answers[row], add_special_tokens=False)["input_ids"]  # one EOS, its own
        assert answer_ids.count(tokenizer.eos_token_id) == 1 and answer_ids[-1] == tokenizer.eos_token_id
        trained = targets[row][targets[row] != -100].tolist()
        assert trained == answer_ids  # every answer token, and nothing of the prompt
    plain = AutoTokenizer.from_pretrained(tiny_hh["model"])
    message = fails_in_one_line(lambda: m.render_chat(plain, (prompts, answers), "demonstrations"))
    assert "chat template" in message and "demonstrations" in message


CHAT_RUNS = {  # each script on a conversational preference file and a conversational demonstration file
    "dpo_llm.py": ["--dataset_name", "prefs_whole", "--sft_dataset_name", "sft", "--num_epochs", 1],
    "rlhf_llm.py": ["--dataset_name", "prefs", "--sft_dataset_name", "sft", "--rm_epochs", 1, "--total_episodes", 8,
                    "--rollout_batch_size", 4, "--num_reward_norm_samples", 4, "--forward_batch_size", 4],
    "aihf_llm.py": ["--dataset_name", "prefs", "--demo_dataset_name", "spin", "--algo", "direct", "--num_epochs", 1,
                    "--num_eval_demos", 8, "--forward_batch_size", 8],
    "afd_llm.py": ["--dataset_name", "prefs_whole", "--sft_dataset_name", "spin", "--rm_epochs", 1, "--max_n", 2,
                   "--forward_batch_size", 8],
}


@pytest.mark.parametrize("script", sorted(CHAT_RUNS))
def test_conversational_data_runs_end_to_end(script, tiny_chat, tmp_path):
    flags = [tiny_chat[f] if f in tiny_chat else f for f in CHAT_RUNS[script]]
    run_script(script, "--model_name_or_path", tiny_chat["model"], *flags, "--max_length", 128, "--max_prompt_length", 100,
               "--response_length", 8, "--sft_epochs", 1, "--batch_size", 8, "--num_threads", 1, "--output_dir", tmp_path,
               "--run_name", "chat")
    metrics = json.loads((tmp_path / "chat" / "metrics.json").read_text())
    assert metrics["steps"] > 0 and metrics["task"].endswith(".jsonl")


@pytest.mark.parametrize("module", [s[:-3] for s in LLM_SCRIPTS])
def test_prompts_get_one_bos_whether_or_not_a_chat_template_wrote_it(module, tiny_hh):
    """A tokenizer that adds a BOS (Llama's way): a plain prompt gets it, a prompt whose chat template already wrote it
    does not get a second one; the order of the prompts is kept."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    m = import_module(module)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hh["model"])
    bos = tokenizer.bos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{tokenizer.bos_token} $A",
                                                             special_tokens=[(tokenizer.bos_token, bos)])
    plain = tokenizer("hi there", add_special_tokens=False)["input_ids"]
    ids = m.encode_prompts(tokenizer, ["hi there", tokenizer.bos_token + "hi there", "hi there"])
    assert ids == [[bos] + plain] * 3

"""Shared test fixtures: the embedded task's cache, a tiny local "Pythia-like" model and HH-format data.

Nothing here reaches a hub: the tiny model and its byte-level BPE tokenizer are built from scratch, with no
pad token (as Pythia's), so the real-data loading path is exercised offline."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Under pytest-xdist (`-n auto`) each worker gets its share of the cores: torch (imported after this line, here and in
# the scripts the tests start) would otherwise start one thread per core in every worker, and they would contend.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    # the cores this process may use (macOS has no affinity call: all of them)
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _workers)))
# The embedded task's cache for task variants (the default task's pi0 ships with the repository): an empty folder per
# test run unless AIHF_TEST_CACHE names one, so every run takes the first-use path a new user takes.
TASK_CACHE = os.environ.get("AIHF_TEST_CACHE")

HH_DIALOGUES = [
    ("How do I boil an egg?", "Put it in boiling water for eight minutes.", "Eggs are bad."),
    ("What is the capital of France?", "Paris is the capital of France.", "I do not know, maybe Rome."),
    ("Can you help me write a poem?", "Sure, here is a short poem about the sea.", "No."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    ("Tell me a joke.", "Why did the chicken cross the road? To get to the other side.", "Jokes are silly."),
    ("What is two plus two?", "Two plus two is four.", "It is five."),
]


def run_script(script, *flags, cwd=None, check=True, timeout=600, env=None):
    """Run a top-level script in a subprocess; returns the CompletedProcess (stdout+stderr captured). env: variables
    to set on top of this process's."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, flags)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def make_run(module, args, response_length=4, pad_id=0, eos_id=1, task=None, autocast=None):
    """A script's Run record for calling its helpers directly: the flags (any object with the ones the helper reads),
    the CPU, no autocast unless given, a tokenizer that only knows its pad and EOS ids, no run folder."""
    import torch

    tokenizer = SimpleNamespace(pad_token_id=pad_id, eos_token_id=eos_id)
    return module.Run(args, torch.device("cpu"), autocast or torch.autocast("cpu", enabled=False), tokenizer, task,
                      response_length, None, {"metrics": {}, "global_step": 0}, None)


def kill_when(script, *flags, lines=(), path=None, timeout=300):
    """Start a top-level script and kill it (SIGKILL, as a crash would) once its output has shown a line starting with
    each of `lines` in turn, or once `path` exists: a run interrupted mid-way, for the resume tests."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, flags)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE if lines else subprocess.DEVNULL, stderr=subprocess.STDOUT)
    if lines:
        wanted = list(lines)
        for line in proc.stdout:
            if line.startswith(wanted[0]):
                wanted.pop(0)
                if not wanted:
                    break
    else:
        deadline = time.time() + timeout
        while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


class Run:
    """A finished run's folder: `.m` its metrics.json, `.scalars(tag)` one TensorBoard scalar as [(step, value)]."""

    def __init__(self, path):
        self.path = path

    @property
    def m(self):
        with open(os.path.join(self.path, "metrics.json")) as f:
            return json.load(f)

    def scalars(self, tag):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(self.path), size_guidance={"scalars": 0})
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars(tag)] if tag in events.Tags()["scalars"] else []


def assert_learned(run_dir, checks):
    """A smoke run's learning checks, each (what, its value from the Run, the bound it must exceed). The bounds sit
    inside the values measured over seeds and CPU code paths (tests/margins.md, `python tests/margins.py`)."""
    run = Run(run_dir)
    failed = [f"{what}: {value(run):.4f} <= {bound}" for what, value, bound in checks if not value(run) > bound]
    assert not failed, "; ".join(failed) + f" ({run.m})"


def fails_in_one_line(fn, out_dir=None):
    """Call fn (a script's main or validate_args) expecting the bad-input contract: SystemExit with code 2 and one
    line on stderr that starts with "error:", and nothing written under out_dir. Returns that line."""
    import contextlib
    import io

    stderr = io.StringIO()
    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(stderr):
        fn()
    message = stderr.getvalue().strip()
    assert e.value.code == 2, (e.value.code, message)
    assert message.startswith("error: ") and "\n" not in message, message
    assert out_dir is None or not os.path.exists(out_dir)
    return message


@pytest.fixture(scope="session")
def task_cache(tmp_path_factory):
    if TASK_CACHE is None:
        return str(tmp_path_factory.mktemp("task_cache"))
    os.makedirs(TASK_CACHE, exist_ok=True)
    return TASK_CACHE


def _hh_transcript(question, answer, turns=1):
    text = ""
    for t in range(turns):
        text += f"\n\nHuman: {question}" + (f" (again {t})" if t else "") + f"\n\nAssistant: {answer if t == turns - 1 else 'Let me think.'}"
    return text


@pytest.fixture(scope="session")
def tiny_hh(tmp_path_factory):
    """A tiny GPTNeoX with a BPE tokenizer (no pad token) and Anthropic-HH-format jsonl files.

    Returns dict(model=dir, train=jsonl, test=jsonl, sft=jsonl with prompt/completion)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_hh")
    rows = []
    for i in range(48):
        q, good, bad = HH_DIALOGUES[i % len(HH_DIALOGUES)]
        turns = 1 + i % 3
        rows.append({"chosen": _hh_transcript(q, good, turns)[:-len(good)] + " " + good,
                     "rejected": _hh_transcript(q, good, turns)[:-len(good)] + " " + bad})
    for name, part in (("train.jsonl", rows[:40]), ("test.jsonl", rows[40:])):
        with open(root / name, "w") as f:
            for r in part:
                f.write(json.dumps(r) + "\n")
    with open(root / "sft.jsonl", "w") as f:
        for q, good, _ in HH_DIALOGUES * 4:
            f.write(json.dumps({"prompt": f"\n\nHuman: {q}\n\nAssistant:", "completion": " " + good}) + "\n")

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    corpus = [r["chosen"] + r["rejected"] for r in rows]
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    model_dir = root / "tiny-pythia"
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"model": str(model_dir), "train": str(root / "train.jsonl"), "test": str(root / "test.jsonl"),
            "sft": str(root / "sft.jsonl"), "dir": str(root)}


# A chat template in the usual shape: a header per turn, the assistant's turns ended by the EOS token itself.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}<|endoftext|>{% else %}<|end|>{% endif %}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat(tiny_hh, tmp_path_factory):
    """tiny_hh's model with a chat template, and conversational data files in the formats the scripts read:
    preferences as TRL's conversational pairs (prompt messages + one-message answers) and as whole conversations
    (UltraFeedback-binarized), demonstrations as `messages` (TRL, UltraChat) and as SPIN's real/generated pairs.

    Returns dict(model=dir, prefs=jsonl, prefs_whole=jsonl, sft=jsonl, spin=jsonl)."""
    import shutil

    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tiny_chat")
    model_dir = root / "tiny-chat"
    shutil.copytree(tiny_hh["model"], model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(model_dir)
    files = {"prefs": [], "prefs_whole": [], "sft": [], "spin": []}
    for i in range(48):
        q, good, bad = HH_DIALOGUES[i % len(HH_DIALOGUES)]
        history = [{"role": "user", "content": q}]
        if i % 3:  # multi-turn: the prompt holds an earlier exchange
            history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi."}] + history
        files["prefs"].append({"prompt": history, "chosen": [{"role": "assistant", "content": good}],
                               "rejected": [{"role": "assistant", "content": bad}]})
        files["prefs_whole"].append({"prompt": q, "chosen": history + [{"role": "assistant", "content": good}],
                                     "rejected": history + [{"role": "assistant", "content": bad}]})
        files["sft"].append({"messages": history + [{"role": "assistant", "content": good}]})
        files["spin"].append({"real": history + [{"role": "assistant", "content": good}],
                              "generated": history + [{"role": "assistant", "content": bad}]})
    out = {"model": str(model_dir)}
    for name, rows in files.items():
        with open(root / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        out[name] = str(root / f"{name}.jsonl")
    return out


@pytest.fixture(scope="session")
def tiny_eval_rm(tiny_hh, tmp_path_factory):
    """A folder an --eval_reward_model flag can name: a tiny decoder reward model with a `score` head and a
    reward_bias of 0.25, as rlhf_llm.py saves them, and a tokenizer of its own (tiny_hh's, not the embedded task's)."""
    import torch
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForSequenceClassification

    folder = tmp_path_factory.mktemp("eval_rm") / "decoder"
    tokenizer = AutoTokenizer.from_pretrained(tiny_hh["model"])
    torch.manual_seed(0)
    model = GPTNeoXForSequenceClassification(GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=256, num_labels=1, pad_token_id=tokenizer.eos_token_id))
    model.config.reward_bias = 0.25
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)

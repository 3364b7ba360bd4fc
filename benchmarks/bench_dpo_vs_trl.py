"""dpo_llm.py vs TRL's DPOTrainer (and a plain PyTorch DPO loop) on CPU: tokens/s and peak RSS, side by side.

Same model, data and hyper-parameters for every variant:
  model  GPTNeoX from config with the Pythia vocabulary (vocab 50304, hidden 256, 4 layers, 4 heads,
         intermediate 1024), random init, saved with save_pretrained next to a 50304-entry WordLevel tokenizer;
  data   256 preference pairs of random words, prompts of 56-72 tokens, responses of 48-80 tokens (+EOS),
         deterministic by seed;
  train  DPO sigmoid loss, beta 0.1, batch 8 pairs, 1 epoch (32 steps), AdamW lr 5e-5, linear schedule with 10%
         warm-up, grad-norm clip 1.0, fp32, CPU, no SFT stage, no gradient checkpointing, no evaluation.
Variants, each in its own fresh subprocess (peak RSS = ru_maxrss of that process at its end):
  trl-default     TRL DPOTrainer defaults (reference model kept in memory, its forward every step);
  trl-precompute  TRL DPOTrainer with precompute_ref_log_probs=True;
  plain           a plain PyTorch DPO loop: reference log-probs precomputed once (like ours), one concatenated
                  forward of chosen+rejected, full (B, T, V) logits, log_softmax + gather, AdamW;
  ours            dpo_llm.py run as the real script (runpy), reading dpo_tokens_per_s from its metrics.json
                  (each prompt through the backbone once per pair; every other variant runs it twice).
tokens/s = non-pad tokens (prompt + response) of the chosen and rejected sequences trained / seconds of the
training stage, the reference log-prob pass included for everyone (TRL: the precompute inside DPOTrainer.__init__
+ trainer.train(); plain: precompute + loop; ours: its DPO stage). Variants are run in rounds (order reversed every
other round) so that machine contention hits all alike; the table reports the median over rounds.

    python benchmarks/bench_dpo_vs_trl.py --trl_python /tmp/trl-venv/bin/python
    python benchmarks/bench_dpo_vs_trl.py --trl_python /tmp/trl-venv/bin/python --rounds 1 --max_steps 8  # quick
TRL is installed only for this benchmark, in its own venv:
    python3 -m venv /tmp/trl-venv && /tmp/trl-venv/bin/pip install torch==2.13.0 \\
        && /tmp/trl-venv/bin/pip install trl==1.16.0 datasets tyro tensorboard
"""

import argparse
import json
import os
import platform
import random
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("trl-default", "trl-precompute", "plain", "ours")
VOCAB, HIDDEN, LAYERS, HEADS, INTERMEDIATE = 50304, 256, 4, 4, 1024
EOS, PAD = "<|endoftext|>", "<|padding|>"
BETA, LR, WARMUP, CLIP = 0.1, 5e-5, 0.1, 1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trl_python", default=sys.executable, help="python of the venv with trl installed")
    p.add_argument("--python", default=sys.executable, help="python of the project venv (ours, plain)")
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=160, help="no pair is truncated at 160 (longest: 72+80+1)")
    p.add_argument("--max_prompt_length", type=int, default=96)
    p.add_argument("--threads", type=int, default=1, help="torch / OMP threads of every variant")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=0, help="cap on optimizer steps for every variant (0 = 1 epoch)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="model, data and run dirs (default: a fresh temp dir)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "dpo_vs_trl.md"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ==========================================================================================================
# Model and data (built once, offline, by the driver)
# ==========================================================================================================
def build_assets(workdir, pairs, seed):
    """A GPTNeoX with the Pythia vocabulary and its tokenizer in workdir/model; pairs in workdir/data."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    model_dir, data_dir = os.path.join(workdir, "model"), os.path.join(workdir, "data")
    vocab = {EOS: 0, PAD: 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, unk_token=EOS)
    assert len(tokenizer) == VOCAB, len(tokenizer)
    tokenizer.save_pretrained(model_dir)
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=INTERMEDIATE, max_position_embeddings=512, attention_dropout=0.0,
                           hidden_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=1, tie_word_embeddings=False)
    GPTNeoXForCausalLM(config).save_pretrained(model_dir)

    rng = random.Random(seed)

    def words(lo, hi):
        return " ".join(f"w{rng.randrange(2, VOCAB)}" for _ in range(rng.randint(lo, hi)))

    os.makedirs(data_dir, exist_ok=True)
    # Responses start with a space: TRL tokenizes prompt + response as one string. The test split is 1 pair:
    # dpo_llm.py scores held-out pairs, and with a test split it holds out nothing from the 256 training pairs.
    for split, n in (("train", pairs), ("test", 1)):
        with open(os.path.join(data_dir, f"{split}.jsonl"), "w") as f:
            for _ in range(n):
                f.write(json.dumps({"prompt": words(56, 72), "chosen": " " + words(48, 80), "rejected": " " + words(48, 80)}) + "\n")
    return model_dir, data_dir


def load_pairs(data_dir):
    with open(os.path.join(data_dir, "train.jsonl")) as f:
        return [json.loads(line) for line in f]


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def versions():
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import trl

        v["trl"] = trl.__version__
    except ImportError:
        pass
    return v


# ==========================================================================================================
# Workers (one variant per fresh process; the last stdout line is the JSON result)
# ==========================================================================================================
def worker_trl(args, precompute):
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    model_dir, data_dir = os.path.join(args.workdir, "model"), os.path.join(args.workdir, "data")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = Dataset.from_list(load_pairs(data_dir))  # in memory: the ref-logp cache goes to a fresh temp dir
    config = DPOConfig(
        output_dir=os.path.join(args.workdir, "runs", f"trl_{os.getpid()}"),
        beta=BETA, loss_type=["sigmoid"], precompute_ref_log_probs=precompute,
        per_device_train_batch_size=args.batch_size, num_train_epochs=1, max_steps=args.max_steps or -1,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=WARMUP, max_grad_norm=CLIP, weight_decay=0.0,
        optim="adamw_torch", max_length=args.max_length, model_init_kwargs={"dtype": torch.float32},
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        logging_strategy="no", eval_strategy="no", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False, seed=args.seed,
    )
    timing = {"ref_s": 0.0}
    original = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):  # runs inside DPOTrainer.__init__: part of the training stage
        t = time.perf_counter()
        out = original(self, *a, **k)
        timing["ref_s"] += time.perf_counter() - t
        return out

    DPOTrainer._precompute_ref_logps = timed_precompute

    class CountingDPOTrainer(DPOTrainer):
        tokens = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.tokens += int(inputs["attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = CountingDPOTrainer(model=model_dir, args=config, train_dataset=dataset, processing_class=tokenizer)
    t = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t
    seconds = timing["ref_s"] + train_s
    return {"tokens": trainer.tokens, "seconds": seconds, "ref_s": timing["ref_s"], "steps": trainer.state.global_step,
            "tokens_per_s": trainer.tokens / seconds}


def worker_plain(args):
    """The naive path: full logits, log_softmax + gather; reference log-probs precomputed once (no second model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model_dir, data_dir = os.path.join(args.workdir, "model"), os.path.join(args.workdir, "data")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    examples = []
    for ex in load_pairs(data_dir):
        prompt = tokenizer(ex["prompt"])["input_ids"]
        chosen, rejected = (tokenizer(ex[k], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for k in ("chosen", "rejected"))
        examples.append((prompt, chosen, rejected))

    def batch(index):
        """[chosen_0..chosen_B, rejected_0..rejected_B], right-padded; labels -100 outside responses."""
        seqs = [examples[i][0] + examples[i][1] for i in index] + [examples[i][0] + examples[i][2] for i in index]
        starts = [len(examples[i][0]) for i in index] * 2
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        labels = torch.full((len(seqs), width), -100)
        for r, (s, start) in enumerate(zip(seqs, starts)):
            ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
            labels[r, start:len(s)] = torch.tensor(s[start:])
        return ids, mask, labels

    def sequence_logps(ids, mask, labels):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        labels = labels[:, 1:]
        logps = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
        return (logps * (labels != -100)).sum(-1)

    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    steps = [order[i : i + args.batch_size] for i in range(0, len(order) - args.batch_size + 1, args.batch_size)]
    steps = steps[: args.max_steps] if args.max_steps else steps
    started = time.perf_counter()
    ref = torch.zeros(len(examples), 2)
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), args.batch_size):
            index = list(range(i, min(i + args.batch_size, len(examples))))
            ref[index] = sequence_logps(*batch(index)).view(2, -1).t()
    ref_s = time.perf_counter() - started
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    warmup = max(1, int(len(steps) * WARMUP))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, max(0.0, (len(steps) - s) / max(1, len(steps) - warmup))))
    tokens = 0
    for index in steps:
        ids, mask, labels = batch(index)
        tokens += int(mask.sum())
        chosen, rejected = sequence_logps(ids, mask, labels).chunk(2)
        margin = BETA * ((chosen - ref[index, 0]) - (rejected - ref[index, 1]))
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds, "ref_s": ref_s, "steps": len(steps), "tokens_per_s": tokens / seconds}


def worker_ours(args):
    """dpo_llm.py as the real script (runpy), in this process so that ru_maxrss covers it."""
    import runpy

    run_name = f"ours_{os.getpid()}"
    out_dir = os.path.join(args.workdir, "runs")
    argv = ["dpo_llm.py", "--model_name_or_path", os.path.join(args.workdir, "model"),
            "--dataset_name", os.path.join(args.workdir, "data"), "--sft_epochs", "0", "--num_epochs", "1",
            "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
            "--max_prompt_length", str(args.max_prompt_length), "--learning_rate", str(LR), "--beta", str(BETA),
            "--eval_every", "0", "--num_eval_prefs", "1", "--save_every", "0", "--device", "cpu",
            "--num_threads", str(args.threads), "--seed", str(args.seed), "--output_dir", out_dir, "--run_name", run_name]
    if args.max_steps:  # dpo_llm.py has no step cap: cut its step list (the only patch), same cap as the others
        import dpo_llm

        original = dpo_llm.batch_order
        dpo_llm.batch_order = lambda *a, **k: original(*a, **k)[: args.max_steps]
        sys.argv = argv
        dpo_llm.main()
    else:
        sys.argv = argv
        sys.path.insert(0, ROOT)
        runpy.run_path(os.path.join(ROOT, "dpo_llm.py"), run_name="__main__")
    with open(os.path.join(out_dir, run_name, "metrics.json")) as f:
        metrics = json.load(f)
    return {"tokens_per_s": metrics["dpo_tokens_per_s"], "steps": metrics["steps"]}


def run_worker(args):
    t = time.perf_counter()
    if args.worker in ("trl-default", "trl-precompute"):
        result = worker_trl(args, precompute=args.worker == "trl-precompute")
    elif args.worker == "plain":
        result = worker_plain(args)
    else:
        sys.path.insert(0, ROOT)
        result = worker_ours(args)
    result.update(variant=args.worker, peak_rss_mb=rss_mb(), process_s=time.perf_counter() - t, versions=versions())
    print("RESULT " + json.dumps(result), flush=True)


# ==========================================================================================================
# Driver
# ==========================================================================================================
def launch(args, variant):
    python = args.trl_python if variant.startswith("trl") else args.python
    cmd = [python, os.path.abspath(__file__), "--worker", variant, "--workdir", args.workdir, "--threads", str(args.threads),
           "--batch_size", str(args.batch_size), "--max_length", str(args.max_length),
           "--max_prompt_length", str(args.max_prompt_length), "--max_steps", str(args.max_steps), "--seed", str(args.seed)]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TOKENIZERS_PARALLELISM": "false",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "HF_DATASETS_CACHE": tempfile.mkdtemp(dir=args.workdir, prefix="hfcache_"), "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    args = parse_args()
    if args.worker:
        return run_worker(args)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench_dpo_vs_trl_"))
    os.makedirs(args.workdir, exist_ok=True)
    build_assets(args.workdir, args.pairs, args.seed)
    print(f"[bench] assets in {args.workdir}; {len(variants)} variants x {args.rounds} rounds, {args.threads} thread(s) each", flush=True)
    results = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            res = launch(args, v)
            results[v].append(res)
            print(f"[bench] round {r + 1} {v:15s} {res['tokens_per_s']:8.1f} tokens/s  peak RSS {res['peak_rss_mb']:7.0f} MB  "
                  f"steps {res['steps']}  tokens {res.get('tokens', '-')}  timed {res.get('seconds', 0):.0f}s (ref {res.get('ref_s', 0):.0f}s)  "
                  f"process {res['process_s']:.0f}s", flush=True)

    med = {v: {k: statistics.median(x[k] for x in results[v]) for k in ("tokens_per_s", "peak_rss_mb")} for v in variants}
    command = "python benchmarks/bench_dpo_vs_trl.py " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "python benchmarks/bench_dpo_vs_trl.py"
    vers = {v: results[v][0]["versions"] for v in variants}
    trl_versions = next((x for v, x in vers.items() if v.startswith("trl")), {})
    our_versions = next((x for v, x in vers.items() if not v.startswith("trl")), {})
    steps = {v: results[v][0]["steps"] for v in variants}
    lines = [
        "# dpo_llm.py vs TRL DPOTrainer (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), shared with other jobs; every variant limited to "
        f"{args.threads} thread(s) (torch.set_num_threads + OMP_NUM_THREADS), run in its own fresh process, "
        f"{args.rounds} round(s) interleaved (order reversed every other round), median reported.",
        "",
        f"Versions: ours/plain: {json.dumps(our_versions)}; TRL variants: {json.dumps(trl_versions)}.",
        "",
        f"Setup: GPTNeoX (vocab {VOCAB}, hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, intermediate {INTERMEDIATE}), "
        f"random init, fp32; {args.pairs} pairs, prompts 56-72 + responses 48-80 tokens (+EOS), batch {args.batch_size} pairs, "
        f"1 epoch{f', capped at {args.max_steps} steps for every variant' if args.max_steps else ''} "
        f"(steps run: {json.dumps(steps)}); DPO sigmoid, beta {BETA}, AdamW lr {LR}, max_length {args.max_length}; "
        "no SFT, no gradient checkpointing, no eval/logging/saving inside the timed stage.",
        "",
        "tokens/s: non-pad tokens (prompt + response) of the chosen and rejected sequences trained, per second of the "
        "training stage including the reference log-prob pass (precomputed for trl-precompute, plain and ours; "
        "a reference-model forward every step for trl-default). Peak RSS: ru_maxrss of the variant's own process at its end.",
        "",
        "| variant | tokens/s | peak RSS (MB) | ours / variant: tokens/s | ours / variant: peak RSS | per round tokens/s |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for v in variants:
        ratio_t = ratio_m = "-"
        if "ours" in med and v != "ours":
            ratio_t = f"{med['ours']['tokens_per_s'] / med[v]['tokens_per_s']:.2f}x"
            ratio_m = f"{med['ours']['peak_rss_mb'] / med[v]['peak_rss_mb']:.2f}x"
        rounds = ", ".join(f"{x['tokens_per_s']:.0f}" for x in results[v])
        lines.append(f"| {v} | {med[v]['tokens_per_s']:.1f} | {med[v]['peak_rss_mb']:.0f} | {ratio_t} | {ratio_m} | {rounds} |")
    lines += ["", "Variants: trl-default = TRL DPOTrainer defaults (reference model in memory); trl-precompute = "
              "precompute_ref_log_probs=True; plain = plain PyTorch loop in this file (reference log-probs precomputed, "
              "full logits, log_softmax + gather, one concatenated chosen+rejected forward, AdamW); ours = dpo_llm.py "
              "(each prompt run once for both responses, fused chunked LM-head DPO loss, reference log-probs precomputed).",
              "Goals: ours >= 2.5x trl-default tokens/s, >= 1.1x plain tokens/s, peak RSS <= 0.4x TRL's."]
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(table)


if __name__ == "__main__":
    main()

"""DPO (Direct Preference Optimization), with an optional SFT stage first, in one file.

DPO (Rafailov et al., 2023, arXiv 2305.18290, eq. 7) trains the policy directly on preference pairs. With the
implicit reward  r(x, y) = beta * [log pi(y|x) - log pi_ref(y|x)]  it minimises the Bradley-Terry loss
    L_DPO = -log sigmoid( r(x, y_w) - r(x, y_l) )
against a frozen reference policy pi_ref (here: the SFT model). Options: conservative DPO (label smoothing eps:
-(1-eps) log sigmoid(h) - eps log sigmoid(-h)) and IPO (Azar et al., 2023: (h/beta - 1/(2 beta))^2, h the margin).
In AIHF's terms (Li et al., ICLR 2025, arXiv 2406.06874) DPO is the special case with an implicit reward and no
demonstration term.

Stages: (1) SFT on demonstrations, -mean_t log pi(y_t | x, y_<t) with the prompt masked (--sft_epochs 0 skips it);
(2) DPO with the SFT model as the reference. The reference log-probs are computed once before DPO, so no second
model sits in memory; each pair's prompt runs through the backbone once for both responses; the LM head never
materialises the (tokens x vocab) logits (the fused chunked loss in the machinery section at the end).

    python dpo_llm.py                                   # embedded digit-sorting task, offline, CPU, under a minute
    python dpo_llm.py --model_name_or_path EleutherAI/pythia-160m --dataset_name Anthropic/hh-rlhf \
        --max_length 512 --max_prompt_length 384 --learning_rate 5e-7 --sft_learning_rate 1e-5 --bf16 \
        --logprob_chunk_size 4096                       # on a GPU: Triton kernels, larger chunks
    torchrun --nproc_per_node 8 dpo_llm.py ...        # the same on 8 GPUs (DDP; --parallel fsdp shards the model)
"""

import importlib.util
import inspect
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache, partial, wraps
from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
import tyro

try:  # GPU kernels for the log-prob chunks; triton comes with CUDA builds of torch (CPU: the torch path)
    import triton
    import triton.language as tl
except ImportError:
    triton = None

try:  # the embedded task is the one module the LLM scripts share; a copied script runs without it on real data
    from sort_task import SortTaskConfig
except ImportError:  # pragma: no cover

    @dataclass
    class SortTaskConfig:
        pass


@dataclass
class Args:
    exp_name: str = "dpo_llm"
    """name of the experiment (prefix of the run directory)"""
    seed: int = 1
    """seed of the run (data order, sampling)"""
    run_name: Optional[str] = None
    """run directory name under --output_dir (default: {exp_name}__{seed}__{unix time})"""
    output_dir: str = "runs"
    """where run directories are written"""
    track: bool = False
    """also log to Weights & Biases (pip install wandb): the TensorBoard scalars, the flags as the run's config"""
    wandb_project_name: str = "aihf"
    """the W&B project of --track"""
    wandb_entity: Optional[str] = None
    """the W&B team or user of --track (default: your own)"""
    resume: Optional[str] = None
    """a run directory to continue: its config.json replaces the other flags"""

    # Model and data
    model_name_or_path: Optional[str] = None
    """policy to start from (hub id or local dir); default: the embedded task's pi0, or pythia-160m with --dataset_name"""
    dataset_name: Optional[str] = None
    """preference data: hub id (e.g. Anthropic/hh-rlhf) or local dir/.jsonl/.json/.parquet; default: embedded task"""
    dataset_split: str = "train"
    """split used for training"""
    eval_split: str = "test"
    """split for held-out pairs; if missing, the last --num_eval_prefs training pairs are held out"""
    sft_dataset_name: Optional[str] = None
    """demonstrations (prompt/completion) for SFT; default: the chosen responses of the preference data"""
    num_eval_prefs: int = 512
    """held-out pairs scored for preference accuracy (real data)"""
    eval_reward_model: Optional[str] = None
    """a reward model that scores the start, SFT and final policies' responses to --num_eval_prompts held-out prompts
    (a local folder or hub id of a one-label sequence classifier with its own tokenizer, e.g. rlhf_llm.py's reward_model)"""
    num_eval_prompts: int = 256
    """held-out prompts (of the held-out pairs) for --eval_reward_model"""
    response_length: Optional[int] = None
    """tokens sampled per response for --eval_reward_model (default: the embedded task's longest answer, else 128)"""
    forward_batch_size: int = 64
    """responses sampled or scored per forward pass for --eval_reward_model"""
    max_length: int = 64
    """longest prompt + response in tokens; responses are truncated to fit"""
    max_prompt_length: int = 32
    """pairs whose prompt is longer than this are dropped (counted and reported)"""

    # SFT stage
    sft_epochs: int = 3
    """epochs of SFT on the demonstrations before DPO (0 = start DPO from the given model)"""
    sft_learning_rate: float = 3e-4
    """AdamW learning rate of SFT (embedded task; 1e-5 suits Pythia on HH)"""

    # DPO stage
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """sigmoid (DPO, conservative DPO with --label_smoothing) or ipo"""
    beta: float = 0.1
    """KL weight beta of the implicit reward (paper: 0.1)"""
    label_smoothing: float = 0.0
    """conservative DPO: assumed probability that a preference label is flipped (0 = plain DPO)"""
    num_epochs: int = 4
    """epochs of DPO over the preference pairs"""
    learning_rate: float = 5e-5
    """AdamW learning rate of DPO (embedded task; the paper uses 1e-6, 5e-7 suits Pythia on HH)"""
    batch_size: int = 32
    """examples (pairs in DPO, demonstrations in SFT) per optimizer step"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step (batch_size must be divisible by it)"""
    warmup_ratio: float = 0.1
    """share of each stage's steps with a linear learning-rate warm-up (then linear decay to 0)"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    logprob_chunk_size: int = 512
    """tokens per chunk of the fused LM-head loss: memory ~ chunk x vocab instead of tokens x vocab (GPU: 2048-4096)"""
    logprob_kernel: Literal["auto", "torch", "triton"] = "auto"
    """per-chunk softmax work: triton (GPU kernels), torch, or auto (triton for CUDA tensors when installed)"""

    # Evaluation, logging, checkpoints, hardware
    eval_every: int = 50
    """evaluate held-out preference accuracy every this many DPO steps (0 = only at the end)"""
    save_every: int = 100
    """write a checkpoint every this many optimizer steps (0 = only at stage ends)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """cpu, cuda or auto"""
    bf16: bool = False
    """bfloat16 autocast (GPU); master weights stay fp32"""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """under torchrun: ddp (a replica per GPU) or fsdp (FSDP2: parameters, gradients and optimizer state sharded)"""
    num_threads: int = 1
    """torch CPU threads (0 = torch's default, for large models on a CPU; the embedded task's tiny model runs fastest on 1)"""
    task: SortTaskConfig = field(default_factory=SortTaskConfig)
    """the embedded task (used when --dataset_name is not given)"""


# The valid interval of every numeric flag, checked before anything is built or written ("(" excludes the end).
RANGES = {
    "seed": "[0, inf)", "num_eval_prefs": "[1, inf)", "num_eval_prompts": "[2, inf)", "response_length": "[1, 1e6]",
    "forward_batch_size": "[1, 1e6]", "max_length": "[2, 1e6]", "max_prompt_length": "[1, 1e6]",
    "sft_epochs": "[0, 1e4]", "sft_learning_rate": "(0, 1]", "beta": "(0, 1e3]", "label_smoothing": "[0, 0.5)",
    "num_epochs": "[0, 1e4]", "learning_rate": "(0, 1]", "batch_size": "[1, 1e6]",
    "gradient_accumulation_steps": "[1, 1e6]", "warmup_ratio": "[0, 1]", "weight_decay": "[0, 1e3]",
    "max_grad_norm": "(0, inf)", "logprob_chunk_size": "[1, 1e8]", "eval_every": "[0, inf)", "save_every": "[0, inf)",
    "num_threads": "[0, 1024]",
}


# ==========================================================================================================
# The algorithm: the SFT and DPO losses
# ==========================================================================================================
def sft_loss(token_logps):
    """SFT, per response token: -log pi(y_t | x, y_<t) (the caller averages over the batch's tokens)."""
    return -token_logps


def dpo_loss(policy_logps, ref_logps, beta, loss_type="sigmoid", label_smoothing=0.0):
    """DPO, eq. 7 of Rafailov et al. (2023), on the sequence log-probs log pi(y|x) of pairs laid out as rows
    [chosen_0, rejected_0, chosen_1, rejected_1, ...] (policy_logps from the model, ref_logps from pi_ref):

        r(x, y) = beta * [log pi(y|x) - log pi_ref(y|x)]          implicit reward
        h = r(x, y_w) - r(x, y_l)                                   margin
        sigmoid: -(1 - eps) log sigmoid(h) - eps log sigmoid(-h)    (eps = label_smoothing > 0: conservative DPO)
        ipo:     (h / beta - 1 / (2 beta))^2                        (Azar et al. 2023, on sequence log-probs)

    Returns the loss of each pair and the implicit rewards of its chosen and rejected responses."""
    rewards = beta * (policy_logps - ref_logps)
    chosen_rewards, rejected_rewards = rewards[0::2], rewards[1::2]
    margin = chosen_rewards - rejected_rewards
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    else:  # ipo: regress the log-ratio margin h/beta onto 1/(2 beta)
        losses = (margin / beta - 1 / (2 * beta)) ** 2
    return losses, chosen_rewards, rejected_rewards


# ==========================================================================================================
# Main: the algorithm box, one call per stage
# ==========================================================================================================
def main():
    """Load and check everything, then SFT on the demonstrations, DPO on the preferences against the frozen model
    that enters it (pi_ref), and the final evaluation. A killed run resumes (--resume) in the stage, and at the step,
    where it stopped."""
    args = parse_args()
    device, autocast = setup_torch(args)
    started = time.time()
    # everything that can fail on bad input happens before the run directory exists
    task, model_path, pref_train, pref_eval, demo_data = load_data(args)
    model, tokenizer = load_policy(model_path, device)
    pref_train, pref_eval, demo_data = (render_chat(tokenizer, data, what) for data, what in (
        (pref_train, "preference pairs"), (pref_eval, "held-out pairs"), (demo_data, "demonstrations")))
    train_pairs, eval_pairs, sft_examples = dpo_examples(args, model, tokenizer, pref_train, pref_eval, demo_data)
    eval_prompts = held_out_prompts(args, eval_pairs)  # (what --eval_reward_model's responses answer)
    response_length = args.response_length or (task.max_response_tokens if task is not None else 128)  # (its only use)

    run_dir, state = open_run(args, model, first_stage="sft" if args.sft_epochs else "dpo")
    run = Run(args, device, autocast, tokenizer, task, response_length, run_dir, state, summary_writer(run_dir, args),
              eval_prompts)
    policy = parallelize(model, args)  # a forward of policy: sft_batch_loss(policy, ...); under torchrun, DDP or FSDP2
    print(f"[run] {run_dir}: {len(sft_examples)} demonstrations, {len(train_pairs)} pairs, {len(eval_pairs)} held-out pairs, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, device {device}, "
          f"log-prob kernel {'triton' if _use_triton(torch.empty(0, device=device)) else 'torch'}")
    if "gold_reward_init" not in run.metrics:
        evaluate_stage(run, policy, "_init")

    if state["stage"] == "sft":  # 1. SFT on the demonstrations
        train_sft(run, model, policy, sft_examples, save_to=os.path.join(run_dir, "sft_model"), next_stage="dpo")
    if state["stage"] == "dpo":  # 2. DPO against pi_ref = the model as it enters this stage
        train_dpo(run, model, policy, train_pairs, eval_pairs)

    final = preference_accuracy(run, policy, eval_pairs)
    evaluate_stage(run, policy, "")
    run.metrics.update(reward_model_scores(run))
    if final:
        run.metrics["pref_accuracy"] = final["eval/rewards/accuracies"]
        run.metrics["eval_reward_margin"] = final["eval/rewards/margins"]
    algo = args.loss_type if args.loss_type != "sigmoid" else "cdpo" if args.label_smoothing > 0 else "dpo"
    finish_run(run, model, started, algo)


# ==========================================================================================================
# The stages: each owns its loop, its logs and its checkpoints, and starts again where a killed run stopped
# ==========================================================================================================
def train_sft(run, model, policy, demos, save_to, next_stage):
    """SFT on the demonstrations, -mean log pi(y_t | x, y_<t) over the response tokens; the model saved to `save_to`."""
    args, state = run.args, run.state
    steps = batch_order(len(demos), args.batch_size, args.sft_epochs, args.seed)
    optimizer, scheduler = new_optimizer(model.parameters(), args.sft_learning_rate, len(steps), args, state)
    model.train()
    bar = progress_bar(len(steps), "sft", state["step"])
    for step in range(state["step"], len(steps)):
        total_loss = torch.zeros((), device=run.device)
        for m in range(args.gradient_accumulation_steps):
            sync_gradients(m + 1 == args.gradient_accumulation_steps, policy)
            batch = sft_batch([demos[i] for i in this_rank(run.micro_batch(steps[step], m))], run.pad_id)
            loss = sft_batch_loss(policy, [t.to(run.device) for t in batch], args, run.autocast)
            loss.backward()
            total_loss += loss.detach()
        grad_norm = optimizer_step(model.parameters(), optimizer, scheduler, args, state)
        bar.update()
        if step % 20 == 0 or step + 1 == len(steps):
            total_loss = global_mean(total_loss).item()
            run.log({"sft/loss": total_loss, "sft/grad_norm": grad_norm.item()})
            bar.set_postfix(loss=f"{total_loss:.4f}")
            bar.write(f"[sft] step {step + 1}/{len(steps)} loss {total_loss:.4f}")
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(run, model, optimizer, scheduler)
    bar.close()
    save_model(save_to, model, run.tokenizer)
    evaluate_stage(run, policy, "_sft")
    state.update(stage=next_stage, step=0)
    save_checkpoint(run, model, optimizer, scheduler)


def train_dpo(run, model, policy, train_pairs, eval_pairs):
    """DPO (or cDPO / IPO, --loss_type) against the frozen reference pi_ref = the model as it enters this stage: its
    log-probs of every pair are computed once, so no second model sits in memory while training."""
    args, state, device = run.args, run.state, run.device
    dpo_started, dpo_tokens = time.time(), torch.zeros((), dtype=torch.long, device=device)
    steps = batch_order(len(train_pairs), args.batch_size, args.num_epochs, args.seed + 1)
    if state["step"] == 0 or "ref_logps" not in state:
        state["ref_logps"] = pair_logps(run, policy, train_pairs)
        state["eval_ref_logps"] = pair_logps(run, policy, eval_pairs)
    optimizer, scheduler = new_optimizer(model.parameters(), args.learning_rate, len(steps), args, state)
    ref_logps = state["ref_logps"].view(-1, 2)  # (pairs, [chosen, rejected])
    model.train()
    bar = progress_bar(len(steps), "dpo", state["step"])
    for step in range(state["step"], len(steps)):
        stats = torch.zeros(6, device=device)
        for m in range(args.gradient_accumulation_steps):
            sync_gradients(m + 1 == args.gradient_accumulation_steps, policy)
            index = this_rank(run.micro_batch(steps[step], m))  # this process's share of the micro-batch
            batch = [t.to(device) for t in pair_batch([train_pairs[i] for i in index], run.pad_id)]
            dpo_tokens += 2 * batch[1].sum() + batch[3].sum()  # tokens of the chosen and rejected sequences
            loss, chosen_rewards, rejected_rewards, logps = dpo_batch_loss(
                policy, batch, ref_logps[index].reshape(-1).to(device), args, run.autocast)
            loss.backward()
            stats += torch.stack([loss.detach() * args.gradient_accumulation_steps, chosen_rewards.mean(), rejected_rewards.mean(),
                                  (chosen_rewards > rejected_rewards).float().mean(), logps[0::2].mean(), logps[1::2].mean()])
        grad_norm = optimizer_step(model.parameters(), optimizer, scheduler, args, state)
        bar.update()
        if step % 10 == 0 or step + 1 == len(steps):
            stats = (global_mean(stats) / args.gradient_accumulation_steps).tolist()
            logs = {"loss": stats[0], "rewards/chosen": stats[1], "rewards/rejected": stats[2], "rewards/accuracies": stats[3],
                    "rewards/margins": stats[1] - stats[2], "logps/chosen": stats[4], "logps/rejected": stats[5],
                    "grad_norm": grad_norm.item(), "learning_rate": scheduler.get_last_lr()[0]}
            run.log(logs)
            bar.set_postfix(loss=f"{stats[0]:.4f}", acc=f"{stats[3]:.2f}")
            bar.write(f"[dpo] step {step + 1}/{len(steps)} " + status(logs, ("loss", "rewards/margins", "rewards/accuracies")))
        if args.eval_every and (step + 1) % args.eval_every == 0:
            run.log(preference_accuracy(run, policy, eval_pairs))
        if args.save_every and (step + 1) % args.save_every == 0:
            save_checkpoint(run, model, optimizer, scheduler)
    bar.close()
    # Throughput of the DPO stage, reference log-probs included, all processes together (the benchmarks' figure).
    run.metrics["dpo_tokens_per_s"] = round(global_sum(dpo_tokens).item() / (time.time() - dpo_started), 1)
    state.update(stage="done")
    save_checkpoint(run, model, optimizer, scheduler)


def preference_accuracy(run, policy, eval_pairs):
    """Held-out pairs where the implicit reward ranks chosen above rejected, and the mean reward margin."""
    if not eval_pairs:
        return {}
    logps = pair_logps(run, policy, eval_pairs)
    _, chosen_rewards, rejected_rewards = dpo_loss(logps, run.state["eval_ref_logps"], run.args.beta)
    return {"eval/rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "eval/rewards/margins": (chosen_rewards - rejected_rewards).mean().item()}


# ==========================================================================================================
# Models: the policy's forward passes, and the losses of a micro-batch
# ==========================================================================================================
class Parallel(torch.nn.Module):
    """A model whose forward runs any function of it: Parallel(model)(fn, *args) = fn(model, *args). DDP and FSDP2 hook
    the forward of the module they wrap, and the losses here call the backbone and read the LM head's weight themselves."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


def forward_pass(fn):
    """Marks fn(model, ...) as a forward pass: called with parallelize()'s wrapper, it runs as the wrapper's forward,
    which DDP and FSDP2 hook; called with a bare model (tests, benchmarks), as it is."""

    @wraps(fn)
    def call(model, *args, **kwargs):
        if isinstance(getattr(model, "module", model), Parallel):  # (DDP keeps the wrapper as .module)
            return model(fn, *args, **kwargs)
        return fn(model, *args, **kwargs)

    return call


def load_policy(path: str, device):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
        fail(f"model path not found: {path!r}; give a saved model directory or a hub id like EleutherAI/pythia-160m")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"could not load the tokenizer of {path!r} ({str(e).splitlines()[0]}); give a local model dir or a hub id")
    if tokenizer.eos_token_id is None:
        fail(f"tokenizer of {path!r} has no EOS token; set one (tokenizer.eos_token) and save it")
    if tokenizer.pad_token_id is None:  # e.g. Pythia; padding is masked by attention masks and -100 targets
        tokenizer.pad_token = tokenizer.eos_token
        print(f"[model] tokenizer has no pad token: using EOS {tokenizer.eos_token!r} for padding (masked out)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"could not load the config of {path!r} ({str(e).splitlines()[0]}); give a local model dir or a hub id")
    # the fused path computes hidden @ W^T itself: a model that rescales or caps its logits after the head (Gemma-2's
    # soft-capping, Cohere's logit_scale, Granite's logits_scaling) would train on log-probs that are not its own
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            fail(f"{path!r} transforms its logits after the LM head ({key}={getattr(config, key)}), which the fused "
                 "log-prob path does not apply; use a model without it")
    # N+ (and TRL's disable_dropout): no dropout anywhere, or pi / pi_ref is not 1 at the start, DPO's margins and
    # PPO's ratios carry its noise. Set in the config, before the model is built: attention layers read it once.
    for key, value in config.to_dict().items():
        if ("dropout" in key or key.endswith("pdrop")) and isinstance(value, float):
            setattr(config, key, 0.0)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).to(load_device(device))
    except (OSError, ValueError) as e:
        fail(f"could not load model {path!r} ({str(e).splitlines()[0]}); give a local model dir or a hub id")
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        fail(f"{path!r} has an LM head with a bias, which the fused log-prob path does not handle")
    return model, tokenizer


def to_autocast_dtype(hidden):
    """Under --bf16 autocast, hidden states in bf16: the final norm hands back fp32, but autocast would run the LM head
    in bf16, and so do the fused losses' chunk matmuls (their softmax math is fp32)."""
    device = hidden.device.type
    return hidden.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else hidden


def hidden_states(model, ids, mask):
    """Last hidden states (B, T, D) of the backbone, without the LM head (the fused losses apply it)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # correct for left or right padding
    return to_autocast_dtype(model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                              use_cache=False).last_hidden_state)


def scored_tokens(model, ids, mask, targets):
    """Hidden states, targets and sequence index of the positions that carry a target (prompt/padding skipped)."""
    hidden = hidden_states(model, ids, mask)
    keep = targets != -100
    seq_ids = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(targets)[keep]
    return hidden[keep], targets[keep], seq_ids


def pair_scored_tokens(model, prompt_ids, prompt_mask, response_ids, response_mask):
    """scored_tokens of [prompt + chosen, prompt + rejected] for each pair, with the prompt run once: its keys and
    values are repeated for both responses, which run on top of them, and autograd carries both gradients back into
    the one prompt pass. The log-probs of the concatenated sequences (tested), with the prompt's work and activations
    halved: what counts where prompts are long, as in multi-turn dialogue like HH."""
    from transformers import DynamicCache

    cache = DynamicCache()
    # recent transformers name the argument `cache`, earlier versions `past_key_values`
    cache_arg = "cache" if "cache" in inspect.signature(model.base_model.forward).parameters else "past_key_values"
    prompt_lengths = prompt_mask.sum(1)
    prompt_hidden = model.base_model(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True,
                                     position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0), **{cache_arg: cache}).last_hidden_state
    cache.batch_repeat_interleave(2)  # prompt i's keys/values serve sequences 2i (chosen) and 2i+1 (rejected)
    # The prompts' right padding sits between prompt and response: masked out, and the response positions
    # continue from each prompt's true length, so rotary positions match the concatenated sequence.
    mask = torch.cat([prompt_mask.repeat_interleave(2, 0), response_mask], 1)
    positions = prompt_lengths.repeat_interleave(2)[:, None] + torch.arange(response_ids.shape[1], device=response_ids.device)
    response_hidden = model.base_model(input_ids=response_ids, attention_mask=mask, position_ids=positions,
                                       use_cache=True, **{cache_arg: cache}).last_hidden_state
    # Response token 0 is predicted by the prompt's last state, response token t > 0 by response state t - 1.
    last_prompt = prompt_hidden[torch.arange(len(prompt_ids), device=prompt_ids.device), prompt_lengths - 1]
    hidden = to_autocast_dtype(torch.cat([last_prompt.repeat_interleave(2, 0)[:, None], response_hidden[:, :-1]], 1))
    keep = response_mask.bool()
    seq_ids = torch.arange(len(response_ids), device=response_ids.device)[:, None].expand_as(response_ids)[keep]
    return hidden[keep], response_ids[keep], seq_ids


@forward_pass
def sft_batch_loss(model, batch, args, autocast):
    """The SFT loss of one micro-batch (ids, mask, targets), fused with the LM head: the mean over the response tokens
    of every process's share (DDP and FSDP2 average over processes), divided by the micro-batches per step."""
    ids, mask, targets = batch
    scale = WORLD_SIZE / (global_sum((targets != -100).sum()) * args.gradient_accumulation_steps)
    with autocast:
        hidden, targets, _ = scored_tokens(model, ids, mask, targets)
    token_ids = torch.arange(len(targets), device=targets.device)  # each token its own sequence: any chunking is exact
    loss, _, _ = fused_linear_loss(sft_loss, hidden, model.get_output_embeddings().weight, targets, token_ids,
                                   scale=scale, chunk_size=args.logprob_chunk_size)
    return loss


@forward_pass
def dpo_batch_loss(model, batch, ref_logps, args, autocast):
    """L_DPO of one micro-batch of pairs (a `pair_batch`) against the reference log-probs of its sequences, summed
    and divided by the pairs per optimizer step. Returns the loss, the implicit rewards of the chosen and
    rejected responses, and the sequence log-probs. The LM head and dpo_loss run fused, chunk by chunk, whole
    pairs per chunk (machinery), so nothing is recomputed for the statistics."""
    with autocast:
        hidden, targets, seq_ids = pair_scored_tokens(model, *batch)
    loss, (chosen_rewards, rejected_rewards), logps = fused_linear_loss(
        partial(dpo_loss, beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing),
        hidden, model.get_output_embeddings().weight, targets, seq_ids, ref_logps,
        group_size=2, scale=WORLD_SIZE / args.batch_size, chunk_size=args.logprob_chunk_size)
    return loss, chosen_rewards, rejected_rewards, logps


@forward_pass
@torch.no_grad()
def sequence_logps(model, batches, run):
    """Sum of response log-probs of each sequence of each `pair_batch`, concatenated."""
    model.eval()
    out = []
    for batch in batches:
        batch = [t.to(run.device) for t in batch]
        with run.autocast:
            hidden, targets, seq_ids = pair_scored_tokens(model, *batch)
        token_logps = chunked_logps(hidden, model.get_output_embeddings().weight, targets, run.args.logprob_chunk_size)
        out.append(torch.zeros(len(batch[2]), device=run.device).index_add_(0, seq_ids, token_logps))
    model.train()
    return torch.cat(out).cpu() if out else torch.zeros(0)


def pair_logps(run, policy, pairs):
    """log pi(y|x) of both responses of each pair, [c0, r0, c1, r1, ...]: each process scores its share, all get all."""
    mine = this_rank(pairs)
    batches = [pair_batch(mine[i : i + run.micro], run.pad_id) for i in range(0, len(mine), run.micro)]
    return gather(sequence_logps(policy, batches, run), 2 * len(pairs))


def truncate_after_eos(responses, eos_id, pad_id):
    """N+: a response ends at its first EOS; every later token becomes padding.

    Returns the responses, the (B, L) mask of real tokens (the EOS included: the policy must learn to stop) and
    whether each response has an EOS. Positions, not token values, define the mask, so pad == EOS (Pythia) is safe."""
    is_eos = responses == eos_id
    has_eos = is_eos.any(1)
    length = torch.where(has_eos, is_eos.int().argmax(1) + 1, responses.shape[1])
    mask = torch.arange(responses.shape[1], device=responses.device)[None, :] < length[:, None]
    return responses.masked_fill(~mask, pad_id), mask, has_eos


@forward_pass
@torch.no_grad()
def generate(policy, queries, query_mask, run, temperature=None):
    """Responses (B, run.response_length), right-padded, sampled with HF generate at `temperature` (default
    --temperature), --forward_batch_size prompts at a time. N+: plain sampling (top_k 0, top_p 1, no min length)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=run.response_length, do_sample=True, temperature=temperature or run.args.temperature,
                              top_k=0, top_p=1.0, pad_token_id=run.pad_id, eos_token_id=run.eos_id)
    out = torch.full((queries.shape[0], run.response_length), run.pad_id, dtype=torch.long, device=queries.device)
    forward_batch_size = run.args.forward_batch_size
    # HF fills every field left unset in `config` from the model's own generation_config: a chat model's
    # repetition_penalty, min_new_tokens or suppress_tokens would shape the samples, which PPO then scores as plain
    # softmax(logits / T). So generate against an empty one, and give the model its own back (save_pretrained keeps it).
    own, policy.generation_config = policy.generation_config, GenerationConfig()
    try:
        for s in range(0, queries.shape[0], forward_batch_size):
            q, m = queries[s : s + forward_batch_size], query_mask[s : s + forward_batch_size]
            # synced_gpus: under FSDP2 a process whose responses all ended keeps stepping with the others (each
            # forward pass gathers the weights from every process); DDP's replicas generate alone
            with run.autocast:  # --bf16: sampled in the precision that scores them (pi_old) and trains them
                generated = policy.generate(input_ids=q, attention_mask=m, generation_config=config,
                                            synced_gpus=SHARDED)[:, q.shape[1] :]
            out[s : s + len(q), : generated.shape[1]] = generated
    finally:
        policy.generation_config = own
    return out


def last_token_index(mask):
    """Index of the last non-pad position of each row of a (B, T) attention mask; left or right padding."""
    return mask.shape[1] - 1 - mask.flip(-1).argmax(-1)


@forward_pass
def sequence_rewards(reward_model, ids, mask):
    """r(x, y): the scalar head on the hidden state of the last non-pad token (EOS), minus the normalising bias."""
    hidden = hidden_states(reward_model, ids, mask)
    last = hidden[torch.arange(ids.shape[0], device=ids.device), last_token_index(mask)]
    return reward_model.score(last).squeeze(-1).float() - reward_model.config.reward_bias


@contextmanager
def eval_mode(policy):
    """The policy in eval mode, then back in its model's own mode (a wrapper's flag may differ)."""
    was_training = all(m.training for m in policy.modules())  # the model's mode
    policy.eval()
    try:
        yield
    finally:
        policy.train(was_training)


def evaluate_gold(run, policy, suffix):
    """Gold reward of sampled (temperature 1) and greedy responses on the held-out prompts (embedded task only)."""
    if run.task is None:
        return {}
    with eval_mode(policy):
        result = forward_pass(run.task.evaluate)(policy, run.tokenizer, seed=run.args.seed, synced_gpus=SHARDED)
    print(f"[eval] policy{suffix or ' (final)'}: gold reward sampled {result['gold_reward']:.3f}, greedy {result['gold_reward_greedy']:.3f}")
    return {f"{k}{suffix}": v for k, v in result.items()}


def evaluate_stage(run, policy, suffix):
    """The start ("_init"), SFT ("_sft") or final ("") policy: its gold reward (embedded task) and, with
    --eval_reward_model, its responses (temperature 1, from a fork of the RNG: training is unchanged) to the held-out
    prompts, kept in the run's state and scored at the end, so the scoring model never shares memory with training."""
    run.metrics.update(evaluate_gold(run, policy, suffix))
    responses = run.state.setdefault("eval_responses", {})
    if run.args.eval_reward_model is None or suffix in responses:
        return
    queries, query_mask = (t.to(run.device) for t in left_pad(this_rank(run.eval_prompts), run.pad_id))
    with eval_mode(policy), torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        seed_share(run.args.seed)
        sampled = generate(policy, queries, query_mask, run, temperature=1.0)
    responses[suffix] = gather(response_texts(run, sampled), len(run.eval_prompts))


def response_texts(run, responses):
    """Sampled token ids -> the responses' text, cut at the first EOS."""
    return run.tokenizer.batch_decode(truncate_after_eos(responses, run.eos_id, run.pad_id)[0], skip_special_tokens=True)


def reward_model_scores(run):
    """--eval_reward_model's verdict on the responses evaluate_stage kept: each policy's mean score over the prompts
    with its 95% interval (normal approximation), and the final policy's win rate against the start's response to the
    same prompt (a tie counts one half). The model is loaded only here, and freed."""
    if run.args.eval_reward_model is None:
        return {}
    model, tokenizer = load_eval_reward_model(run.args.eval_reward_model, run.device)
    prompts = run.tokenizer.batch_decode(run.eval_prompts, skip_special_tokens=True)
    scores = {suffix: score_texts(run, model, tokenizer, [p + r for p, r in zip(prompts, responses)])
              for suffix, responses in run.state["eval_responses"].items()}
    del model
    out = {}
    for suffix, s in scores.items():
        out[f"eval_rm_score{suffix}"] = s.mean().item()
        out[f"eval_rm_score{suffix}_ci95"] = (1.96 * s.std() / math.sqrt(len(s))).item()
        print(f"[eval] --eval_reward_model, policy{suffix or ' (final)'}: {out[f'eval_rm_score{suffix}']:.3f} "
              f"± {out[f'eval_rm_score{suffix}_ci95']:.3f} over {len(s)} prompts")
    if "" in scores and "_init" in scores:
        final, start = scores[""], scores["_init"]
        out["eval_rm_win_rate"] = ((final > start).float() + 0.5 * (final == start).float()).mean().item()
        print(f"[eval] --eval_reward_model: the final policy's response wins on {out['eval_rm_win_rate']:.3f} of the prompts")
    return out


@torch.no_grad()
def score_texts(run, model, tokenizer, texts):
    """The scoring model's reward of each text in its own tokens, + its EOS (as reward models here are trained), the
    start cut where the text exceeds its context. A decoder with a linear `score` head (rlhf_llm.py's reward models)
    is read at the last token, minus its reward_bias; any other classifier through its own forward."""
    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    rows = [(ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None and ids[-1:] != [tokenizer.eos_token_id]
             else ids)[-limit:] for ids in tokenizer(this_rank(texts))["input_ids"]]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for s in range(0, len(rows), run.args.forward_batch_size):
        ids, mask = (t.to(run.device) for t in pad_right(rows[s : s + run.args.forward_batch_size], pad_id))
        with run.autocast:
            if isinstance(getattr(model, "score", None), torch.nn.Linear):
                out.append(sequence_rewards(model, ids, mask).float())
            else:
                out.append(model(input_ids=ids, attention_mask=mask).logits[:, 0].float())
    return gather(torch.cat(out).cpu(), len(texts))


def load_eval_reward_model(path, device):
    """--eval_reward_model and its tokenizer (check_eval_reward_model has checked it), frozen, in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    if not hasattr(model.config, "reward_bias"):
        model.config.reward_bias = 0.0
    return model.to(device).eval().requires_grad_(False), AutoTokenizer.from_pretrained(path)


def held_out_prompts(args, examples):
    """The first --num_eval_prompts distinct prompts of the held-out examples (what --eval_reward_model scores)."""
    prompts = [list(p) for p in dict.fromkeys(tuple(e[0]) for e in examples)][: args.num_eval_prompts]
    if args.eval_reward_model is not None and len(prompts) < 2:
        fail(f"--eval_reward_model scores responses to held-out prompts, and there are {len(prompts)}; hold out pairs "
             "(--num_eval_prefs, or an --eval_split of the dataset)")
    return prompts


# ==========================================================================================================
# Data: the embedded task or a dataset (hub id or local files), tokenized and batched
# ==========================================================================================================
def load_data(args):
    """(task or None, the policy to start from, training pairs, held-out pairs, demonstrations), each a tuple of
    text columns: pairs (prompts, chosen, rejected), demonstrations (prompts, completions)."""
    if args.dataset_name is None:
        task = embedded_task(args)
        return (task, task.model_path, preference_pairs(task.prefs, "embedded task"),
                preference_pairs(task.eval_prefs, "embedded task"), demonstrations(task.demos, "embedded task"))
    train_table = load_table(args.dataset_name, args.dataset_split)
    if len(train_table) == 0:
        fail(f"dataset {args.dataset_name!r} split {args.dataset_split!r} is empty; check the path or split")
    pref_train = preference_pairs(train_table, args.dataset_name)
    eval_table = load_table(args.dataset_name, args.eval_split, required=False)
    if eval_table is not None and args.eval_split != args.dataset_split:
        pref_eval = tuple(c[: args.num_eval_prefs] for c in preference_pairs(eval_table, args.dataset_name))
    else:  # hold out the tail of the training pairs
        held = min(args.num_eval_prefs, len(pref_train[0]) // 5)
        pref_eval = tuple(c[len(c) - held :] for c in pref_train)
        pref_train = tuple(c[: len(c) - held] for c in pref_train)
        print(f"[data] no {args.eval_split!r} split: holding out the last {held} training pairs for evaluation")
    if args.sft_dataset_name:
        demos = demonstrations(load_table(args.sft_dataset_name, args.dataset_split), args.sft_dataset_name)
    else:
        demos = pref_train[:2]
    return None, args.model_name_or_path or "EleutherAI/pythia-160m", pref_train, pref_eval, demos


def dpo_examples(args, model, tokenizer, pref_train, pref_eval, demo_data):
    """(training pairs, held-out pairs, demonstrations), tokenized; checked against the batch sizes and the model's
    context before anything is written."""
    demo_prompts, demo_completions = demo_data
    train_pairs = tokenize_examples(tokenizer, pref_train[0], pref_train[1:], args, "preference pairs") if args.num_epochs else []
    eval_pairs = tokenize_examples(tokenizer, pref_eval[0], pref_eval[1:], args, "held-out pairs") if pref_eval[0] else []
    sft_examples = tokenize_examples(tokenizer, demo_prompts, [demo_completions], args, "demonstrations") if args.sft_epochs else []
    check_batches_fit([("preference pairs", len(train_pairs), args.num_epochs, args.batch_size, "--batch_size"),
                       ("demonstrations", len(sft_examples), args.sft_epochs, args.batch_size, "--batch_size")])
    check_context(model, [], 0, train_pairs + eval_pairs + sft_examples)
    return train_pairs, eval_pairs, sft_examples


DATA_FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_table(name: str, split: str, required: bool = True):
    """A datasets.Dataset from a local saved dataset / data file / folder, or from the hub."""
    import datasets

    path = os.path.expanduser(name)
    saved_markers = ("dataset_info.json", "dataset_dict.json", "state.json")
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in saved_markers):
        table = datasets.load_from_disk(path)
    elif os.path.isfile(path):
        kind = DATA_FILE_TYPES.get(os.path.splitext(path)[1])
        if kind is None:
            fail(f"unknown data file type {path!r}; use .jsonl, .json, .parquet or .csv")
        if not required:  # one file is one split: it has no separate held-out split
            return None
        if os.path.getsize(path) == 0:
            fail(f"dataset file {path!r} is empty; give a file with preference pairs")
        try:
            table = datasets.load_dataset(kind, data_files={split: path})
        except Exception as e:  # malformed json/parquet/csv
            fail(f"could not read {path!r} as {kind} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); fix the file")
    elif os.path.isdir(path):
        table = datasets.load_dataset(path)
    elif name.startswith((".", "/", "~")) or os.path.splitext(name)[1] in DATA_FILE_TYPES:
        fail(f"dataset path not found: {name!r}; give an existing file or folder, or a hub id like Anthropic/hh-rlhf")
    else:
        try:
            table = datasets.load_dataset(name)
        except Exception as e:  # offline, unknown id, gated ...
            fail(f"could not load dataset {name!r} from the hub ({type(e).__name__}); check the id or pass a local path")
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            if required:
                fail(f"dataset {name!r} has no split {split!r} (it has {list(table)}); pick one with --dataset_split")
            return None
        table = table[split]
    return table


HH_ASSISTANT = "\n\nAssistant:"


def split_hh(transcript: str):
    """Anthropic-HH transcript -> (prompt up to and including the last '\\n\\nAssistant:', response)."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        return None, None
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def text_column(table, column: str, name: str):
    """A column as a list of strings; a null or non-text value fails like a missing column."""
    values = list(table[column])
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        fail(f"dataset {name!r} column {column!r} holds {values[bad]!r} at row {bad}, not text; "
             "fix or drop the rows with empty fields")
    return values


def preference_pairs(table, name: str):
    """prompt/chosen/rejected columns (TRL's names) from prompt/chosen/rejected strings; HH-style transcripts (the
    prompt is their shared start); or lists of {"role", "content"} messages, whole conversations (UltraFeedback-
    binarized) or answers with the conversation so far in `prompt`, which render_chat writes as text later.
    Pairs whose two sides do not share their prompt are skipped (and counted)."""
    columns = set(table.column_names)
    if not {"chosen", "rejected"} <= columns:
        fail(f"dataset {name!r} lacks the columns prompt/chosen/rejected (or HH-style or conversational chosen/rejected); "
             f"found {sorted(columns)}")
    if table.num_rows and isinstance(table[0]["chosen"], list):
        chosen, rejected = (conversation_column(table, c, name) for c in ("chosen", "rejected"))
        if "prompt" in columns and chosen[0][0]["role"] == "assistant":  # the answer alone: prepend the prompt
            prompt = conversation_column(table, "prompt", name)
            chosen, rejected = [p + c for p, c in zip(prompt, chosen)], [p + r for p, r in zip(prompt, rejected)]
        split = split_conversation_pair
    elif "prompt" in columns:
        return tuple(text_column(table, c, name) for c in ("prompt", "chosen", "rejected"))
    else:  # Anthropic-HH transcripts
        chosen, rejected = text_column(table, "chosen", name), text_column(table, "rejected", name)
        split = split_hh_pair
    pairs = [split(c, r) for c, r in zip(chosen, rejected)]
    kept = [p for p in pairs if p is not None]
    if len(kept) < len(pairs):
        print(f"[data] {name}: skipped {len(pairs) - len(kept)} pairs whose chosen and rejected do not share the prompt")
    return tuple(map(list, zip(*kept))) if kept else ([], [], [])


def split_hh_pair(chosen, rejected):
    """(prompt, chosen response, rejected response) of two HH transcripts, or None where they do not share the prompt."""
    prompt, response = split_hh(chosen)
    return None if prompt is None or not rejected.startswith(prompt) else (prompt, response, rejected[len(prompt) :])


def split_conversation_pair(chosen, rejected):
    """(prompt, chosen, rejected) of two conversations that differ only in a last assistant turn, else None."""
    if chosen[:-1] != rejected[:-1] or not chosen[:-1] or {chosen[-1]["role"], rejected[-1]["role"]} != {"assistant"}:
        return None
    return chosen[:-1], chosen[-1], rejected[-1]


def demonstrations(table, name: str):
    """prompt/completion columns from prompt/completion strings or messages (TRL's formats); a conversation per row,
    the response its last assistant turn (`messages`: TRL, UltraChat; `real`: SPIN, whose `generated` half the
    self-play forms draw afresh); or the chosen responses of preference data."""
    columns = set(table.column_names)
    if {"prompt", "completion"} <= columns and table.num_rows and isinstance(table[0]["completion"], list):
        conversations = [p + c for p, c in zip(conversation_column(table, "prompt", name),
                                               conversation_column(table, "completion", name))]
        return split_conversations(conversations, name)
    if {"prompt", "completion"} <= columns:
        return text_column(table, "prompt", name), text_column(table, "completion", name)
    for column in ("messages", "real"):
        if column in columns:
            return split_conversations(conversation_column(table, column, name), name)
    if "chosen" in columns:  # preference data reused as demonstrations: the chosen responses
        return preference_pairs(table, name)[:2]
    fail(f"SFT dataset {name!r} lacks the columns prompt/completion (or conversational messages, real, chosen); "
         f"found {sorted(columns)}")


def split_conversations(conversations, name):
    """(prompts, responses) of conversations: each cut where its last assistant turn begins (later turns dropped)."""
    prompts, responses = [], []
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=0)
        if last > 0:  # (a conversation without an assistant turn after some context teaches nothing)
            prompts.append(messages[:last])
            responses.append(messages[last])
    if not prompts:
        fail(f"dataset {name!r}: no conversation has an assistant turn after a first message; check the data")
    return prompts, responses


def conversation_column(table, column: str, name: str):
    """A column of lists of {"role", "content"} messages (a prompt string: one user turn); else a one-line error."""
    values = list(table[column])
    for i, v in enumerate(values):
        if isinstance(v, str) and column == "prompt":
            values[i] = [{"role": "user", "content": v}]  # (TRL: a prompt string is one user turn)
        elif not (isinstance(v, list) and v and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                    and isinstance(m.get("content"), str) for m in v)):
            fail(f"dataset {name!r} column {column!r} holds {str(v)[:80]!r} at row {i}, not a list of "
                 '{"role", "content"} messages; fix or drop the row')
    return values


def render_chat(tokenizer, data, what):
    """A data tuple (prompts, *responses) of conversations written as text by the tokenizer's chat template: the prompt
    up to where the answer's turn begins (with the generation prompt), the response the rest, so only the response
    is scored and trained on. Text passes as it is."""
    prompts, *responses = data
    if not len(prompts) or isinstance(prompts[0], str):
        return data
    if getattr(tokenizer, "chat_template", None) is None:
        fail(f"the {what} are conversations, and the tokenizer has no chat template to write them with; use a chat "
             "model's tokenizer (--model_name_or_path) or give the data as text")
    rendered = [[], *([] for _ in responses)]
    for i, prompt in enumerate(prompts):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        rendered[0].append(prompt_text)
        for column, out in zip(responses, rendered[1:]):
            whole = tokenizer.apply_chat_template(prompt + [column[i]], tokenize=False)
            if not whole.startswith(prompt_text):
                fail(f"the {what}: the chat template writes a conversation's start differently with and without its "
                     "answer, so the prompt cannot be cut off; use another chat template")
            out.append(whole[len(prompt_text) :].rstrip())
    return tuple(rendered)


def encode_prompts(tokenizer, prompts):
    """Token ids of prompts, with the tokenizer's special tokens (e.g. a BOS), except where a chat template wrote them."""
    bos = tokenizer.bos_token
    written = [bool(bos) and p.startswith(bos) for p in prompts]
    ids = {flag: iter(tokenizer([p for p, w in zip(prompts, written) if w == flag], add_special_tokens=not flag)["input_ids"])
           for flag in set(written)}
    return [next(ids[w]) for w in written]


def tokenize_examples(tokenizer, prompts, responses_per_prompt, args, what: str):
    """Token ids of each prompt and its responses (+EOS). Drops over-long prompts, truncates responses."""
    prompt_ids = encode_prompts(tokenizer, list(prompts)) if len(prompts) else []
    responses = [tokenizer(list(r), add_special_tokens=False)["input_ids"] for r in responses_per_prompt] if len(prompts) else []
    kept, dropped, truncated = [], 0, 0
    for i, p in enumerate(prompt_ids):
        if not 0 < len(p) <= args.max_prompt_length:  # an empty prompt leaves no position to predict from
            dropped += 1
            continue
        budget = args.max_length - len(p)  # room left for the response and its EOS
        row = []
        for rs in responses:
            # a cut response gets no EOS (as in TRL): the data never ended there, and SFT must not learn to stop mid-answer
            truncated += len(rs[i]) >= budget
            ended = rs[i][-1:] == [tokenizer.eos_token_id]  # (a chat template's end of turn may be the EOS itself)
            row.append(rs[i] + [tokenizer.eos_token_id] * (not ended) if len(rs[i]) < budget else rs[i][:budget])
        kept.append((p, *row))
    if dropped or truncated:
        print(f"[data] {what}: dropped {dropped} of {len(prompt_ids)} examples whose prompt is empty or exceeds "
              f"--max_prompt_length={args.max_prompt_length}; truncated {truncated} responses to fit --max_length={args.max_length}")
    if not kept:
        fail(f"{what}: no examples left (all {len(prompt_ids)} prompts exceed --max_prompt_length="
             f"{args.max_prompt_length}, or the data is empty); raise --max_prompt_length or check the data")
    return kept


def pad_right(sequences, pad_id):
    """(ids, mask) of right-padded sequences."""
    ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def left_pad(sequences, pad_id):
    """Left-padded prompts (B, P) and their attention mask, the layout generation continues from."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


def collate(sequences, loss_starts, pad_id):
    """Right-padded ids, attention mask and targets (-100 = no loss), shifted once here: targets[:, t] is token t+1."""
    ids, mask = pad_right(sequences, pad_id)
    targets = torch.full_like(ids, -100)
    for i, (s, start) in enumerate(zip(sequences, loss_starts)):
        targets[i, start - 1 : len(s) - 1] = torch.tensor(s[start:])
    return ids, mask, targets


def pair_batch(examples, pad_id):
    """Pairs for pair_scored_tokens: a prompt row per pair, and its responses as adjacent rows [c0, r0, c1, r1, ...],
    so a chunk of whole pairs (what the fused DPO loss needs) is a contiguous block."""
    prompt_ids, prompt_mask = pad_right([p for p, _, _ in examples], pad_id)
    response_ids, response_mask = pad_right([r for _, chosen, rejected in examples for r in (chosen, rejected)], pad_id)
    return prompt_ids, prompt_mask, response_ids, response_mask


def sft_batch(examples, pad_id):
    return collate([p + c for p, c in examples], [len(p) for p, _ in examples], pad_id)


def batch_order(num_examples, batch_size, epochs, seed):
    """Index lists of every optimizer step, reshuffled each epoch, deterministic (resume skips a prefix)."""
    steps = []
    for epoch in range(epochs):
        order = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        steps += [order[i : i + batch_size].tolist() for i in range(0, num_examples - batch_size + 1, batch_size)]
    return steps


# ==========================================================================================================
# Machinery: the fused chunked LM-head losses, training plumbing, checkpoints, input validation
# ==========================================================================================================
# Naively, log p(y_t) needs the (N, V) logits hidden @ W^T, their log-softmax and both gradients: 4 x N x V floats
# (N = 4096 tokens, V = 50304: 3.3 GB in fp32). Here each chunk of C tokens makes, uses and frees its (C, V) logits.
# Where the loss's gradient is known once a chunk is scored (SFT; DPO on whole pairs with precomputed reference
# log-probs), fused_linear_loss computes the gradients w.r.t. hidden states and LM-head weight inside the forward, so
# the logits are never recomputed; PPO's per-token ratio and entropy (in the scripts with PPO) keep the log-sum-exp
# per token and recompute each chunk in the backward. For log p(y) = z_y - logsumexp(z): d log p(y)/dz = onehot(y) - p.
def fused_linear_loss(loss_fn, hidden, weight, targets, seq_ids, *seq_inputs, group_size=1, scale=1.0, chunk_size):
    """scale * sum(loss_fn(log p of each sequence, *seq_inputs)) from hidden (N, D), LM-head weight (V, D) and targets
    (N,), never holding the (N, V) logits. seq_ids (N,): each token's sequence, non-decreasing. loss_fn gets the
    summed log-probs of whole groups of `group_size` sequences (2: a DPO pair) and the matching rows of seq_inputs, and
    returns per-group losses, or (losses, *statistics). Returns (loss, statistics, log p of each sequence)."""
    statistics = []
    loss, seq_logps = FusedLinearLoss.apply(hidden, weight, targets, seq_ids, loss_fn, seq_inputs, group_size, scale,
                                            chunk_size, statistics)
    return loss, tuple(torch.cat(column) for column in zip(*statistics)), seq_logps


def _chunk_logits(hidden, weight, start, end, buffer):
    """One chunk's logits in the hidden states' dtype, written into one reused (chunk, V) buffer: a fresh 100+ MB
    allocation per chunk costs page faults."""
    return torch.mm(hidden[start:end], weight.t(), out=buffer[: end - start])


def _logits_buffer(hidden, weight, chunk_size):
    return torch.empty(min(chunk_size, hidden.shape[0]), weight.shape[0], dtype=hidden.dtype, device=hidden.device)


def _chunk_forward(logits, targets):
    """log p(target) and the log-sum-exp of each token of a chunk (fp32), and what the gradient step reuses: the torch
    path turns an fp32 copy into softmax probabilities in place (logsumexp() would allocate another (chunk, V) block);
    the Triton path keeps nothing, its gradient kernel recomputes exp(z - lse)."""
    if _use_triton(logits):
        lse, target_logits, _ = _triton_lse(logits, targets)
        return target_logits - lse, lse, None
    probs = logits.float()  # bf16: an fp32 copy; fp32: the buffer itself
    target_logits = probs.gather(1, targets[:, None]).squeeze(1)
    peak = probs.amax(-1)
    total = probs.sub_(peak[:, None]).exp_().sum(-1)
    probs.div_(total[:, None])
    lse = peak + total.log()
    return target_logits - lse, lse, probs


def _chunk_grad_(logits, targets, lse, grad_logp, probs=None):
    """dL/dz = g (onehot(y) - p) of one chunk in the logits' dtype, for dL/dlog p(target) = g = grad_logp per token, in
    place where the path allows. probs: _chunk_forward's, or None (recomputed from the log-sum-exp)."""
    if _use_triton(logits):
        return _triton_grad_(logits, targets, lse, grad_logp)
    if probs is None:
        probs = logits.float().sub_(lse[:, None]).exp_()
    grad = probs.mul_(-grad_logp[:, None])
    grad[torch.arange(len(targets), device=grad.device), targets] += grad_logp
    return grad.to(logits.dtype)


# ---- the same per-chunk work as two Triton kernels (GPU) ----
# On a GPU the torch ops above are ~10 passes over the (chunk, V) block and dominate the matmuls. The kernels make one
# read (the log-sum-exp, online) and one read-and-write (the gradient, in place, in the block's dtype), fp32 math, one
# program per token row. `--logprob_kernel auto` uses them for CUDA tensors when triton is installed; the tests run
# them on the CPU through Triton's interpreter. Measurements: benchmarks/README.md.
LOGPROB_KERNEL = "auto"  # auto | torch | triton; setup_torch() sets it from --logprob_kernel
TRITON_BLOCK_V = 2048  # columns per step of a row (at most; fewer for a small vocabulary)


def _use_triton(logits):
    return LOGPROB_KERNEL == "triton" or (LOGPROB_KERNEL == "auto" and logits.is_cuda and triton is not None)


if triton is not None:

    @triton.jit
    def _lse_kernel(logits_ptr, stride, targets_ptr, lse_ptr, target_logit_ptr, entropy_ptr, V,
                    BLOCK: tl.constexpr, ENTROPY: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        peak = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)  # sum of exp(z - peak)
        weighted = tl.zeros((), tl.float32)  # sum of exp(z - peak) * z, for the entropy lse - E_p[z]
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_peak = tl.maximum(peak, tl.max(z, 0))
            rescale = tl.exp(peak - new_peak)  # the running sums were taken against the old peak
            e = tl.exp(z - new_peak)  # 0 past the vocabulary's end
            total = total * rescale + tl.sum(e, 0)
            if ENTROPY:
                weighted = weighted * rescale + tl.sum(e * tl.where(cols < V, z, 0.0), 0)  # (0 * -inf would be nan)
            peak = new_peak
        lse = peak + tl.log(total)
        tl.store(lse_ptr + row, lse)
        tl.store(target_logit_ptr + row, tl.load(base + tl.load(targets_ptr + row)).to(tl.float32))
        if ENTROPY:
            tl.store(entropy_ptr + row, lse - weighted / total)

    @triton.jit
    def _grad_kernel(logits_ptr, stride, targets_ptr, lse_ptr, g_ptr, entropy_ptr, g_entropy_ptr, V,
                     BLOCK: tl.constexpr, ENTROPY: tl.constexpr):
        # dL/dz = g (onehot(y) - p) - g_H p (log p + H), with p = exp(z - lse)
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        lse, g, target = tl.load(lse_ptr + row), tl.load(g_ptr + row), tl.load(targets_ptr + row)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < V
            log_p = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32) - lse
            p = tl.exp(log_p)
            grad = tl.where(cols == target, g, 0.0) - g * p
            if ENTROPY:
                grad -= tl.load(g_entropy_ptr + row) * p * (log_p + tl.load(entropy_ptr + row))
            tl.store(base + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def _triton_lse(logits, targets, entropy=False):
    """Per row of a (chunk, V) block: log-sum-exp, the target's logit and (entropy=True) the entropy, fp32."""
    rows, vocab = logits.shape
    lse, target_logits = (torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(2))
    entropies = torch.empty_like(lse) if entropy else lse  # (unused by the kernel when entropy=False)
    _lse_kernel[(rows,)](logits, logits.stride(0), targets, lse, target_logits, entropies, vocab,
                         BLOCK=min(TRITON_BLOCK_V, triton.next_power_of_2(vocab)), ENTROPY=entropy)
    return lse, target_logits, entropies if entropy else None


def _triton_grad_(logits, targets, lse, grad_logp, entropy=None, grad_entropy=None):
    """In place: the block's logits -> dL/dz for dL/dlog p(target) = grad_logp and dL/dH = grad_entropy per row."""
    rows, vocab = logits.shape
    with_entropy = grad_entropy is not None
    g = grad_logp.float().contiguous()
    _grad_kernel[(rows,)](logits, logits.stride(0), targets, lse.contiguous(), g,
                          entropy.contiguous() if with_entropy else g, grad_entropy.float().contiguous() if with_entropy else g,
                          vocab, BLOCK=min(TRITON_BLOCK_V, triton.next_power_of_2(vocab)), ENTROPY=with_entropy)
    return logits


def _accumulate_(grad_weight, grad_logits, hidden):
    """grad_weight (fp32) += grad_logits^T @ hidden in place. bf16 factors: on CUDA, cuBLAS adds their product into the
    fp32 gradient (addmm's out_dtype, where this torch has it); elsewhere two (V, D) temporaries per chunk."""
    if grad_logits.dtype == grad_weight.dtype:
        grad_weight.addmm_(grad_logits.t(), hidden)
    elif _adds_bf16_into_fp32(grad_weight.device):
        torch.addmm(grad_weight, grad_logits.t(), hidden, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight += (grad_logits.t() @ hidden).float()


@cache
def _adds_bf16_into_fp32(device) -> bool:
    """Whether this torch's addmm adds a bf16 product into an fp32 tensor in place on this device (CUDA only)."""
    if device.type != "cuda":
        return False
    total = torch.ones(2, 2, device=device)
    factor = torch.eye(2, dtype=torch.bfloat16, device=device)
    try:
        torch.addmm(total, factor, factor, out_dtype=torch.float32, out=total)
    except (RuntimeError, TypeError):  # no out_dtype, or it wants the added tensor in bf16
        return False
    return bool(torch.equal(total, torch.eye(2, device=device) + 1))


def _chunk_plan(seq_ids, group_size: int, chunk_size: int):
    """[(start, end, first_seq, end_seq)] per chunk of about chunk_size tokens, never splitting a group of group_size
    consecutive sequences: a chunk starts at the first token of a group, one per chunk_size bucket."""
    group = seq_ids // group_size
    group_starts = torch.cat([group.new_zeros(1), torch.nonzero(group[1:] != group[:-1]).squeeze(1) + 1])
    bucket = group_starts // chunk_size
    starts = group_starts[torch.cat([bucket.new_ones(1, dtype=torch.bool), bucket[1:] != bucket[:-1]])]
    ends = torch.cat([starts[1:], starts.new_full((1,), len(seq_ids))])
    first_seqs = seq_ids[starts] // group_size * group_size
    return torch.stack([starts, ends, first_seqs, seq_ids[ends - 1] + 1]).t().tolist()  # the one host sync


@torch.no_grad()
def chunked_logps(hidden, weight, targets, chunk_size: int):
    """Per-token log p(target) from hidden (N, D) and LM-head weight (V, D), chunk by chunk, without gradients."""
    weight = weight.to(hidden.dtype)
    logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    buffer = _logits_buffer(hidden, weight, chunk_size)
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        logps[start:end] = _chunk_forward(_chunk_logits(hidden, weight, start, end, buffer), targets[start:end])[0]
    return logps


class FusedLinearLoss(torch.autograd.Function):
    """fused_linear_loss's one pass over chunks of whole groups: the loss, its gradients w.r.t. hidden states and
    LM-head weight, the statistics and the sequence log-probs."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, seq_ids, loss_fn, seq_inputs, group_size: int, scale, chunk_size: int,
                statistics: list):
        cast_weight = weight.to(hidden.dtype)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        plan = _chunk_plan(seq_ids, group_size, chunk_size)
        seq_logps = torch.zeros(plan[-1][3], dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer = _logits_buffer(hidden, weight, max(end - start for start, end, _, _ in plan))
        for start, end, first_seq, end_seq in plan:
            local_ids = seq_ids[start:end] - first_seq
            logits = _chunk_logits(hidden, cast_weight, start, end, buffer)
            token_logps, lse, probs = _chunk_forward(logits, targets[start:end])
            chunk_logps = torch.zeros(end_seq - first_seq, dtype=torch.float32, device=hidden.device).index_add_(0, local_ids, token_logps)
            seq_logps[first_seq:end_seq] = chunk_logps
            # The loss on this chunk's whole groups, and d loss / d sequence log-prob, by autograd on a tiny tensor.
            with torch.enable_grad():
                x = chunk_logps.detach().requires_grad_()
                out = loss_fn(x, *(s[first_seq:end_seq] for s in seq_inputs))
                losses, chunk_statistics = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
                chunk_loss = losses.sum() * scale
                (grad_seqs,) = torch.autograd.grad(chunk_loss, x)
            loss += chunk_loss.detach()
            statistics.append([s.detach() for s in chunk_statistics])
            grad_logits = _chunk_grad_(logits, targets[start:end], lse, grad_seqs[local_ids], probs)
            torch.mm(grad_logits, cast_weight, out=grad_hidden[start:end])
            _accumulate_(grad_weight, grad_logits, hidden[start:end])
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        ctx.mark_non_differentiable(seq_logps)
        return loss, seq_logps

    @staticmethod
    def backward(ctx, grad_loss, _unused):
        grad_hidden, grad_weight = ctx.saved_tensors  # in place: no second (V, D) tensor
        return (grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss),
                None, None, None, None, None, None, None, None)


# ---- training plumbing ----
def setup_torch(args):
    """Threads, device, log-prob kernel, bf16 autocast, seeds, quiet library logging; under torchrun, init_distributed."""
    global LOGPROB_KERNEL, SHARDED
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if DISTRIBUTED:
        device = init_distributed(device)
        SHARDED = args.parallel == "fsdp"
    LOGPROB_KERNEL = args.logprob_kernel
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return device, torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)


def new_optimizer(parameters, lr, steps, args, state=None):
    """AdamW with linear warm-up then linear decay to 0 over `steps`; restored from `state` on a resume."""
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=args.weight_decay)
    optimizer.register_load_state_dict_pre_hook(shard_optimizer_state)  # (FSDP2: each process keeps its shards)
    warmup = max(1, int(steps * args.warmup_ratio))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    if state is not None and state["step"]:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
    return optimizer, scheduler


def optimizer_step(parameters, optimizer, scheduler, args, state):
    """Clip, step, advance the schedule and the run's step counters; returns the pre-clip gradient norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state["step"], state["global_step"] = state["step"] + 1, state["global_step"] + 1
    return whole(grad_norm)


def status(logs, keys):
    """A status line of the scalars in `logs` among `keys`, named by their last part: "kl 0.123 gold 0.800"."""
    return " ".join(f"{k.rsplit('/', 1)[-1]} {logs[k]:.4g}" for k in keys if k in logs)


def progress_bar(total: int, desc: str, initial: int = 0):
    """A tqdm bar on a terminal, first process only (tqdm comes with transformers); the status lines carry the rest."""
    from tqdm.auto import tqdm

    hidden = not sys.stderr.isatty() or os.environ.get("RANK", "0") != "0"
    return tqdm(total=total, initial=initial, desc=desc, disable=hidden, dynamic_ncols=True, leave=False)


# ---- several processes: torchrun, DDP or FSDP2, data shards, reductions, whole weights for saving ----
# `torchrun --nproc_per_node N script.py ...` starts N copies of the script, one per GPU. Each reads the same data in
# the same order and takes its share of each batch (this_rank); DDP or FSDP2 (--parallel) average the gradients, each
# process scaling its loss as its share of the whole batch's, so a step sees the whole batch. Statistics are averaged
# before they are logged; evaluations run on every process (FSDP2's forward passes need all of them); only the first
# prints and writes. DDP and FSDP2 act around a module's forward, so a function that runs a model is @forward_pass:
# given parallelize()'s wrapper, sft_batch_loss(policy, ...) runs as its forward. One process changes nothing.
DISTRIBUTED = "WORLD_SIZE" in os.environ  # started by torchrun (also with one process: DDP or FSDP2 of world size 1)
WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))
RANK = int(os.environ.get("RANK", 0))  # this process among all of them; 0 prints, logs and writes
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))  # this process among those of its node: its GPU
SHARDED = False  # parameters sharded by FSDP2 (DTensors); setup_torch() sets it


def init_distributed(device):
    """Joins torchrun's processes (NCCL between GPUs, gloo between CPUs) on this process's GPU; only the first prints."""
    if device.type == "cuda":
        device = torch.device("cuda", LOCAL_RANK)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if RANK:
        sys.stdout = open(os.devnull, "w")
    return device


def parallelize(model, args):
    """The model wrapped for @forward_pass functions: Parallel(model) on one process; under torchrun DDP (a frozen
    model stays a plain replica) or FSDP2, one unit per transformer block and a root unit with the rest, the weights
    gathered in bf16 with --bf16 and the gradients reduced in fp32. The model comes from the CPU (load_device) and
    fully_shard moves each shard to this process's GPU. The fused losses run inside the root's forward, so they see
    the LM head whole and its gradient is the one-process gradient: a head sharded by rows would need a log-sum-exp
    across processes for every token (vocabulary parallelism, another algorithm)."""
    parallel = Parallel(model)
    if not DISTRIBUTED:
        return parallel
    if args.parallel == "ddp":
        trained = any(p.requires_grad for p in model.parameters())
        return torch.nn.parallel.DistributedDataParallel(parallel) if trained else parallel
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if args.bf16 else {}
    mesh = process_mesh()
    for module in model.modules():
        if type(module).__name__ in (model._no_split_modules or []):  # the transformer blocks (HF's list of them)
            fully_shard(module, mesh=mesh, mp_policy=MixedPrecisionPolicy(**bf16))
    # The root's inputs (reference log-probs, weights) must not be cast to bf16. The root is freed after each forward
    # too: outside a forward every parameter is a shard, which an optimizer made after an evaluation must see.
    fully_shard(parallel, mesh=mesh, mp_policy=MixedPrecisionPolicy(**bf16, cast_forward_inputs=False),
                reshard_after_forward=True)
    return parallel


@cache
def process_mesh():
    """FSDP2's mesh of all the processes: their GPUs with NCCL, else their CPUs (also with --device cpu beside GPUs)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (WORLD_SIZE,))


def sync_gradients(now: bool, *models):
    """DDP's no_sync as a flag: whether the next backward all-reduces the gradients. With gradient accumulation only a
    step's last micro-batch needs to; the others add into the local .grad. (FSDP2 reduce-scatters every micro-batch:
    whole gradients kept between them would cost the memory it shards to save.)"""
    for model in models:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = now


def this_rank(items):
    """This process's share of a batch or list: the RANK-th of WORLD_SIZE contiguous slices. An uneven list gets copies
    of its last item, so every process runs as many forward passes (FSDP2 needs all in each); gather() drops them."""
    if WORLD_SIZE == 1:
        return items
    share = -(-len(items) // WORLD_SIZE)
    items = list(items) + list(items[-1:]) * (share * WORLD_SIZE - len(items))
    return items[RANK * share : (RANK + 1) * share]


def gather(local, total=None):
    """Every process's `local` (tensor rows of one shape, or a list), concatenated in process order and cut to `total`
    items (dropping this_rank's copies); the same on every process."""
    if not DISTRIBUTED:
        return local if total is None else local[:total]
    if torch.is_tensor(local):
        parts = [torch.empty_like(local, device=_comm_device()) for _ in range(WORLD_SIZE)]
        dist.all_gather(parts, local.to(_comm_device()))
        out = torch.cat(parts).to(local.device)
    else:
        parts = [None] * WORLD_SIZE
        dist.all_gather_object(parts, list(local))
        out = [item for part in parts for item in part]
    return out if total is None else out[:total]


def global_sum(x):
    """The sum of a tensor over the processes (the tensor itself on one process)."""
    if not DISTRIBUTED:
        return x
    total = x.detach().to(_comm_device(), copy=True)
    dist.all_reduce(total)
    return total.to(x.device)


def global_mean(x):
    """The mean over the processes of a statistic that each measured on its equal share."""
    return global_sum(x) / WORLD_SIZE if DISTRIBUTED else x


def seed_share(seed):
    """torch.manual_seed for this process's sampling: the seed itself on the first (as on one), else a hash."""
    torch.manual_seed(seed if RANK == 0 else hash((seed, RANK)) % 2**32)


def _comm_device():
    return torch.device("cuda", LOCAL_RANK) if dist.get_backend() == "nccl" else torch.device("cpu")


def same_everywhere(obj):
    """The first process's value of obj on every process (e.g. a run directory named after its clock)."""
    if DISTRIBUTED:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def barrier():
    """Wait here for every process (e.g. until the first has written a model that the others load)."""
    if DISTRIBUTED:
        dist.barrier()


def whole(x):
    """A tensor computed over FSDP2 shards (e.g. the gradient norm), whole; any other tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


def whole_state(state):
    """A (nested) state dict with each FSDP2 shard gathered whole onto the first process's CPU (None on the others), as
    one process would save it. Every process calls it."""
    if isinstance(state, dict):
        return type(state)((k, whole_state(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return type(state)(whole_state(v) for v in state)
    if hasattr(state, "full_tensor"):  # a DTensor shard
        full = state.full_tensor()
        return full.cpu() if RANK == 0 else None
    return state


def shard_optimizer_state(optimizer, state_dict):
    """optimizer.load_state_dict()'s pre-hook (new_optimizer): under FSDP2 a whole saved state, from any number of
    processes, is cut to this process's shards one tensor at a time, so it never sits whole on a GPU."""
    if not SHARDED:
        return state_dict
    from torch.distributed.tensor import distribute_tensor

    state = {i: dict(s) for i, s in state_dict["state"].items()}
    ids = [i for group in state_dict["param_groups"] for i in group["params"]]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for i, p in zip(ids, params):
        for k, v in state.get(i, {}).items():
            if hasattr(p, "device_mesh") and torch.is_tensor(v) and not hasattr(v, "device_mesh") and v.shape == p.shape:
                state[i][k] = distribute_tensor(v, p.device_mesh, p.placements)
    return {**state_dict, "state": state}


def load_device(device):
    """Where a model loads: its device, or under FSDP2 the CPU, so that no GPU ever holds a whole model."""
    return torch.device("cpu") if SHARDED else device


def save_model(path, model, tokenizer=None):
    """model.save_pretrained(path) and the tokenizer's by the first process, under FSDP2 of the weights gathered whole
    (every process calls it); the others wait until it is written."""
    state = whole_state(model.state_dict()) if SHARDED else None
    if RANK == 0:
        model.save_pretrained(path, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    barrier()


def check_processes(args, batches):
    """Under torchrun: each batch ((what, examples) pairs) splits evenly over the processes, --parallel fsdp has FSDP2,
    and a GPU run has a GPU for each process of its node."""
    if not DISTRIBUTED:
        return
    for what, examples in batches:
        if examples % WORLD_SIZE:
            fail(f"{what} = {examples} examples do not split evenly over {WORLD_SIZE} processes (torchrun's "
                 f"--nproc_per_node x --nnodes); make it a multiple of {WORLD_SIZE}")
    if args.parallel == "fsdp":
        from torch.distributed import fsdp

        if not hasattr(fsdp, "fully_shard"):
            fail(f"--parallel fsdp needs FSDP2 (torch >= 2.6; this is {torch.__version__}); upgrade torch or use --parallel ddp")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if (args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()) and local > torch.cuda.device_count():
        fail(f"torchrun starts {local} processes on this node, which has {torch.cuda.device_count()} GPUs; "
             f"use --nproc_per_node {torch.cuda.device_count()} or fewer")


# ---- run directory and checkpoints ----
@dataclass
class Run:
    """What every stage reads besides its models and data: the flags, the constants derived from them, and the run's
    records (its folder, the state that checkpoints save and --resume reads, the TensorBoard writer)."""

    args: Args
    device: torch.device
    autocast: torch.autocast  # bf16 with --bf16, else a disabled one
    tokenizer: object
    task: object  # the embedded task (its gold reward), None on real data
    response_length: int
    dir: str
    state: dict  # stage, step, global_step, metrics
    writer: object  # None on the processes other than the first
    eval_prompts: list = field(default_factory=list)  # token ids of the prompts --eval_reward_model's responses answer
    pad_id = property(lambda self: self.tokenizer.pad_token_id)
    eos_id = property(lambda self: self.tokenizer.eos_token_id)
    metrics = property(lambda self: self.state["metrics"])
    micro = property(lambda self: self.args.batch_size // self.args.gradient_accumulation_steps)  # examples per micro-batch
    rank_batch = property(lambda self: self.args.batch_size // WORLD_SIZE)  # examples per optimizer step on this process

    def micro_batch(self, indices, m):
        """The m-th micro-batch of an optimizer step's example indices."""
        return indices[m * self.micro : (m + 1) * self.micro]

    def log(self, scalars: dict, prefix: str = "", step=None):
        if self.writer is not None:  # (the first process logs)
            for k, v in scalars.items():
                self.writer.add_scalar(prefix + k, v, self.state["global_step"] if step is None else step)


def summary_writer(run_dir, args):
    """TensorBoard's SummaryWriter on the first process (None on the others), with --track mirrored to Weights & Biases
    as CleanRL does: the same scalars, the flags as the run's config; a resumed run continues its W&B run."""
    from torch.utils.tensorboard import SummaryWriter

    if RANK:
        return None
    if args.track:  # before the writer: W&B mirrors the TensorBoard files written after init
        import wandb

        name = os.path.basename(os.path.normpath(run_dir))
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=name,
                   id=re.sub(r"[^\w.-]", "-", name)[-128:], resume="allow", dir=run_dir, sync_tensorboard=True)
    return SummaryWriter(run_dir)


def open_run(args, model, first_stage):
    """(run directory, state): a new directory with config.json, or on --resume the run's own, with its model (whole,
    loaded before parallelize() shards it). Every process reads the checkpoint; the first writes the directory."""
    if args.resume:  # (mmap: the processes of a node share one copy of the file in memory)
        state = torch.load(os.path.join(args.resume, "checkpoint.pt"), weights_only=False, mmap=True)
        model.load_state_dict(state["model"])
        if RANK == 0:  # what a run killed in the middle of writing a file left behind (atomic_save's temporaries)
            for name in os.listdir(args.resume):
                if name.rpartition(".tmp")[2].isdigit():
                    os.remove(os.path.join(args.resume, name))
        return args.resume, state
    run_dir = same_everywhere(os.path.join(args.output_dir, args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}"))
    if RANK == 0:
        os.makedirs(run_dir, exist_ok=True)
        write_json(asdict(args), os.path.join(run_dir, "config.json"))
    barrier()
    if not os.path.isdir(run_dir):  # the processes read what the first writes (models between stages, checkpoints)
        fail(f"{run_dir} is not on this node; across nodes, --output_dir must be on a filesystem that they all share")
    return run_dir, {"stage": first_stage, "step": 0, "metrics": {}, "global_step": 0}


def save_checkpoint(run, model, optimizer=None, scheduler=None, **extra):
    """The run's state and model (+ extra models), and within a stage its optimizer, schedule and RNG, written
    atomically by the first process (under FSDP2 gathered whole from every process's shards; each calls it)."""
    stage = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state()} if optimizer is not None else {}
    checkpoint = {**run.state, "model": model.state_dict(), **stage, **extra}
    checkpoint = whole_state(checkpoint) if SHARDED else checkpoint
    if RANK == 0:
        atomic_save(checkpoint, os.path.join(run.dir, "checkpoint.pt"))


def finish_run(run, model, started, algo):
    """The final model, metrics.json (the contract: algo, task, seed, steps, wall_s + the final evaluation)."""
    args, step = run.args, run.state["global_step"]
    run.log(run.metrics, prefix="final/")
    save_model(os.path.join(run.dir, "model"), model, run.tokenizer)
    result = {"algo": algo, "task": "sort" if args.dataset_name is None else args.dataset_name, "seed": args.seed,
              "steps": step, "wall_s": round(time.time() - started, 1), **run.metrics}
    if RANK == 0:
        write_json(result, os.path.join(run.dir, "metrics.json"))
        run.writer.close()
        if args.track:
            import wandb

            wandb.finish()
    print(json.dumps(result))
    if DISTRIBUTED:
        # the processes leave together, so that none closes its connections while the first still writes its results
        dist.barrier()
        dist.destroy_process_group()


def atomic_save(obj, path: str):
    """torch.save to a temporary file, then rename: a killed run never leaves a truncated checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(obj, path: str):
    """json.dump with the same write-then-rename as atomic_save."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


# ---- input validation: one line naming the problem and the fix, before anything is built or written ----
def parse_args():
    """The flags, or on --resume the run's own config.json, validated."""
    args = tyro.cli(Args, use_underscores=True)
    if args.resume is not None:
        if not os.path.exists(os.path.join(args.resume, "checkpoint.pt")):
            fail(f"--resume {args.resume!r} holds no checkpoint.pt; point it at a run directory written by this script")
        with open(os.path.join(args.resume, "config.json")) as f:
            saved = json.load(f)
        task = SortTaskConfig(**saved.pop("task"))
        args = Args(**{**saved, "task": task, "resume": args.resume})
    validate_args(args)
    return args


def validate_args(args: Args):
    check_ranges(args, RANGES)
    check_track(args)
    check_eval_reward_model(args)
    embedded = args.dataset_name is None
    checks = [
        (args.label_smoothing == 0 or args.loss_type == "sigmoid",
         "--label_smoothing (conservative DPO) applies to --loss_type sigmoid only; drop it for ipo"),
        (args.batch_size % args.gradient_accumulation_steps == 0,
         f"--batch_size {args.batch_size} is not divisible by --gradient_accumulation_steps {args.gradient_accumulation_steps}; "
         "make it a multiple"),
        (args.max_prompt_length < args.max_length, "--max_prompt_length must be < --max_length (room for a response)"),
        (args.logprob_kernel != "triton" or triton is not None,
         "--logprob_kernel triton needs the triton package (it comes with CUDA builds of torch); use auto or torch"),
        (args.logprob_kernel != "triton" or args.device != "cpu" and torch.cuda.is_available()
         or os.environ.get("TRITON_INTERPRET") == "1",
         "--logprob_kernel triton needs a CUDA device (or TRITON_INTERPRET=1: Triton's interpreter, slow); use auto or torch"),
        (not embedded or args.model_name_or_path is None,
         "--model_name_or_path needs --dataset_name (the embedded task comes with its own base model)"),
    ]
    for ok, message in checks:
        if not ok:
            fail(message)
    check_processes(args, [("--batch_size / --gradient_accumulation_steps", args.batch_size // args.gradient_accumulation_steps)])
    if embedded:
        embedded_task(args, build=False)
        check_batches_fit([("preference pairs (--task.num_prefs)", args.task.num_prefs, args.num_epochs, args.batch_size, "--batch_size"),
                           ("demonstrations (--task.num_demos)", args.task.num_demos, args.sft_epochs, args.batch_size, "--batch_size")])


def check_context(model, prompts, response_length, examples):
    """The tokenized training rows (prompt + each response), and the longest prompt plus a full response, fit the
    model's context (past it, learned positions fail mid-run and rotary ones silently extrapolate)."""
    context_limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(len(p) for p in prompts) if prompts else 0
    longest_row = max((len(p) + max(map(len, responses)) for p, *responses in examples), default=0)
    if context_limit and longest_row > context_limit:
        fail(f"training rows of up to {longest_row} tokens (--max_length) exceed the model's context ({context_limit}); "
             "lower --max_length")
    if context_limit and longest + response_length > context_limit:
        fail(f"prompts of up to {longest} tokens + --response_length {response_length} exceed the model's context "
             f"({context_limit}); lower --response_length or --max_prompt_length")


def embedded_task(args, build=True):
    """The embedded task of --task.* (sort_task.py beside this script), checked by its own validate(), then built."""
    try:
        import sort_task
    except ImportError:
        fail("the embedded task needs sort_task.py beside this script (copy it too), "
             "or give your data with --dataset_name and --model_name_or_path")
    try:
        sort_task.validate(args.task)
    except ValueError as e:
        fail(str(e))
    return sort_task.SortTask(args.task) if build else None


def check_batches_fit(needs):
    """Each stage that runs gets at least one full batch. needs: [(what, how many, the stage runs, batch size, its flag)]."""
    for what, available, runs, batch_size, flag in needs:
        if runs and available < batch_size:
            fail(f"only {available} {what} for {flag} {batch_size}; lower {flag} or add data")


def check_track(args):
    """--track needs wandb (checked before anything is built or written)."""
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track logs to Weights & Biases, and wandb is not installed; pip install wandb, or drop --track")


def check_eval_reward_model(args):
    """--eval_reward_model is a sequence classifier with one label and a tokenizer, before anything is trained."""
    if args.eval_reward_model is None:
        return
    from transformers import AutoConfig, AutoTokenizer

    path = args.eval_reward_model
    try:
        config, _ = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        fail(f"could not load --eval_reward_model {path!r} ({str(e).splitlines()[0]}); give a local folder or a hub id")
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []) or config.num_labels != 1:
        fail(f"--eval_reward_model {path!r} is not a reward model (a sequence classifier with one label; its config has "
             f"{config.architectures} with {config.num_labels} labels); give one, e.g. the reward_model folder of rlhf_llm.py")


def check_ranges(config, ranges: dict, prefix: str = "--"):
    """fail() unless each numeric flag lies in its interval, written like "(0, inf)" or "[0, 1)": a round bracket
    excludes its end. NaN lies in no interval; None passes (an Optional flag left unset)."""
    for name, interval in ranges.items():
        value = getattr(config, name)
        if value is None:
            continue
        low, high = (float(end) for end in interval[1:-1].split(","))
        above = low <= value if interval[0] == "[" else low < value
        below = value <= high if interval[-1] == "]" else value < high
        if not (above and below):
            fail(f"{prefix}{name} must be in {interval} (got {value})")


def fail(message: str):
    """Bad input: one line on stderr that names the problem and the fix; exit code 2, as for tyro's own errors."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()

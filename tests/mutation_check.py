"""Mutation check: break a script on purpose, one known bug at a time, and see that the tests catch it.

Each mutant replaces one exact piece of code (it must occur exactly once) in a copy of the repository, then runs
the few tests that should catch it there; a mutant that every one of those tests lets through is a missing test.
The working tree is never touched, so this can run beside anything else.

    python tests/mutation_check.py                  # every mutant (CPU minutes: each runs its own few tests)
    python tests/mutation_check.py --only dpo       # the mutants whose name contains "dpo"
    python tests/mutation_check.py --list

The table of the last full run is tests/mutation_results.md.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, script, exact code, its mutant, tests that must fail: pytest node ids or -k expressions after "::-k ")
MUTANTS = [
    # dpo_llm.py
    ("dpo: the training loss ignores --beta", "dpo_llm.py",
     "partial(dpo_loss, beta=args.beta,", "partial(dpo_loss, beta=0.1,", ["tests/test_dpo_llm.py::-k training_loss"]),
    ("dpo: the training loss ignores --label_smoothing", "dpo_llm.py",
     "label_smoothing=args.label_smoothing),\n        hidden,", "label_smoothing=0.0),\n        hidden,",
     ["tests/test_dpo_llm.py::-k training_loss"]),
    ("dpo: the DPO margin's sign flipped", "dpo_llm.py",
     "    margin = chosen_rewards - rejected_rewards\n", "    margin = rejected_rewards - chosen_rewards\n",
     ["tests/test_dpo_llm.py::-k formulas", "tests/test_shared_machinery.py::-k pair_loss"]),
    ("dpo: the loop ascends the DPO loss", "dpo_llm.py",
     "                policy, batch, ref_logps[index].reshape(-1).to(device), args, run.autocast)\n            loss.backward()",
     "                policy, batch, ref_logps[index].reshape(-1).to(device), args, run.autocast)\n            (-loss).backward()",
     ["tests/test_dpo_llm.py::-k smoke_embedded"]),
    ("dpo: the reference log-probs of chosen and rejected swapped", "dpo_llm.py",
     "ref_logps[index].reshape(-1)", "ref_logps[index].flip(1).reshape(-1)",
     ["tests/test_dpo_llm.py::-k smoke_embedded", "tests/test_plumbing.py::-k 'start_at_zero and dpo'"]),
    ("dpo: SFT loss sign flipped", "dpo_llm.py",
     "    return -token_logps\n", "    return token_logps\n", ["tests/test_shared_machinery.py::-k cross_entropy"]),
    ("dpo: bf16 weight-gradient chunks overwrite the sum instead of adding to it", "dpo_llm.py",
     "        grad_weight += (grad_logits.t() @ hidden).float()", "        grad_weight.copy_((grad_logits.t() @ hidden).float())",
     ["tests/test_dpo_llm.py::-k bf16_weight_gradient"]),
    # rlhf_llm.py
    ("rlhf: advantage whitening removed", "rlhf_llm.py",
     "    advantages = masked_whiten(advantages, response_mask)", "    advantages = advantages",
     ["tests/test_rlhf_llm.py::-k score_rollouts"]),
    ("rlhf: missing-EOS penalty's sign flipped", "rlhf_llm.py",
     "scores = scores - args.missing_eos_penalty", "scores = scores + args.missing_eos_penalty",
     ["tests/test_rlhf_llm.py::-k 'score_rollouts or missing_eos'"]),
    ("rlhf: reward normalisation removed", "rlhf_llm.py",
     "    reward_model.config.reward_bias = raw.mean().item()\n", "    reward_model.config.reward_bias = 0.0\n",
     ["tests/test_rlhf_llm.py::-k normalised"]),
    ("rlhf: value model not initialised from the reward model", "rlhf_llm.py",
     "    value_model, _ = load_reward_model(rm_path, device)", "    value_model, _ = load_reward_model(sft_path, device)",
     ["tests/test_rlhf_llm.py::-k score_rollouts"]),
    ("rlhf: value model without the reward's normalising bias", "rlhf_llm.py",
     ".squeeze(-1).float() - value_model.config.reward_bias", ".squeeze(-1).float()",
     ["tests/test_rlhf_llm.py::-k score_rollouts"]),
    ("rlhf: its own copy of the fused SFT gradient broken", "rlhf_llm.py",
     "    grad = probs.mul_(-grad_logp[:, None])", "    grad = probs.mul_(grad_logp[:, None])",
     ["tests/test_shared_machinery.py::-k 'cross_entropy or identical'"]),
    ("rlhf: reward model trained with chosen and rejected swapped", "rlhf_llm.py",
     "reward_model_loss(chosen, rejected, args.reward_center_coef)", "reward_model_loss(rejected, chosen, args.reward_center_coef)",
     ["tests/test_rlhf_llm.py::-k smoke_embedded_task_metrics"]),
    ("rlhf: per-token KL penalty's sign flipped", "rlhf_llm.py",
     "    rewards = -kl_coef * k1\n", "    rewards = kl_coef * k1\n", ["tests/test_rlhf_llm.py::-k kl_shaped"]),
    ("rlhf: GAE without lambda", "rlhf_llm.py",
     "        last_gae = delta + gamma * lam * last_gae", "        last_gae = delta + gamma * last_gae",
     ["tests/test_rlhf_llm.py::-k gae"]),
    ("rlhf: unclipped policy loss", "rlhf_llm.py",
     "    pg_loss = torch.max(pg_losses, pg_losses_clipped).mean()", "    pg_loss = pg_losses.mean()",
     ["tests/test_rlhf_llm.py::-k ppo_clipped"]),
    ("rlhf: score read at the first token", "rlhf_llm.py",
     "    last = hidden[torch.arange(ids.shape[0], device=ids.device), last_token_index(mask)]",
     "    last = hidden[:, 0]", ["tests/test_rlhf_llm.py::-k last_real_token"]),
    ("rlhf: rollouts sampled under the model's own generation_config", "rlhf_llm.py",
     "    own, policy.generation_config = policy.generation_config, GenerationConfig()\n", "    own = policy.generation_config\n",
     ["tests/test_shared_machinery.py::-k 'own_generation_config and rlhf'"]),
    ("rlhf: the PPO log-prob backward drops the one-hot term of d log p / dz", "rlhf_llm.py",
     "                grad_logits[torch.arange(end - start, device=grad_logits.device), targets[start:end]] += g\n", "",
     ["tests/test_rlhf_llm.py::-k fused_logprob_entropy"]),
    ("rlhf: the PPO log-prob backward flips the entropy gradient's sign", "rlhf_llm.py",
     ".mul_(-g_entropy[:, None])", ".mul_(g_entropy[:, None])", ["tests/test_rlhf_llm.py::-k fused_logprob_entropy"]),
    # aihf_llm.py
    ("aihf: --bf16 leaves the fused losses' inputs in fp32", "aihf_llm.py",
     "    return hidden.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else hidden",
     "    return hidden", ["tests/test_shared_machinery.py::-k 'bf16_autocast and aihf'"]),
    ("aihf: the demo term's contrast reversed", "aihf_llm.py",
     "bt_loss(demo_rewards, sample_rewards).mean()", "bt_loss(sample_rewards, demo_rewards).mean()",
     ["tests/test_aihf_llm.py::-k by_hand"]),
    ("aihf: --w_demo ignored in the reward step", "aihf_llm.py",
     "for w, term in ((w_demo, demo_term), (w_pref, pref_term))", "for w, term in ((1.0, demo_term), (w_pref, pref_term))",
     ["tests/test_aihf_llm.py::-k by_hand"]),
    ("aihf: the preference term's direction flipped", "aihf_llm.py",
     "bt_loss(chosen_rewards, rejected_rewards).mean() if w_pref", "bt_loss(rejected_rewards, chosen_rewards).mean() if w_pref",
     ["tests/test_aihf_llm.py::-k 'by_hand or rlhf_reward_step'"]),
    ("aihf: the reward not re-centred on each round's samples", "aihf_llm.py",
     "    reward_model.config.reward_bias = raw.mean().item()\n    return raw\n",
     "    reward_model.config.reward_bias = 0.0\n    return raw\n", ["tests/test_aihf_llm.py::-k center_reward"]),
    ("aihf: direct pairs weighted by the wrong weight", "aihf_llm.py",
     "[args.w_demo / args.batch_size] * num_demo_pairs", "[args.w_pref / args.batch_size] * num_demo_pairs",
     ["tests/test_aihf_llm.py::-k pair_weights"]),
    ("aihf: direct loss ignores the pair weights", "aihf_llm.py",
     "    return seq_weights[0::2] * bt_loss(chosen_rewards, rejected_rewards),",
     "    return bt_loss(chosen_rewards, rejected_rewards),",
     ["tests/test_aihf_llm.py::-k 'weights_each_pair or is_dpo'"]),
    ("aihf: PPO ascends its loss", "aihf_llm.py",
     "                loss = (pg_loss + args.vf_coef * vf_loss) / args.gradient_accumulation_steps",
     "                loss = (-pg_loss + args.vf_coef * vf_loss) / args.gradient_accumulation_steps",
     ["tests/test_aihf_llm.py::-k 'smoke_metrics and rl'", "tests/test_shared_machinery.py::-k identical"]),
    ("aihf: the reward step's micro-batch losses added up, not averaged", "aihf_llm.py",
     "        (loss / G).backward()", "        loss.backward()", ["tests/test_aihf_llm.py::-k micro_batches"]),
    ("rlhf: the loop ascends the PPO loss", "rlhf_llm.py",
     "                loss = (pg_loss + args.vf_coef * vf_loss) / args.gradient_accumulation_steps",
     "                loss = (-pg_loss + args.vf_coef * vf_loss) / args.gradient_accumulation_steps",
     ["tests/test_rlhf_llm.py::-k smoke_embedded_task_metrics"]),
    # afd_llm.py
    ("afd: discriminator loss with the labels swapped", "afd_llm.py",
     "    return -(labels * F.logsigmoid(logits) + (1 - labels) * F.logsigmoid(-logits))",
     "    return -((1 - labels) * F.logsigmoid(logits) + labels * F.logsigmoid(-logits))",
     ["tests/test_afd_llm.py::-k loss_by_hand"]),
    ("afd: reward = log D instead of the logit", "afd_llm.py",
     "    return F.logsigmoid(logits) - F.logsigmoid(-logits)", "    return F.logsigmoid(logits)",
     ["tests/test_afd_llm.py::-k discriminators_logit"]),
    ("afd: Best-of-N picks the lowest reward", "afd_llm.py",
     "    return rewards[:, :n].argmax(1)", "    return rewards[:, :n].argmin(1)", ["tests/test_afd_llm.py::-k picks_the_argmax"]),
    ("afd: bf16 rollouts sampled outside autocast", "afd_llm.py",
     "            with run.autocast:  # --bf16: sampled", "            with torch.no_grad():  # --bf16: sampled",
     ["tests/test_shared_machinery.py::-k 'under_autocast and afd'"]),
    # sort_task.py
    ("task: pi0 built on the calling process's thread count", "sort_task.py",
     "            with _threads(BUILD_THREADS):\n                _train_base_model(",
     "            with _threads(torch.get_num_threads()):\n                _train_base_model(",
     ["tests/test_sort_task.py::-k deterministic"]),
    ("task: the shipped pi0 loaded without its hash check", "sort_task.py",
     "    if uses_shipped_pi0(cfg):\n        check_shipped_pi0()\n", "", ["tests/test_sort_task.py::-k shipped"]),
    ("task: a killed build's folder left behind", "sort_task.py",
     "        for stale in glob.glob(os.path.join(root, \".building_*\")):", "        for stale in []:",
     ["tests/test_sort_task.py::-k killed_build"]),
    ("task: no lock around a build", "sort_task.py",
     "        lock.acquire(timeout=0)\n", "        pass\n", ["tests/test_sort_task.py::-k one_build"]),
    # aihf_mujoco.py
    ("mujoco: SAC target bootstraps through terminations", "aihf_mujoco.py",
     "    return rewards + gamma * (1.0 - dones) * (next_q - alpha * next_logp)",
     "    return rewards + gamma * (next_q - alpha * next_logp)", ["tests/test_aihf_mujoco.py::-k sac_math_by_hand"]),
    ("mujoco: SAC target without the entropy term", "aihf_mujoco.py",
     "    return rewards + gamma * (1.0 - dones) * (next_q - alpha * next_logp)",
     "    return rewards + gamma * (1.0 - dones) * next_q", ["tests/test_aihf_mujoco.py::-k sac_math_by_hand"]),
    ("mujoco: Polyak update weights swapped", "aihf_mujoco.py",
     "        tp.lerp_(p, tau)", "        tp.lerp_(p, 1 - tau)", ["tests/test_aihf_mujoco.py::-k sac_math_by_hand"]),
    ("mujoco: the IRL contrast's sign flipped", "aihf_mujoco.py",
     "    return policy_rewards.mean() - demo_rewards.mean()", "    return demo_rewards.mean() - policy_rewards.mean()",
     ["tests/test_aihf_mujoco.py::-k 'reward_loss_matches_formula or right_direction'"]),
    ("mujoco: the actor's entropy term's sign flipped", "aihf_mujoco.py",
     "    per_state = alpha * logp - q", "    per_state = -alpha * logp - q", ["tests/test_aihf_mujoco.py::-k sac_math_by_hand"]),
    # several processes (torchrun)
    ("dpo: each process's loss not scaled as its share of the batch", "dpo_llm.py",
     "scale=WORLD_SIZE / args.batch_size", "scale=1 / args.batch_size",
     ["tests/test_distributed.py::-k 'two_processes_match_one and dpo_llm'"]),
    # reporting: --eval_reward_model, --track
    ("dpo: --eval_reward_model's win rate counts the start's wins", "dpo_llm.py",
     "((final > start).float()", "((final < start).float()",
     ["tests/test_shared_machinery.py::-k 'eval_reward_model_statistics and dpo'"]),
    ("dpo: --eval_reward_model keeps the padding copies of an uneven split over processes", "dpo_llm.py",
     "    responses[suffix] = gather(response_texts(run, sampled), len(run.eval_prompts))",
     "    responses[suffix] = gather(response_texts(run, sampled))",
     ["tests/test_distributed.py::-k eval_reward_model"]),
    ("afd: --eval_reward_model scores Best-of-N's worst sample as the final response", "afd_llm.py",
     "picks = best_of_n(rewards, args.max_n).tolist()", "picks = best_of_n(-rewards, args.max_n).tolist()",
     ["tests/test_afd_llm.py::-k eval_reward_model"]),
    ("dpo: the scoring model's text scored without its EOS", "dpo_llm.py",
     "ids + [tokenizer.eos_token_id] if", "ids if",
     ["tests/test_shared_machinery.py::-k 'scores_each_text'"]),
    ("dpo: --track leaves TensorBoard unmirrored", "dpo_llm.py",
     "dir=run_dir, sync_tensorboard=True)", "dir=run_dir, sync_tensorboard=False)",
     ["tests/test_shared_machinery.py::-k 'track_mirrors and dpo'"]),
    # conversational data
    ("rlhf: a conversation's response is the whole rendered conversation (the prompt trained on)", "rlhf_llm.py",
     "            out.append(whole[len(prompt_text) :].rstrip())", "            out.append(whole.rstrip())",
     ["tests/test_shared_machinery.py::-k 'chat_template and rlhf'"]),
    ("aihf: a chat template's own EOS gets a second one", "aihf_llm.py",
     "[tokenizer.eos_token_id] * (not ended)", "[tokenizer.eos_token_id]",
     ["tests/test_shared_machinery.py::-k 'chat_template and aihf'"]),
    ("dpo: a templated prompt gets a second BOS", "dpo_llm.py",
     "add_special_tokens=not flag)", "add_special_tokens=True)",
     ["tests/test_shared_machinery.py::-k 'one_bos and dpo'"]),
    ("afd: whole-conversation pairs with different prompts kept", "afd_llm.py",
     "    if chosen[:-1] != rejected[:-1] or", "    if False and chosen[:-1] != rejected[:-1] or",
     ["tests/test_shared_machinery.py::-k 'conversational_formats and afd'"]),
    ("dpo: a forward pass given the wrapper runs outside its forward (DDP sees no forward)", "dpo_llm.py",
     "            return model(fn, *args, **kwargs)", "            return fn(getattr(model, 'module', model).model, *args, **kwargs)",
     ["tests/test_distributed.py::-k 'two_processes_match_one and dpo_llm'"]),
    ("dpo: every process takes the first share of each batch", "dpo_llm.py",
     "    return items[RANK * share : (RANK + 1) * share]", "    return items[:share]",
     ["tests/test_distributed.py::-k 'two_processes_match_one and dpo_llm'"]),
    ("dpo: DDP never all-reduces the gradients", "dpo_llm.py",
     "            model.require_backward_grad_sync = now", "            model.require_backward_grad_sync = False",
     ["tests/test_distributed.py::-k 'two_processes_match_one and dpo_llm'"]),
    ("rlhf: DDP all-reduces the reward model's first micro-batch instead of its last", "rlhf_llm.py",
     "sync_gradients(m + 1 == args.gradient_accumulation_steps, reward)", "sync_gradients(m == 0, reward)",
     ["tests/test_distributed.py::-k 'two_processes_match_one and rlhf_llm and ddp'"]),
    ("aihf: DDP all-reduces the reward step's first micro-batch instead of its last", "aihf_llm.py",
     "        sync_gradients(m + 1 == G, reward)", "        sync_gradients(m == 0, reward)",
     ["tests/test_distributed.py::-k shares_gathers"]),
    ("rlhf: DDP all-reduces PPO's first micro-batch instead of its last", "rlhf_llm.py",
     "sync_gradients(u0 + micro == m0 + minibatch_size, policy, value_model)", "sync_gradients(u0 == m0, policy, value_model)",
     ["tests/test_distributed.py::-k shares_gathers"]),
    ("rlhf: advantages whitened over one process's tokens", "rlhf_llm.py",
     "    n = global_sum(mask.sum())\n    mean = global_sum((x * mask).sum()) / n",
     "    n = mask.sum()\n    mean = (x * mask).sum() / n", ["tests/test_distributed.py::-k shares_gathers"]),
    ("rlhf: PPO's per-process token means weighted alike", "rlhf_llm.py",
     "    return WORLD_SIZE * tokens / global_sum(tokens)", "    return 1.0", ["tests/test_distributed.py::-k shares_gathers"]),
    ("dpo: a resumed optimizer state not sharded under FSDP2", "dpo_llm.py",
     "    return {**state_dict, \"state\": state}\n", "    return state_dict\n",
     ["tests/test_distributed.py::-k single_process_checkpoint_resumes_under_fsdp"]),
    ("rlhf: the evaluation restores the wrapper's mode, not the model's", "rlhf_llm.py",
     "    was_training = all(m.training for m in policy.modules())  # the model's mode",
     "    was_training = policy.training  # the model's mode",
     ["tests/test_rlhf_llm.py::-k evaluate_gold"]),
    # the data plumbing around the losses (tests/test_plumbing.py)
    ("aihf: direct's demonstration pairs given other pairs' reference log-probs", "aihf_llm.py",
     'data["demo_ref"].view(-1, 2)[demo_index]', 'data["demo_ref"].view(-1, 2)[demo_index[::-1]]',
     ["tests/test_plumbing.py::-k 'start_at_zero and direct'"]),
    ("aihf: self-play's reference log-probs not renewed in its second round", "aihf_llm.py",
     '        state.pop("round_data")\n', "", ["tests/test_plumbing.py::-k 'start_at_zero and selfplay'"]),
    ("aihf: a demonstration's negative keeps the padding after its EOS", "aihf_llm.py",
     "        pairs += [(p, c, r[m].tolist())", "        pairs += [(p, c, r.tolist())",
     ["tests/test_plumbing.py::-k 'first_eos and direct'"]),
    ("aihf: the reward re-centred on the untruncated rollouts", "aihf_llm.py",
     "torch.cat([queries, samples], 1), torch.cat([query_mask, sample_mask.long()], 1)",
     "torch.cat([queries, responses], 1), torch.cat([query_mask, torch.ones_like(responses)], 1)",
     ["tests/test_plumbing.py::-k 'first_eos and aihf_rl'"]),
    ("aihf: reward_demo_accuracy measured on training demonstrations", "aihf_llm.py",
     'run.metrics.update(reward_accuracies(run, models["reward"], policy, eval_pairs, eval_demos))',
     'run.metrics.update(reward_accuracies(run, models["reward"], policy, eval_pairs, demos[: len(eval_demos)]))',
     ["tests/test_plumbing.py::-k reward_accuracies_are_measured"]),
    ("aihf: the held-out pairs of the implicit reward are training pairs", "aihf_llm.py",
     '"eval_pairs": eval_pairs, "eval_ref": ref_logps_of(eval_pairs)',
     '"eval_pairs": prefs[: len(eval_pairs)], "eval_ref": ref_logps_of(prefs[: len(eval_pairs)])',
     ["tests/test_plumbing.py::-k implicit_reward_accuracies_are_measured"]),
    ("aihf: every round's reward steps re-use the first round's preference batches", "aihf_llm.py",
     "pref_steps[round_ * args.reward_steps + k]", "pref_steps[k]", ["tests/test_plumbing.py::-k cover_the_preferences"]),
    ("aihf: every round rolls out on the same prompts", "aihf_llm.py",
     "draw(len(demos), args.rollout_batch_size, round_seed)", "draw(len(demos), args.rollout_batch_size, args.seed)",
     ["tests/test_plumbing.py::-k their_own_prompts"]),
    ("aihf: the reference's samples drawn at --temperature, scored at 1", "aihf_llm.py",
     "truncate_after_eos(generate(policy, queries, query_mask, run, temperature=1.0),",
     "truncate_after_eos(generate(policy, queries, query_mask, run),",
     ["tests/test_plumbing.py::-k 'temperature and aihf_direct'"]),
    ("aihf: PPO scores its rollouts at temperature 1", "aihf_llm.py",
     "targets, args.temperature, args.logprob_chunk_size)", "targets, 1.0, args.logprob_chunk_size)",
     ["tests/test_plumbing.py::-k 'temperature and aihf_rl'"]),
    ("aihf: the reward step ignores --max_grad_norm", "aihf_llm.py",
     "clip_grad_norm_(reward.parameters(), args.max_grad_norm)", "clip_grad_norm_(reward.parameters(), 1.0)",
     ["tests/test_plumbing.py::-k 'own_learning_rate and aihf_rl'"]),
    ("aihf: the reward step's optimizer at the policy's learning rate", "aihf_llm.py",
     "torch.optim.AdamW(reward_model.parameters(), lr=args.rm_learning_rate", "torch.optim.AdamW(reward_model.parameters(), "
     "lr=args.learning_rate", ["tests/test_plumbing.py::-k 'own_learning_rate and aihf_rl'"]),
    ("aihf: the SFT stage trains at the policy's learning rate", "aihf_llm.py",
     "new_optimizer(model.parameters(), args.sft_learning_rate, len(steps)", "new_optimizer(model.parameters(), "
     "args.learning_rate, len(steps)", ["tests/test_plumbing.py::-k 'own_learning_rate and aihf_direct'"]),
    ("afd: PPO's KL anchored to pi0 instead of the SFT model", "afd_llm.py",
     "        train_ppo(run, model, policy, data[\"ppo_prompts\"], sft_path, rm_path)",
     "        train_ppo(run, model, policy, data[\"ppo_prompts\"], model_path, rm_path)",
     ["tests/test_plumbing.py::-k 'kl_anchor and afd'"]),
    ("afd: the discriminator's held-out accuracy measured on training prompts", "afd_llm.py",
     "examples[:-num_rm_eval], examples[-num_rm_eval:]", "examples[:-num_rm_eval], examples[:num_rm_eval]",
     ["tests/test_plumbing.py::-k discriminator_accuracy_and_best_of_n"]),
    ("rlhf: PPO rolls out at temperature 1", "rlhf_llm.py",
     "        responses = generate(policy, queries, query_mask, run)\n",
     "        responses = generate(policy, queries, query_mask, run, temperature=1.0)\n",
     ["tests/test_plumbing.py::-k 'temperature and rlhf'"]),
    ("dpo: pairs given other pairs' reference log-probs", "dpo_llm.py",
     "ref_logps[index].reshape(-1)", "ref_logps[index[::-1]].reshape(-1)",
     ["tests/test_plumbing.py::-k 'start_at_zero and dpo'"]),
    ("dpo: every micro-batch of a DPO step is its first", "dpo_llm.py",
     "            index = this_rank(run.micro_batch(steps[step], m))", "            index = this_rank(run.micro_batch(steps[step], 0))",
     ["tests/test_plumbing.py::-k 'every_training_example and dpo'"]),
    ("rlhf: the reward model's batches drawn from the first epoch's order every epoch", "rlhf_llm.py",
     "rows = pair_rows_batch([pairs[i] for i in this_rank(run.micro_batch(steps[step], m))], run.pad_id)",
     "rows = pair_rows_batch([pairs[i] for i in this_rank(run.micro_batch(steps[step % 2], m))], run.pad_id)",
     ["tests/test_plumbing.py::-k 'every_training_example and rlhf'"]),
    ("dpo: the held-out preference accuracy measured on training pairs", "dpo_llm.py",
     "    final = preference_accuracy(run, policy, eval_pairs)",
     "    final = preference_accuracy(run, policy, train_pairs[: len(eval_pairs)])",
     ["tests/test_plumbing.py::-k measured_on_held_out_pairs"]),
    ("rlhf: the reward model's accuracy measured on training pairs", "rlhf_llm.py",
     "eval_batches = [pair_rows_batch(eval_pairs[i : i + run.micro], run.pad_id)",
     "eval_batches = [pair_rows_batch(train_pairs[i : i + run.micro], run.pad_id)",
     ["tests/test_plumbing.py::-k measured_on_held_out_pairs"]),
    ("aihf: each demonstration paired with another prompt's sample", "aihf_llm.py",
     "for i, s, m in zip(index, samples.cpu(), sample_mask.cpu())]", "for i, s, m in zip(index, samples.cpu().roll(1, 0), "
     "sample_mask.cpu().roll(1, 0))]", ["tests/test_plumbing.py::-k their_own_prompts"]),
    ("afd: Best-of-N on the demonstrations' prompts", "afd_llm.py",
     "bon_prompts = task.eval_prompts if task is not None", 'bon_prompts = task.demos["prompt"][: len(task.eval_prompts)] '
     "if task is not None", ["tests/test_plumbing.py::-k best_of_n"]),
    ("every LLM script: --max_grad_norm ignored", "*_llm.py",
     "grad_norm = torch.nn.utils.clip_grad_norm_(parameters, args.max_grad_norm)",
     "grad_norm = torch.nn.utils.clip_grad_norm_(parameters, 1.0)", ["tests/test_plumbing.py::-k own_learning_rate"]),
    ("every LLM script: the warm-up ignores --warmup_ratio", "*_llm.py",
     "warmup = max(1, int(steps * args.warmup_ratio))", "warmup = max(1, int(steps * 0.1))",
     ["tests/test_plumbing.py::-k own_learning_rate"]),
    ("task: the gold reward evaluated on training prompts", "sort_task.py",
     "        prompts = self.eval_prompts\n", '        prompts = self.demos["prompt"][: len(self.eval_prompts)]\n',
     ["tests/test_plumbing.py::-k 'held_out_prompts and dpo'"]),
    ("task: the labeller's temperature inverted", "sort_task.py",
     "p_a = torch.sigmoid(margin / cfg.pref_temperature)", "p_a = torch.sigmoid(margin * cfg.pref_temperature)",
     ["tests/test_sort_task.py::-k labeller"]),
    ("mujoco: the reward trained at the critics' learning rate", "aihf_mujoco.py",
     "torch.optim.Adam(self.reward_net.parameters(), lr=args.reward_lr", "torch.optim.Adam(self.reward_net.parameters(), lr=args.q_lr",
     ["tests/test_aihf_mujoco.py::-k own_learning_rate"]),
    ("mujoco: replayed transitions relabelled at their next state", "aihf_mujoco.py",
     "b_rew = t.reward_net(reward_features(b_obs, b_act, args.reward_input))",
     "b_rew = t.reward_net(reward_features(b_next[:, : b_obs.shape[1]], b_act, args.reward_input))",
     ["tests/test_aihf_mujoco.py::-k relabelled"]),
    ("mujoco: the demonstrations' falls never reach the absorbing state", "aihf_mujoco.py",
     'with_absorbing_rows(demo_obs, demo_act, data["demo_terminated"])',
     'with_absorbing_rows(demo_obs, demo_act, 0 * data["demo_terminated"])',
     ["tests/test_aihf_mujoco.py::-k absorbing_state"]),
]


def copy_repository(dest):
    """Tracked and untracked (not ignored) files of the working tree, as they are now."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split("\n")
    for f in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def pytest_args(test):
    path, _, select = test.partition("::-k ")
    return [path, "-k", select.strip("'")] if select else [test]


def run_mutant(name, script, old, new, tests):
    """script: one file, or a glob ("*_llm.py"): the same slip made in every copy at once."""
    with tempfile.TemporaryDirectory(prefix="mutant_") as copy:
        copy_repository(copy)
        for path in sorted(glob.glob(os.path.join(copy, script))):
            source = open(path).read()
            if source.count(old) != 1:
                return "stale", f"the code to mutate occurs {source.count(old)} times in {os.path.basename(path)}", 0.0
            open(path, "w").write(source.replace(old, new))
        started = time.time()
        killed_by = run_tests(copy, tests)
        return ("killed" if killed_by else "SURVIVED"), ", ".join(killed_by), time.time() - started


def run_tests(folder, tests):
    """The tests (of `tests`) that fail when run in `folder`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    failed = []
    for test in tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *pytest_args(test)],
                              cwd=folder, env=env, capture_output=True, text=True)
        if proc.returncode not in (0, 1):
            raise RuntimeError(f"{test}: pytest exit {proc.returncode} in {folder}: {proc.stdout[-500:]}")
        if proc.returncode == 1:
            failed.append(test)
    return failed


def write_table(path, outcomes):
    """The results table, in MUTANTS' order: this run's outcomes, and for mutants it did not run (--only) the outcome
    the table already held."""
    known = {}
    if os.path.exists(path):
        for line in open(path):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 3 and cells[1] in ("killed", "SURVIVED", "stale"):
                known[cells[0]] = (cells[1], cells[2])
    known.update(outcomes)
    rows = [(m[0], *known[m[0]]) for m in MUTANTS if m[0] in known]
    lines = ["# Mutation check", "", f"`python tests/mutation_check.py` ({len(rows)} mutants; each runs only the tests "
             "listed for it, in a copy of the repository).", "", "| mutant | outcome | caught by |", "|---|---|---|"]
    lines += [f"| {name} | {outcome} | {detail} |" for name, outcome, detail in rows]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "mutation_results.md"))
    args = parser.parse_args()
    selected = [m for m in MUTANTS if args.only in m[0]]
    if args.list:
        for m in selected:
            print(f"{m[0]}  ({m[1]}; tests: {', '.join(m[4])})")
        return
    baseline_failures = [t for t in sorted({t for m in selected for t in m[4]}) if run_tests(ROOT, [t])]
    if baseline_failures:  # a mutant "caught" by a test that fails anyway proves nothing
        sys.exit(f"these tests fail without any mutant; fix them first: {baseline_failures}")
    rows = []
    for name, script, old, new, tests in selected:
        outcome, detail, seconds = run_mutant(name, script, old, new, tests)
        rows.append((name, outcome, detail, seconds))
        print(f"{outcome:9s} {seconds:6.1f}s  {name}  [{detail}]", flush=True)
    write_table(args.out, {n: (o, d) for n, o, d, _ in rows})
    sys.exit(1 if any(o != "killed" for _, o, _, _ in rows) else 0)


if __name__ == "__main__":
    main()

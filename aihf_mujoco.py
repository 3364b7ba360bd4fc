"""AIHF on MuJoCo: learn a reward and a SAC policy jointly from demonstrations AND preferences.

Li et al., "Learning Reward and Policy Jointly from Demonstration and Preference Improves Alignment" (ICLR 2025,
arXiv 2406.06874), MuJoCo experiments. The reward r_phi is the outer variable of a bilevel problem; the inner
problem is soft RL (SAC) on r_phi. Every `--sac_steps_per_iter` SAC env steps, `--reward_steps` Adam steps on

    L(phi) = mean_{policy} r_phi(s,a) - mean_{demos} r_phi(s,a)
             - w_pref * mean_{prefs} log sigma(R_phi(chosen) - R_phi(rejected))

The first two terms are the ML-IRL contrast (the gradient of the demonstrations' log-likelihood under the soft-optimal
policy of r_phi: push r up on demos, down on the policy's own samples); the last is Bradley-Terry on segment returns
R_phi (sum of r_phi over `--segment_len` steps), weighted by w_pref = `--pref_weight`. SAC trains on r_phi all the
while (every replayed transition relabelled with the current r_phi; agent and buffer never reset). By default AIHF
starts where the RLHF baseline starts: a policy cloned from the demos and a reward pre-trained on the preferences
(the paper's AIHF starts from scratch: --bc_steps 0 --reward_pretrain_steps 0).
Early termination (Hopper, Walker2d): a learned reward has no fixed level, and SAC's value after a fall is 0, so a
positive level pays for staying alive and a negative one for falling. `--termination absorbing` (DAC, Kostrikov et
al. 2019) enters an absorbing state with its own learned reward on `terminated`; `--termination rollouts` draws the
policy samples from fixed-length rollouts that ignore falls (the authors' ML-IRL code).
Other --algo: rlhf (the paper's baseline: behaviour cloning on the demos, a BT reward on the preferences, SAC on that
fixed reward), irl (w_pref = 0: ML-IRL, demos only), ipl (Inverse Preference Learning, Hejna & Sadigh 2023: no
reward net; Bradley-Terry on the critic's implicit reward Q(s,a) - gamma V(s')), sac (true reward; makes experts/).
Demos are expert rollouts; preferences compare segments of the expert with growing action noise, labelled by a
Bradley-Terry teacher on the true segment return.

    python aihf_mujoco.py --algo aihf --env_id Hopper-v5 --total_timesteps 30000 --num_demos 2000 --num_prefs 2000
    python aihf_mujoco.py --algo aihf --env_id Walker2d-v5 --seed 1 --total_timesteps 300000   # 10k demos, 20k prefs
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    exp_name: str = "aihf_mujoco"
    """the name of this experiment (prefix of the run name)"""
    run_name: Optional[str] = None
    """output folder name under runs/ (default: {exp_name}__{algo}__{env_id}__{seed}__{timestamp})"""
    seed: int = 1
    """seed of the experiment (data, networks, environments)"""
    num_threads: int = 1
    """torch CPU threads (1 is fastest per core for these small networks)"""
    track: bool = False
    """also log to Weights & Biases (pip install wandb): the TensorBoard scalars, the flags as the run's config"""
    wandb_project_name: str = "aihf"
    """the W&B project of --track"""
    wandb_entity: Optional[str] = None
    """the W&B team or user of --track (default: your own)"""
    env_id: str = "Hopper-v5"
    """gymnasium MuJoCo task with a flat Box observation and action space: Hopper-v5, HalfCheetah-v5, Walker2d-v5"""
    algo: Literal["aihf", "rlhf", "irl", "ipl", "sac"] = "aihf"
    """aihf: demos+prefs jointly; rlhf: BC, BT reward, SAC; irl: w_pref 0; ipl: implicit reward; sac: true reward"""

    # SAC (CleanRL names; CleanRL defaults unless the paper's differ)
    total_timesteps: int = 1_000_000
    """total environment steps"""
    buffer_size: int = 1_000_000
    """replay buffer capacity"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak coefficient of the target critics"""
    batch_size: Optional[int] = None
    """SAC batch size (default: 256 for --algo sac as CleanRL; 100 otherwise as the paper)"""
    learning_starts: int = 5000
    """env steps collected (random actions; the BC actor for rlhf) before updates begin"""
    policy_lr: Optional[float] = None
    """actor learning rate (default: 3e-4 for --algo sac as CleanRL; 1e-3 otherwise as the paper)"""
    q_lr: float = 1e-3
    """critic (and entropy temperature) learning rate"""
    policy_frequency: int = 2
    """actor update delay: every this many steps, this many actor updates (CleanRL)"""
    target_network_frequency: int = 1
    """Polyak update every this many steps"""
    alpha: float = 0.2
    """entropy coefficient when not autotuned (with --autotune it starts from 1.0, as CleanRL)"""
    autotune: Optional[bool] = None
    """automatic entropy tuning (default: on for --algo sac as CleanRL; off, alpha 0.2, otherwise as the paper)"""
    hidden: int = 256
    """width of the two hidden layers of the actor and the critics"""
    fixed_horizon: bool = False
    """train in an env whose episodes never end early (gymnasium's terminate_when_unhealthy=False): a fallen agent
    lies on the ground to the time limit. Demos, preferences and every evaluation use the standard env"""
    bf16: bool = False
    """run the SAC networks' matmuls in bfloat16 during updates (opt-in speed-up on CPUs with AVX512-BF16/AMX)"""

    # reward learning (aihf, irl, rlhf)
    pref_weight: float = 1.0
    """w_pref: weight of the preference (Bradley-Terry) term of the AIHF loss; --algo irl forces 0"""
    reward_input: Optional[Literal["state", "state_action"]] = None
    """reward features (default: state for HalfCheetah, state_action otherwise, as the paper)"""
    reward_lr: float = 1e-4
    """reward Adam learning rate (paper 1e-4)"""
    reward_wd: float = 1e-3
    """reward Adam weight decay (paper 1e-3)"""
    reward_steps: int = 10
    """reward gradient steps per AIHF iteration (paper 1, over 1M-5M SAC steps; 10 at our 300k budget: README)"""
    sac_steps_per_iter: int = 5000
    """SAC env steps per AIHF iteration (paper 5000)"""
    termination: Optional[Literal["absorbing", "rollouts", "replay"]] = None
    """aihf/irl: how the reward step sees early termination. absorbing: DAC's absorbing state with a learned reward;
    rollouts: policy samples from fixed-length rollouts that ignore falls (ML-IRL's code); replay: the latest replay
    transitions, value 0 after a fall (default: absorbing for aihf/irl, README; replay, i.e. none, for the others)"""
    policy_samples: Optional[int] = None
    """policy transitions per reward step (default: 10,000 = 10 rollouts of 1,000 for rollouts, as ML-IRL; else
    the latest 5,000 replay transitions, one iteration's worth)"""
    reward_batch_size: int = 10000
    """demo and policy transitions per reward step"""
    pref_batch_size: int = 256
    """preference pairs per reward step"""
    reward_pretrain_steps: Optional[int] = None
    """Bradley-Terry steps on the preferences before SAC (default: 3000 for rlhf, its reward model, and for aihf, the
    same budget, README; the paper's aihf: 0; ipl: steps of its critic loss on the preferences alone, default 0)"""
    bc_steps: Optional[int] = None
    """behaviour-cloning steps on the demos (MSE on the actor's mean action) before SAC (default: 10000 for rlhf, the
    paper's baseline, and for aihf, the same start, README; the paper's aihf, irl and ipl: 0, a random policy)"""

    # IPL (Hejna & Sadigh 2023; online SAC version)
    ipl_reg_weight: float = 0.5
    """lambda of the regulariser lambda * E[r^2] on the implicit reward (IPL 0.5)"""
    ipl_replay_weight: float = 0.5
    """share of the regulariser on replay transitions; the rest is on the preference segments (IPL 0.5)"""
    ipl_pairs: int = 16
    """preference pairs per IPL critic step (IPL's online version: 32; 16 halves the cost of a step here)"""
    ipl_window: int = 12
    """transitions of each segment per IPL critic step: a random window, one offset per batch; the label stays the
    whole segment's (IPL 12 of 25)"""

    # data
    expert_path: Optional[str] = None
    """expert actor checkpoint (default: experts/{env_id}.pt)"""
    num_demos: int = 10000
    """expert transitions used as demonstrations (paper 10,000)"""
    demo_episodes: int = 20
    """at most this many expert episodes are rolled out to collect the demos"""
    demo_actions: Optional[Literal["sample", "mean"]] = None
    """the expert's actions in the demos: sample (stochastic, as the authors' demos) or mean (deterministic)
    (default: sample for aihf/irl, whose reward contrasts them with stochastic policy samples; mean for rlhf, whose
    behaviour cloning regresses the mean action)"""
    num_prefs: int = 20000
    """preference pairs (paper 20,000)"""
    segment_len: int = 50
    """length of a preference segment (paper 50)"""
    pref_noise: float = 0.0
    """BT teacher temperature on segment returns: P(a>b) = sigmoid((R_a-R_b)/pref_noise); 0 = always the higher"""
    pool_noises: tuple[float, ...] = (0.0, 0.1, 0.3, 0.6, 1.0)
    """segment pool: the expert's mean action plus Gaussian noise of these std (varied quality)"""
    pool_steps: int = 20000
    """env steps rolled out per pool policy"""
    cache_dir: str = ".cache/aihf_mujoco"
    """where generated demos/preferences are cached (keyed by everything that defines them)"""

    # evaluation, logging, checkpoints
    eval_every: int = 10000
    """evaluate the deterministic policy on the TRUE return every this many env steps"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 100
    """log losses every this many steps (the only host reads in the hot loop)"""
    save_every: int = 50000
    """write runs/<run>/checkpoint.pt (compact: nets, optimizers, RNG) every this many steps; 0 = never"""
    save_buffer: bool = True
    """also write the replay buffer (runs/<run>/replay.pt) with each checkpoint, for exact-ish resume"""
    resume: Optional[str] = None
    """resume from a checkpoint.pt (or a run folder holding one); without replay.pt the buffer is refilled"""
    expert_out: Optional[str] = None
    """on each new best eval, re-measure on fresh seeds and save the actor here (+ returns.json beside it)"""


# The valid interval of every numeric flag, checked before anything is written ("(" excludes its end).
RANGES = {
    "seed": "[0, 2147483647]", "num_threads": "[1, 1024]", "total_timesteps": "[2, 1e10]", "buffer_size": "[1, 1e8]",
    "gamma": "[0, 1)", "tau": "(0, 1]", "batch_size": "[1, 1e6]", "learning_starts": "[1, 1e10]",
    "policy_lr": "(0, 1)", "q_lr": "(0, 1)", "policy_frequency": "[1, 1e6]", "target_network_frequency": "[1, 1e6]",
    "alpha": "(0, 1e3]", "hidden": "[1, 8192]", "pref_weight": "[0, 1e3]", "reward_lr": "(0, 1)",
    "reward_wd": "[0, 1e3]", "reward_steps": "[1, 1e6]", "sac_steps_per_iter": "[1, 1e10]",
    "policy_samples": "[1, 1e8]", "reward_batch_size": "[1, 1e8]", "pref_batch_size": "[1, 1e7]",
    "reward_pretrain_steps": "[0, 1e9]", "bc_steps": "[0, 1e9]", "ipl_reg_weight": "[0, 1e3]",
    "ipl_replay_weight": "[0, 1]", "ipl_pairs": "[1, 1e5]", "ipl_window": "[1, 1e5]", "num_demos": "[1, 1e8]",
    "demo_episodes": "[1, 1e6]", "num_prefs": "[0, 1e9]", "segment_len": "[1, 1e6]", "pref_noise": "[0, 1e9]",
    "pool_steps": "[1, 1e9]", "eval_every": "[1, 1e10]", "eval_episodes": "[1, 1000]", "log_every": "[1, 1e10]",
    "save_every": "[0, 1e10]",
}
# (each element of --pool_noises must lie in [0, 100]: checked by hand in validate_args)


# ----------------------------------------------------------------------------------------------------------
# The algorithm's math: small pure functions
# ----------------------------------------------------------------------------------------------------------
def bt_loss(chosen_rewards, rejected_rewards):
    """Bradley-Terry: -log sigmoid(r(chosen) - r(rejected)) of each pair (the chosen one is preferred)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards)


def irl_contrast(policy_rewards, demo_rewards):
    """ML-IRL: mean r(policy samples) - mean r(demos). Its gradient, E_pi[grad r] - E_D[grad r], is minus the gradient
    of the demos' log-likelihood under the soft-optimal policy of r (the policy's samples stand in for that policy)."""
    return policy_rewards.mean() - demo_rewards.mean()


def aihf_reward_loss(policy_rewards, demo_rewards, chosen_returns, rejected_returns, pref_weight):
    """AIHF's reward loss and its statistics:
    L(phi) = [mean r(policy) - mean r(demo)] + w_pref * mean -log sigma(R(chosen) - R(rejected))."""
    contrast = irl_contrast(policy_rewards, demo_rewards)
    stats = {"rewards/demo_minus_policy": -contrast.detach()}
    if pref_weight == 0:
        return contrast, stats
    pref_loss = bt_loss(chosen_returns, rejected_returns).mean()
    margins = (chosen_returns - rejected_returns).detach()
    stats.update({"losses/pref_loss": pref_loss.detach(), "rewards/margins": margins.mean(),
                  "rewards/accuracies": (margins > 0).float().mean()})
    return contrast + pref_weight * pref_loss, stats


def soft_q_target(rewards, dones, next_q, next_logp, gamma, alpha):
    """SAC's soft Bellman target  y = r + gamma * (1 - done) * (min_j Qbar_j(s', a') - alpha * log pi(a'|s')),
    a' ~ pi(.|s'); done = terminated only (a time-limit truncation bootstraps)."""
    return rewards + gamma * (1.0 - dones) * (next_q - alpha * next_logp)


def sac_critic_loss(q, target):
    """sum_j mean_batch (Q_j(s,a) - y)^2 over the critic ensemble (= CleanRL's qf1_loss + qf2_loss)."""
    return (q - target.unsqueeze(0)).pow(2).mean(1).sum()


def sac_actor_loss(logp, q, alpha, weight=None):
    """SAC's policy loss  E_s[ alpha * log pi(a~|s) - Q(s, a~) ],  a~ ~ pi(.|s) reparameterised; weight 0 drops a row
    (the absorbing state, where the policy has nothing to choose)."""
    per_state = alpha * logp - q
    return per_state.mean() if weight is None else (weight * per_state).sum() / weight.sum().clamp(min=1)


def sac_alpha_loss(log_alpha, logp, target_entropy, weight=None):
    """Entropy temperature: E_s[ -alpha * (log pi(a~|s) + target_entropy) ] (CleanRL's form; logp detached)."""
    per_state = -log_alpha.exp() * (logp + target_entropy)
    return per_state.mean() if weight is None else (weight * per_state).sum() / weight.sum().clamp(min=1)


@torch.no_grad()
def polyak_update(target_params, params, tau):
    """Target critics:  theta_bar <- (1 - tau) * theta_bar + tau * theta."""
    for tp, p in zip(target_params, params):
        tp.lerp_(p, tau)


def absorbing_next_action(next_act, next_logp, next_is_absorbing):
    """DAC's absorbing state: its only action is 0 and it has no entropy bonus, so the target bootstraps from
    V(s_abs) = Qbar(s_abs, 0) (its reward r(s_abs, 0) is learned like any other). Rows whose s' is not absorbing
    keep a' ~ pi(.|s') and log pi(a'|s')."""
    keep = 1.0 - next_is_absorbing
    return next_act * keep.unsqueeze(-1), next_logp * keep


def ipl_implicit_reward(q, next_v, terminated, gamma):
    """IPL's implicit reward of each critic member:  r(s,a) = Q(s,a) - gamma * (1 - terminated) * V(s'),
    V(s') = mean_j Qbar_j(s', a'), a' ~ pi(.|s'), without entropy term or gradient."""
    return q - gamma * (1.0 - terminated) * next_v


def ipl_loss(chosen_rewards, rejected_rewards, replay_rewards, reg_weight, replay_weight):
    """IPL's critic loss and its statistics: per critic member, Bradley-Terry on the segments' summed implicit
    rewards (undiscounted), plus the regulariser
        lambda * [(1 - w) * (E_chosen r^2 + E_rejected r^2) / 2 + w * E_replay r^2]
    that makes the optimum unique (lambda = reg_weight, w = replay_weight; no replay rows: w = 0).
    Shapes: chosen/rejected (members, pairs, steps), replay (members, batch) or None."""
    chosen_returns, rejected_returns = chosen_rewards.sum(-1), rejected_rewards.sum(-1)
    pref_loss = bt_loss(chosen_returns, rejected_returns).mean()
    segment_sq = (chosen_rewards.pow(2).mean() + rejected_rewards.pow(2).mean()) / 2
    if replay_rewards is None:
        reg = segment_sq
    else:
        reg = (1 - replay_weight) * segment_sq + replay_weight * replay_rewards.pow(2).mean()
    margins = (chosen_returns - rejected_returns).detach()
    stats = {"losses/pref_loss": pref_loss.detach(), "losses/ipl_reg": reg.detach(),
             "rewards/margins": margins.mean(), "rewards/accuracies": (margins > 0).float().mean()}
    return pref_loss + reg_weight * reg, stats


def bt_teacher_prob(ret_a, ret_b, temperature):
    """P(a preferred over b) of a Bradley-Terry teacher on true segment returns; temperature 0 = argmax."""
    ret_a, ret_b = np.asarray(ret_a, np.float64), np.asarray(ret_b, np.float64)
    if temperature == 0:
        return np.where(ret_a > ret_b, 1.0, np.where(ret_a < ret_b, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-(ret_a - ret_b) / temperature))


# ----------------------------------------------------------------------------------------------------------
# main: the algorithm box, one call per stage
# ----------------------------------------------------------------------------------------------------------
def main(args: Optional[Args] = None):
    """Make the data (expert demonstrations, labelled preference segments), then RLHF's start where asked (behaviour
    cloning, Bradley-Terry pre-training of the reward), then the loop: reward steps every --sac_steps_per_iter
    (aihf, irl) and a SAC update every step on the learned reward (IPL: its critic step); then the final metrics.
    A killed run resumes (--resume) at its last checkpoint."""
    args = validate_args(tyro.cli(Args, use_underscores=True) if args is None else args)
    started = time.time()
    torch.set_num_threads(args.num_threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    # the data before any run folder exists: data errors leave nothing half-written
    data = make_data(args) if args.algo != "sac" else None
    t = Learner(args, data)

    run_dir, ckpt = open_run(args, None if data is None else data["key"])
    writer = open_writer(run_dir, args, data)
    resumed = None
    if ckpt is not None:
        resumed = restore(ckpt, args, t.agent, t.reward_net, t.reward_opt, t.sample_gen, t.rng, t.rb)
        print(f"resumed at step {resumed[0]} ({'with' if resumed[3] else 'refilling'} the replay buffer)")
    else:
        if args.bc_steps > 0:  # RLHF's start of the policy
            behaviour_cloning(t, writer)
        pretrain_reward_on_preferences(t, writer)  # RLHF's reward model (optional for aihf)
        if args.bc_steps > 0:
            evaluate_start(t, writer)
    metrics = train(t, writer, run_dir, ckpt, started, *(resumed or (0, -float("inf"), [], False)))
    writer.close()
    if args.track:
        import wandb

        wandb.finish()
    print(json.dumps(metrics))
    return metrics


# ----------------------------------------------------------------------------------------------------------
# The stages
# ----------------------------------------------------------------------------------------------------------
class Learner:
    """What the stages share: the env, the SAC agent and its replay buffer, the reward r_phi and its optimizer, the
    demonstrations and preference segments as tensors, and the run's generators (minibatches; warm-up actions)."""

    def __init__(self, args: Args, data):
        self.args, self.data = args, data
        self.env = env = make_train_env(args)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        self.low, self.high = env.action_space.low, env.action_space.high
        self.absorbing = absorbing = args.termination == "absorbing"
        self.agent = SAC(obs_dim, act_dim, self.low, self.high, args, absorbing)
        self.rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps * (2 if absorbing else 1)), obs_dim + absorbing,
                               act_dim)
        self.sample_gen = torch.Generator().manual_seed(args.seed)
        self.rng = np.random.default_rng(args.seed)
        self.reward_net = self.reward_opt = None
        if args.algo in ("aihf", "irl", "rlhf"):
            self.reward_net = RewardNet(obs_dim + absorbing + (0 if args.reward_input == "state" else act_dim))
            self.reward_opt = torch.optim.Adam(self.reward_net.parameters(), lr=args.reward_lr, weight_decay=args.reward_wd)
        if data is not None:
            demo_obs, demo_act = data["demo_obs"], data["demo_act"]
            if absorbing:
                demo_obs, demo_act = with_absorbing_rows(demo_obs, demo_act, data["demo_terminated"])
            self.demo_obs, self.demo_act = torch.as_tensor(demo_obs), torch.as_tensor(demo_act)
            if args.num_prefs > 0:
                self.pool = {k: torch.as_tensor(data[f"pool_{k}"]) for k in ("obs", "act", "next_obs", "terminated")}
                self.chosen, self.rejected = torch.as_tensor(data["chosen"]), torch.as_tensor(data["rejected"])
        # r_phi of real (obs, action): their absorbing flag is 0
        self.reward_of = None if self.reward_net is None else \
            (lambda o, a: self.reward_net(reward_features(F.pad(o, (0, 1)) if absorbing else o, a, args.reward_input)))

    def minibatch(self, n, size):
        """Indices of a random minibatch, or all n when size >= n (full batch)."""
        return torch.arange(n) if size >= n else torch.randint(n, (size,), generator=self.sample_gen)

    def pref_returns(self):
        """R_phi(chosen), R_phi(rejected): r_phi summed over each segment of a batch of pairs."""
        i = torch.randint(len(self.chosen), (self.args.pref_batch_size,), generator=self.sample_gen)
        steps = torch.arange(self.args.segment_len)
        return tuple(self.reward_of(self.pool["obs"][s], self.pool["act"][s]).sum(1)
                     for s in (self.chosen[i].unsqueeze(1) + steps, self.rejected[i].unsqueeze(1) + steps))

    def ipl_segments(self):
        """IPL: pairs cropped to one random window of --ipl_window steps, each side as (obs, act, next_obs, term)."""
        args = self.args
        i = torch.randint(len(self.chosen), (args.ipl_pairs,), generator=self.sample_gen)
        offset = torch.randint(args.segment_len - args.ipl_window + 1, (), generator=self.sample_gen)
        steps = offset + torch.arange(args.ipl_window)
        return tuple(tuple(self.pool[k][s] for k in ("obs", "act", "next_obs", "terminated"))
                     for s in (self.chosen[i].unsqueeze(1) + steps, self.rejected[i].unsqueeze(1) + steps))

    def policy_samples(self, step):
        """The reward step's policy samples: fixed-length rollouts, or the latest replay rows."""
        if self.args.termination == "rollouts":
            length = self.env.spec.max_episode_steps or 1000
            return fixed_length_rollouts(self.agent.actor, self.args.env_id, -(-self.args.policy_samples // length), length,
                                         self.args.seed + 80_000 + step)
        return self.rb.recent(self.args.policy_samples)


def behaviour_cloning(t: Learner, writer):
    """RLHF's first stage: the actor's mean action regressed on the demonstrations' actions (MSE), --bc_steps steps."""
    args = t.args
    bc_opt = torch.optim.Adam(t.agent.actor.parameters(), lr=args.policy_lr)
    bar = progress_bar(args.bc_steps, "behaviour cloning")
    bc_obs, bc_act = torch.as_tensor(t.data["demo_obs"]), torch.as_tensor(t.data["demo_act"])  # no absorbing rows
    for i in range(args.bc_steps):
        j = torch.randint(len(bc_obs), (256,), generator=t.sample_gen)
        bc_loss = F.mse_loss(t.agent.actor.act_mean(bc_obs[j]), bc_act[j])
        adam_step(bc_opt, bc_loss)
        bar.update()
        if i % args.log_every == 0 or i == args.bc_steps - 1:
            writer.add_scalar("losses/bc_loss", bc_loss.item(), i)
            bar.set_postfix(bc_loss=f"{bc_loss.item():.4f}")
    bar.close()


def pretrain_reward_on_preferences(t: Learner, writer):
    """--reward_pretrain_steps of Bradley-Terry on the preference segments alone (RLHF's reward model; optional for
    aihf); for IPL, its critic loss on the segments alone."""
    args = t.args
    bar = progress_bar(args.reward_pretrain_steps, "reward pre-training")
    for i in range(args.reward_pretrain_steps):
        if args.algo == "ipl":
            stats = t.agent.update_critic_ipl(*t.ipl_segments(), None, args.ipl_reg_weight, args.ipl_replay_weight)
            t.agent.update_target()
            loss = stats["losses/qf_loss"]
        else:
            chosen_returns, rejected_returns = t.pref_returns()
            loss = bt_loss(chosen_returns, rejected_returns).mean()
            adam_step(t.reward_opt, loss)
            stats = {"rewards/accuracies": (chosen_returns > rejected_returns).float().mean()}
        bar.update()
        if i % args.log_every == 0 or i == args.reward_pretrain_steps - 1:
            writer.add_scalar("losses/reward_pretrain_loss", loss.item(), i)
            writer.add_scalar("rewards/pretrain_accuracies", stats["rewards/accuracies"].item(), i)
            bar.set_postfix(loss=f"{loss.item():.4f}", accuracy=f"{stats['rewards/accuracies'].item():.3f}")
    bar.close()


def evaluate_start(t: Learner, writer):
    """The behaviour-cloned policy's return, and the pre-trained reward's correlation with the true one."""
    bc_ret, _, corr = evaluate_policy(t.agent.actor, t.args.env_id, t.args.eval_episodes, t.args.seed + 50_000, t.reward_of)
    writer.add_scalar("charts/bc_return", bc_ret, 0)
    writer.add_scalar("charts/reward_corr", corr, 0)
    print(f"BC policy return {bc_ret:.1f}, learned reward's correlation with the true reward {corr:.3f}")


def train(t: Learner, writer, run_dir, ckpt, started, start_step, best_eval, eval_history, resumed_buffer):
    """The loop, one env step at a time: (aihf, irl) --reward_steps reward steps every --sac_steps_per_iter steps,
    act, then a SAC update on the learned reward relabelled at sample time (sac: the true reward; ipl: IPL's critic
    step); evaluations, checkpoints, and the final actor and metrics.json."""
    args, agent, env, rb = t.args, t.agent, t.env, t.rb
    learn_reward = args.algo in ("aihf", "irl")
    obs, _ = env.reset(seed=args.seed + start_step)
    warm_actor = args.bc_steps > 0  # a behaviour-cloned actor collects the warm-up steps, else random actions
    update_from = start_step + (0 if (resumed_buffer or start_step == 0) else args.learning_starts)
    update_from = max(update_from, args.learning_starts)
    ep_ret, ep_len, last_eval = 0.0, 0, (float("nan"), float("nan"), float("nan"))
    t0, step0 = time.time(), start_step
    actor_loss = alpha_loss = None
    bar = progress_bar(args.total_timesteps, f"{args.algo} {args.env_id}", initial=start_step)
    for global_step in range(start_step, args.total_timesteps):
        if learn_reward and global_step >= update_from and \
                (global_step - args.learning_starts) % args.sac_steps_per_iter == 0:
            loss, stats = update_reward(t, global_step)
            writer.add_scalar("losses/reward_loss", loss.item(), global_step)
            for name, value in stats.items():
                writer.add_scalar(name, value.item(), global_step)

        # act
        if global_step < args.learning_starts and not warm_actor:
            action = t.rng.uniform(t.low, t.high).astype(np.float32)
        else:
            with torch.no_grad():
                action = agent.actor.sample(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0][0].numpy()
        obs, reward, episode_over, _ = env_step(env, obs, action, rb, t.absorbing)
        ep_ret += reward
        ep_len += 1
        if episode_over:
            writer.add_scalar("charts/episodic_return", ep_ret, global_step)
            writer.add_scalar("charts/episodic_length", ep_len, global_step)
            ep_ret, ep_len = 0.0, 0

        # SAC update on the true reward (sac), the learned reward relabelled at sample time (aihf, irl, rlhf), or
        # IPL's critic step on preference segments plus this replay batch (ipl)
        if global_step >= update_from:
            b_obs, b_act, b_rew, b_next, b_done = rb.sample(args.batch_size, t.sample_gen)
            if args.algo == "ipl":
                stats = agent.update_critic_ipl(*t.ipl_segments(), (b_obs, b_act, b_next, b_done), args.ipl_reg_weight,
                                                args.ipl_replay_weight)
                qf_loss = stats.pop("losses/qf_loss")
            else:
                if t.reward_net is not None:
                    with torch.no_grad():
                        b_rew = t.reward_net(reward_features(b_obs, b_act, args.reward_input))
                qf_loss, q = agent.update_critic(b_obs, b_act, b_rew, b_next, b_done)
                stats = {"losses/qf1_values": q[0], "losses/qf2_values": q[1]}  # logged as their means
            if global_step % args.policy_frequency == 0:
                for _ in range(args.policy_frequency):
                    actor_loss, alpha_loss = agent.update_actor(b_obs)
            if global_step % args.target_network_frequency == 0:
                agent.update_target()
            if global_step % args.log_every == 0:
                writer.add_scalar("losses/qf_loss", qf_loss.item() / 2, global_step)
                for name, value in stats.items():
                    writer.add_scalar(name, value.mean().item(), global_step)
                if actor_loss is not None:
                    writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                writer.add_scalar("losses/alpha", agent.alpha.item(), global_step)
                if alpha_loss is not None:
                    writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
                writer.add_scalar("charts/SPS", int((global_step + 1 - step0) / (time.time() - t0)), global_step)
                bar.set_postfix(qf_loss=f"{qf_loss.item() / 2:.3f}",
                                actor_loss="-" if actor_loss is None else f"{actor_loss.item():.2f}")
        bar.update()

        step = global_step + 1
        if step % args.eval_every == 0 or step == args.total_timesteps:
            last_eval = evaluate_policy(agent.actor, args.env_id, args.eval_episodes, args.seed + 40_000 + step,
                                        t.reward_of)
            eval_history.append((step, last_eval[0]))
            writer.add_scalar("charts/eval_return", last_eval[0], step)
            writer.add_scalar("charts/eval_return_std", last_eval[1], step)
            if t.reward_net is not None:
                writer.add_scalar("charts/reward_corr", last_eval[2], step)
            print(f"step {step}: eval return {last_eval[0]:.1f} +- {last_eval[1]:.1f}  "
                  f"SPS {int((step - step0) / (time.time() - t0))}", flush=True)
            if last_eval[0] > best_eval:
                best_eval = last_eval[0]
                record_expert(args, agent.actor, run_dir, step, last_eval[0])
        if args.save_every and (step % args.save_every == 0 or step == args.total_timesteps):
            save_checkpoint(args, run_dir, step, agent, t.reward_net, t.reward_opt, t.sample_gen, t.rng, rb, best_eval,
                            eval_history, None if t.data is None else t.data["key"], wall_s(ckpt, started))
    bar.close()

    env.close()
    save_actor(agent.actor, args.env_id, os.path.join(run_dir, "actor.pt"), dict(step=args.total_timesteps))
    data = t.data
    metrics = dict(algo=args.algo, task=args.env_id, seed=args.seed, steps=args.total_timesteps,
                   wall_s=round(wall_s(ckpt, started), 1),
                   sps=round((args.total_timesteps - step0) / (time.time() - t0), 1),
                   eval_return_mean=last_eval[0], eval_return_std=last_eval[1],
                   last10_mean=last_tenth_mean([r for _, r in eval_history]), best_eval_return=best_eval,
                   reward_corr=None if t.reward_net is None else last_eval[2],
                   expert_return=None if data is None else data["expert_return"],
                   expert_return_std=None if data is None else data["expert_return_std"],
                   demo_return=None if data is None else data["demo_return"],
                   num_demos=None if data is None else args.num_demos,
                   num_prefs=None if data is None else args.num_prefs)
    write_json(metrics, os.path.join(run_dir, "metrics.json"))
    return metrics


def update_reward(t: Learner, global_step):
    """AIHF's (IRL's) reward step, --reward_steps times: the ML-IRL contrast of r_phi on demonstrations against the
    policy's samples, plus --pref_weight times Bradley-Terry on segment returns. Returns the last step's loss, stats."""
    args = t.args
    pol_obs, pol_act = t.policy_samples(global_step)
    for _ in range(args.reward_steps):
        i, j = t.minibatch(len(pol_obs), args.reward_batch_size), t.minibatch(len(t.demo_obs), args.reward_batch_size)
        policy_rewards = t.reward_net(reward_features(pol_obs[i], pol_act[i], args.reward_input))
        demo_rewards = t.reward_net(reward_features(t.demo_obs[j], t.demo_act[j], args.reward_input))
        chosen_returns, rejected_returns = t.pref_returns() if args.pref_weight != 0 else (None, None)
        loss, stats = aihf_reward_loss(policy_rewards, demo_rewards, chosen_returns, rejected_returns, args.pref_weight)
        adam_step(t.reward_opt, loss)
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# Networks and the SAC agent
# ----------------------------------------------------------------------------------------------------------
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy (CleanRL's architecture and log-std squashing)."""

    def __init__(self, obs_dim, act_dim, hidden, low, high):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(obs_dim, hidden), nn.Linear(hidden, hidden)
        self.fc_mean, self.fc_logstd = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)
        low, high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.register_buffer("action_scale", (high - low) / 2)
        self.register_buffer("action_bias", (high + low) / 2)
        self.register_buffer("log_scale_sum", self.action_scale.log().sum())

    def forward(self, obs):
        h = F.relu(self.fc2(F.relu(self.fc1(obs))))
        log_std = torch.tanh(self.fc_logstd(h).float())  # .float(): the heads leave a bf16 autocast in fp32
        return self.fc_mean(h).float(), LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)

    def sample(self, obs, generator=None):
        """Reparameterised action and its log-probability (with the tanh change of variables)."""
        mean, log_std = self(obs)
        eps = torch.randn_like(mean) if generator is None else torch.randn(mean.shape, generator=generator)
        u = mean + log_std.exp() * eps
        # log N(u; mean, std) - log|d tanh(u)/du| - log scale; log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
        # is the overflow-free form of the (1 - y^2 + 1e-6) trick
        log_prob = (-0.5 * eps.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
                    - 2 * (math.log(2) - u - F.softplus(-2 * u))).sum(1) - self.log_scale_sum
        return torch.tanh(u) * self.action_scale + self.action_bias, log_prob

    def act_mean(self, obs):
        return torch.tanh(self(obs)[0]) * self.action_scale + self.action_bias


class EnsembleQ(nn.Module):
    """n Q-networks in one: weights shaped (n, in, out), evaluated with batched matmuls (one op per layer)."""

    def __init__(self, in_dim, hidden, n=2):
        super().__init__()
        self.n = n
        dims = [in_dim, hidden, hidden, 1]
        self.ws, self.bs = nn.ParameterList(), nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default init, per member
            self.ws.append(nn.Parameter(torch.empty(n, d_in, d_out).uniform_(-bound, bound)))
            self.bs.append(nn.Parameter(torch.empty(n, 1, d_out).uniform_(-bound, bound)))

    def forward(self, obs, act, detach_params=False):
        """Q-values of shape (n, B). detach_params: gradients flow to the inputs only (actor update)."""
        (w1, w2, w3), (b1, b2, b3) = self.ws, self.bs
        if detach_params:
            w1, w2, w3, b1, b2, b3 = (p.detach() for p in (w1, w2, w3, b1, b2, b3))
        x = torch.cat([obs, act], 1).unsqueeze(0).expand(self.n, -1, -1)
        x = F.relu(torch.baddbmm(b1, x, w1))
        x = F.relu(torch.baddbmm(b2, x, w2))
        # the 1-wide output layer as multiply-and-sum: faster here than a batched matmul with one output column
        return (x.float() * w3.transpose(1, 2)).sum(-1) + b3.squeeze(-1)


class RewardNet(nn.Module):
    """r_phi: MLP [64, 64] ReLU, output clamped to +-10 (paper)."""

    def __init__(self, in_dim, hidden=64, clamp=10.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        self.clamp = clamp

    def forward(self, x):
        return self.net(x).squeeze(-1).clamp(-self.clamp, self.clamp)


def reward_features(obs, act, reward_input):
    return obs if reward_input == "state" else torch.cat([obs, act], -1)


def adam_step(opt, loss):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


class SAC(nn.Module):
    """Actor, twin critics (one ensemble) with their targets, entropy temperature, and their optimisers. With an
    absorbing state the critics see one more input, the absorbing flag (the observation's last entry); the actor
    sees the plain observation."""

    def __init__(self, obs_dim, act_dim, low, high, args: Args, absorbing=False):
        super().__init__()
        self.obs_dim, self.absorbing = obs_dim, absorbing
        q_in = obs_dim + int(absorbing) + act_dim
        self.actor = Actor(obs_dim, act_dim, args.hidden, low, high)
        self.qf = EnsembleQ(q_in, args.hidden)
        self.qf_target = EnsembleQ(q_in, args.hidden)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.gamma, self.tau, self.autotune = args.gamma, args.tau, args.autotune
        # IPL reads V(s') and the actor's Q as the ensemble's mean, SAC as its minimum (clipped double Q)
        self.reduce_q = (lambda q: q.mean(0)) if args.algo == "ipl" else (lambda q: q.min(0).values)
        self.target_entropy = -float(act_dim)
        self.log_alpha = nn.Parameter(torch.full((1,), 0.0 if args.autotune else math.log(args.alpha)))
        self.q_opt = torch.optim.Adam(self.qf.parameters(), lr=args.q_lr, fused=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.policy_lr, fused=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.q_lr, fused=True)
        # --bf16: matmuls in bfloat16, everything else (Q outputs, log-probs, losses, weights, Adam) in fp32
        self.amp = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)

    @property
    def alpha(self):
        return self.log_alpha.detach().exp()

    def next_action(self, next_obs):
        """a' ~ pi(.|s') and log pi(a'|s'); from the absorbing state the action 0 without entropy term."""
        next_act, next_logp = self.actor.sample(next_obs[:, :self.obs_dim])
        if self.absorbing:
            next_act, next_logp = absorbing_next_action(next_act, next_logp, next_obs[:, -1])
        return next_act, next_logp

    def update_critic(self, obs, act, rew, next_obs, done):
        """One Adam step of sac_critic_loss towards soft_q_target. Returns (loss, Q-values)."""
        with torch.no_grad(), self.amp():
            next_act, next_logp = self.next_action(next_obs)
            next_q = self.reduce_q(self.qf_target(next_obs, next_act))
            target = soft_q_target(rew, done, next_q, next_logp, self.gamma, self.alpha)
        with self.amp():
            q = self.qf(obs, act)
        loss = sac_critic_loss(q, target)
        adam_step(self.q_opt, loss)
        return loss.detach(), q.detach()

    def update_critic_ipl(self, chosen, rejected, replay, reg_weight, replay_weight):
        """One Adam step of ipl_loss. chosen/rejected: (obs, act, next_obs, terminated) of shape (pairs, steps, .);
        replay: the same of shape (batch, .), or None (pre-training on the preferences alone). Returns the stats."""
        pairs, steps = chosen[0].shape[:2]
        n = pairs * steps
        rows = [[x.reshape(n, *x.shape[2:]) for x in part] for part in (chosen, rejected)]
        obs, act, next_obs, term = (torch.cat(col) for col in zip(*rows, *([replay] if replay is not None else [])))
        with torch.no_grad(), self.amp():
            next_v = self.reduce_q(self.qf_target(next_obs, self.actor.sample(next_obs)[0]))
        with self.amp():
            rewards = ipl_implicit_reward(self.qf(obs, act), next_v, term, self.gamma)  # (members, rows)
        chosen_r, rejected_r = (rewards[:, k * n:(k + 1) * n].reshape(-1, pairs, steps) for k in (0, 1))
        replay_r = rewards[:, 2 * n:] if replay is not None else None
        loss, stats = ipl_loss(chosen_r, rejected_r, replay_r, reg_weight, replay_weight)
        adam_step(self.q_opt, loss)
        return dict(stats, **{"losses/qf_loss": loss.detach()})

    def update_actor(self, obs):
        """One Adam step of sac_actor_loss and, with --autotune, one of sac_alpha_loss (absorbing rows skipped)."""
        weight = 1.0 - obs[:, -1] if self.absorbing else None
        with self.amp():
            act, logp = self.actor.sample(obs[:, :self.obs_dim])
            # critic weights detached: the backward computes d/d(action) only, no wasted critic weight grads
            q = self.reduce_q(self.qf(obs, act, detach_params=True))
        loss = sac_actor_loss(logp, q, self.alpha, weight)
        adam_step(self.actor_opt, loss)
        alpha_loss = None
        if self.autotune:  # reuse this batch's log-probs (CleanRL draws a fresh no-grad sample; same expectation)
            alpha_loss = sac_alpha_loss(self.log_alpha, logp.detach(), self.target_entropy, weight)
            adam_step(self.alpha_opt, alpha_loss)
        return loss.detach(), alpha_loss

    def update_target(self):
        polyak_update(self.qf_target.parameters(), self.qf.parameters(), self.tau)


# ----------------------------------------------------------------------------------------------------------
# Data: replay, expert rollouts -> demos, policy pool -> segments -> BT-labelled preferences (cached)
# ----------------------------------------------------------------------------------------------------------
class ReplayBuffer:
    """Preallocated numpy arrays (cheap single-row writes) viewed as torch tensors (cheap batched gathers)."""

    def __init__(self, capacity, obs_dim, act_dim):
        self.capacity, self.ptr, self.size = capacity, 0, 0
        self.np = dict(obs=np.zeros((capacity, obs_dim), np.float32), act=np.zeros((capacity, act_dim), np.float32),
                       rew=np.zeros(capacity, np.float32), next_obs=np.zeros((capacity, obs_dim), np.float32),
                       done=np.zeros(capacity, np.float32))
        self.t = {k: torch.from_numpy(v) for k, v in self.np.items()}

    def add(self, obs, act, rew, next_obs, done):
        i = self.ptr
        self.np["obs"][i], self.np["act"][i], self.np["rew"][i] = obs, act, rew
        self.np["next_obs"][i], self.np["done"][i] = next_obs, done
        self.ptr = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, n, generator):
        idx = torch.randint(self.size, (n,), generator=generator)
        return [self.t[k][idx] for k in ("obs", "act", "rew", "next_obs", "done")]

    def recent(self, n):
        """The n most recently added transitions (the current policy's own samples)."""
        n = min(n, self.size)
        idx = (torch.arange(self.ptr - n, self.ptr)) % self.capacity
        return self.t["obs"][idx], self.t["act"][idx]

    def state_dict(self):
        """The stored transitions oldest first, so a buffer of another capacity can take them (a resumed run
        with a larger --total_timesteps gets a larger buffer)."""
        order = (np.arange(self.size) + (self.ptr if self.size == self.capacity else 0)) % self.capacity
        return dict(size=self.size, **{k: v[order] for k, v in self.np.items()})

    def load_state_dict(self, d):
        keep = min(d["size"], self.capacity)  # a smaller buffer keeps the most recent transitions
        for k in self.np:
            self.np[k][:keep] = d[k][d["size"] - keep:]
        self.size, self.ptr = keep, keep % self.capacity


def absorbing_state(obs_dim):
    """DAC's absorbing state: all zeros with the absorbing flag 1 (a real observation carries flag 0)."""
    return np.append(np.zeros(obs_dim, np.float32), np.float32(1.0))


def env_step(env, obs, action, rb, absorbing=False):
    """One env step stored in rb. A single (non-vector) env reset by hand, so a stored transition never spans
    two episodes. done = terminated only: a time-limit truncation still bootstraps from the real final obs.
    absorbing: observations carry the flag 0; on `terminated` (never on truncation) the transition leads to the
    absorbing state, which then loops to itself (action 0, done 0: the critic bootstraps through it).
    Returns (obs for the next step, reward, episode_over, info)."""
    next_obs, reward, terminated, truncated, info = env.step(action)
    if absorbing:
        s_abs = absorbing_state(len(obs))
        next_aug = s_abs if terminated else np.append(next_obs, np.float32(0))
        rb.add(np.append(obs, np.float32(0)), action, reward, next_aug, 0.0)
        if terminated:
            rb.add(s_abs, np.zeros_like(action), 0.0, s_abs, 0.0)
    else:
        rb.add(obs, action, reward, next_obs, float(terminated))
    if terminated or truncated:
        next_obs, _ = env.reset()
    return next_obs, reward, terminated or truncated, info


def with_absorbing_rows(obs, act, terminated):
    """Demos for an absorbing-state reward: every observation gets the flag 0, and each terminated step is followed
    by one absorbing row (the absorbing state, action 0), as DAC converts its expert data."""
    obs_l, act_l = [], []
    s_abs = absorbing_state(obs.shape[1])
    for o, a, t in zip(obs, act, terminated):
        obs_l.append(np.append(o, np.float32(0)))
        act_l.append(a)
        if t:
            obs_l.append(s_abs)
            act_l.append(np.zeros_like(a))
    return np.asarray(obs_l, np.float32), np.asarray(act_l, np.float32)


@torch.no_grad()
def rollout(env, policy, steps=None, episodes=None, seed=0):
    """Run whole episodes (policy: obs batch -> action batch) until `steps` transitions or `episodes` episodes.
    Returns a dict of per-step arrays (obs, act, rew, next_obs, terminated, ep: episode id) and the episode returns;
    the last episode is always complete."""
    out = {k: [] for k in ("obs", "act", "rew", "next_obs", "terminated", "ep")}
    ep_returns = []
    obs, _ = env.reset(seed=seed)
    ep, ep_ret, n = 0, 0.0, 0
    while True:
        act = policy(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0].numpy()
        next_obs, r, term, trunc, _ = env.step(act)
        for k, v in zip(out, (obs, act, r, next_obs, term, ep)):
            out[k].append(v)
        ep_ret += r
        n += 1
        obs = next_obs
        if term or trunc:
            ep_returns.append(ep_ret)
            ep, ep_ret = ep + 1, 0.0
            if (steps is not None and n >= steps) or (episodes is not None and ep >= episodes):
                break
            obs, _ = env.reset()
    dtypes = dict(obs=np.float32, act=np.float32, rew=np.float32, next_obs=np.float32, terminated=np.float32,
                  ep=np.int64)
    return {k: np.asarray(v, dtypes[k]) for k, v in out.items()}, np.asarray(ep_returns)


@torch.no_grad()
def fixed_length_rollouts(actor, env_id, n_rollouts, length, seed):
    """The policy samples of ML-IRL's reward step: n_rollouts rollouts of exactly `length` stochastic steps that
    ignore falls (after one, the on-ground states fill the rollout), run side by side. Returns (obs, act)."""
    kwargs = dict(terminate_when_unhealthy=False) if has_healthy_termination(env_id) else {}
    envs = [gym.make(env_id, max_episode_steps=length, **kwargs) for _ in range(n_rollouts)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    gen = torch.Generator().manual_seed(seed)
    obs_l, act_l = [], []
    for _ in range(length):
        o = torch.from_numpy(obs)
        act = actor.sample(o, generator=gen)[0]
        obs_l.append(o), act_l.append(act)
        obs = np.stack([e.step(a)[0] for e, a in zip(envs, act.numpy())]).astype(np.float32)
    for e in envs:
        e.close()
    return torch.cat(obs_l), torch.cat(act_l)


def segment_starts(ep_ids, seg_len):
    """Start indices t such that steps t .. t+seg_len-1 all lie in one episode."""
    n = len(ep_ids)
    if n < seg_len:
        return np.zeros(0, np.int64)
    t = np.arange(n - seg_len + 1)
    return t[ep_ids[t] == ep_ids[t + seg_len - 1]]


def label_preferences(seg_returns_a, seg_returns_b, temperature, rng):
    """Bradley-Terry teacher: a is preferred with probability sigma((R_a - R_b)/T) (T = 0: the higher wins)."""
    p = bt_teacher_prob(seg_returns_a, seg_returns_b, temperature)
    return rng.random(len(p)) < p


def make_data(args: Args):
    """Demos and preferences, deterministic by seed, cached under --cache_dir (atomic write)."""
    with open(args.expert_path, "rb") as f:
        expert_sha = hashlib.sha256(f.read()).hexdigest()[:16]
    key_fields = dict(env=args.env_id, expert=expert_sha, seed=args.seed, num_demos=args.num_demos,
                      demo_episodes=args.demo_episodes, num_prefs=args.num_prefs, seg=args.segment_len,
                      noise=args.pref_noise, pool=list(args.pool_noises), pool_steps=args.pool_steps, v=1,
                      gymnasium=gym.__version__, mujoco=version("mujoco"))  # a simulator upgrade changes rollouts
    if args.demo_actions != "mean":  # absent for mean-action demos, so their data keys stay as they were
        key_fields["demo_actions"] = args.demo_actions
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"{args.env_id}_{key}.pt")
    if os.path.isfile(path):
        data = torch.load(path, weights_only=False)
        if "demo_terminated" in data and (args.num_prefs == 0 or "pool_next_obs" in data):
            return dict(data, key=key)  # else a cache file of an older layout: generate again (same content)
    expert = load_actor(args.expert_path)
    env = gym.make(args.env_id)
    rng = np.random.default_rng(args.seed)
    # demonstrations: the expert's episodes until num_demos transitions, with sampled or mean actions
    demo_gen = torch.Generator().manual_seed(args.seed + 10_000)
    policy = expert.act_mean if args.demo_actions == "mean" else (lambda o: expert.sample(o, generator=demo_gen)[0])
    demo, ep_ret = rollout(env, policy, steps=args.num_demos, seed=args.seed + 10_000)
    if len(ep_ret) > args.demo_episodes or len(demo["obs"]) < args.num_demos:
        fail(f"the expert's {args.demo_episodes} episodes give fewer than --num_demos {args.num_demos} transitions "
             f"(its episodes last ~{len(demo['obs']) / max(len(ep_ret), 1):.0f} steps); raise --demo_episodes or "
             "lower --num_demos")
    data = dict(demo_obs=demo["obs"][:args.num_demos], demo_act=demo["act"][:args.num_demos],
                demo_terminated=demo["terminated"][:args.num_demos],
                demo_return=float(ep_ret.mean()), demo_return_std=float(ep_ret.std()))
    # expert return on 10 separate episodes
    data["expert_return"], data["expert_return_std"] = evaluate_policy(expert, args.env_id, 10, args.seed + 20_000)[:2]
    if args.num_prefs > 0:
        parts = []
        for k, sigma in enumerate(args.pool_noises):
            gen = torch.Generator().manual_seed(args.seed * 100 + k)
            low, high = expert.action_bias - expert.action_scale, expert.action_bias + expert.action_scale

            def noisy(o, sigma=sigma, gen=gen):
                a = expert.act_mean(o)
                return (a + sigma * torch.randn(a.shape, generator=gen)).clamp(low, high)

            part, _ = rollout(env, noisy, steps=args.pool_steps, seed=args.seed + 30_000 + 1000 * k)
            part["ep"] += (parts[-1]["ep"][-1] + 1) if parts else 0
            parts.append(part)
        pool = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        starts = segment_starts(pool["ep"], args.segment_len)
        if len(starts) == 0:
            fail(f"no pool episode lasts --segment_len {args.segment_len} steps; lower --segment_len")
        a_idx, b_idx = rng.choice(starts, args.num_prefs), rng.choice(starts, args.num_prefs)
        csum = np.concatenate([[0.0], np.cumsum(pool["rew"], dtype=np.float64)])
        ret_a = csum[a_idx + args.segment_len] - csum[a_idx]
        ret_b = csum[b_idx + args.segment_len] - csum[b_idx]
        a_wins = label_preferences(ret_a, ret_b, args.pref_noise, rng)
        data.update(pool_obs=pool["obs"], pool_act=pool["act"], pool_next_obs=pool["next_obs"],
                    pool_terminated=pool["terminated"],
                    chosen=np.where(a_wins, a_idx, b_idx), rejected=np.where(a_wins, b_idx, a_idx),
                    pref_teacher_agreement=float(np.mean((ret_a >= ret_b) == a_wins)))
    env.close()
    os.makedirs(args.cache_dir, exist_ok=True)
    atomic_save(data, path)
    return dict(data, key=key)


@torch.no_grad()
def evaluate_policy(actor, env_id, episodes, seed, reward_fn=None):
    """Deterministic (mean-action) policy on the TRUE return; the episodes run side by side with one batched
    actor call per step. With reward_fn(obs, act): Pearson correlation of the learned reward with the true one."""
    envs = [gym.make(env_id) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    returns, alive = np.zeros(episodes), np.ones(episodes, bool)
    learned, true_r = [], []
    while alive.any():
        ids = np.flatnonzero(alive)
        o = torch.as_tensor(obs[ids])
        act = actor.act_mean(o)
        if reward_fn is not None:
            learned.append(reward_fn(o, act))
        for j, i in enumerate(ids):
            nobs, r, term, trunc, _ = envs[i].step(act[j].numpy())
            returns[i] += r
            obs[i] = nobs
            true_r.append(r)
            if term or trunc:
                alive[i] = False
    for e in envs:
        e.close()
    corr = float("nan")
    if reward_fn is not None:
        learned = torch.cat(learned).numpy()
        if learned.std() > 0:
            corr = float(np.corrcoef(learned, np.asarray(true_r))[0, 1])
    return float(returns.mean()), float(returns.std()), corr


def last_tenth_mean(returns):
    """Mean of the last 10% of the evaluations (at least one): one evaluation alone can mislead either way."""
    if not returns:
        return float("nan")
    return float(np.mean(returns[-max(1, math.ceil(len(returns) / 10)):]))


# ----------------------------------------------------------------------------------------------------------
# Machinery: input validation, run folder, checkpoint/resume, expert files, shared helpers
# ----------------------------------------------------------------------------------------------------------
def validate_args(args: Args) -> Args:
    """Fill algorithm-dependent defaults and reject bad input (one line, exit code 2) before anything is written."""
    check_ranges(args, RANGES)
    check_track(args)
    for noise in args.pool_noises:  # a tuple flag: each element by hand
        if not 0 <= noise <= 100:
            fail(f"--pool_noises must each be in [0, 100] (got {noise})")
    paper = args.algo != "sac"
    learns_from_policy = args.algo in ("aihf", "irl")
    if args.algo == "irl":  # ML-IRL: demonstrations alone
        args.pref_weight, args.num_prefs = 0.0, 0
    if args.termination is None:
        args.termination = "absorbing" if learns_from_policy else "replay"
    for name, value in (("batch_size", 100 if paper else 256), ("policy_lr", 1e-3 if paper else 3e-4),
                        ("autotune", not paper), ("expert_path", f"experts/{args.env_id}.pt"),
                        ("reward_input", "state" if args.env_id.startswith("HalfCheetah") else "state_action"),
                        ("policy_samples", 10_000 if args.termination == "rollouts" else 5000),
                        ("reward_pretrain_steps", 3000 if args.algo in ("rlhf", "aihf") else 0),
                        ("bc_steps", 10000 if args.algo in ("rlhf", "aihf") else 0),
                        ("demo_actions", "mean" if args.algo == "rlhf" else "sample")):
        if getattr(args, name) is None:  # the defaults that depend on --algo, --env_id or --termination
            setattr(args, name, value)
    if args.learning_starts >= args.total_timesteps:
        fail(f"--learning_starts must be < --total_timesteps (got {args.learning_starts} >= {args.total_timesteps})")
    if args.buffer_size < args.policy_samples and args.termination != "rollouts":
        fail(f"--buffer_size {args.buffer_size} must be >= --policy_samples {args.policy_samples}")
    if args.termination != "replay" and not learns_from_policy:
        fail(f"--termination {args.termination} applies to --algo aihf/irl only (their reward learns from the "
             "policy's samples); drop it")
    if args.bc_steps > 0 and args.algo == "sac":
        fail("--bc_steps clones the demos, and --algo sac has none; drop it")
    if args.reward_pretrain_steps > 0 and (args.algo == "sac" or args.num_prefs == 0):
        fail(f"--reward_pretrain_steps trains on the preferences, and --algo {args.algo} has none; drop it")
    if args.algo == "ipl" and args.ipl_window > args.segment_len:
        fail(f"--ipl_window {args.ipl_window} must be <= --segment_len {args.segment_len}")
    try:
        env = gym.make(args.env_id)
    except Exception as e:  # unknown id, missing mujoco, ...
        fail(f"cannot make env {args.env_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
             "use e.g. --env_id Hopper-v5")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{args.env_id} has a {type(env.action_space).__name__} action space; SAC needs a continuous "
             "Box action space (use a MuJoCo task such as Hopper-v5)")
    if not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1):
        fail(f"{args.env_id} needs a flat Box observation space")
    max_steps = env.spec.max_episode_steps or 1000
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    if args.fixed_horizon and not has_healthy_termination(args.env_id):
        fail(f"--fixed_horizon: {args.env_id} has no terminate_when_unhealthy option (its episodes never end "
             "early anyway); drop --fixed_horizon")
    if args.algo != "sac":
        if args.segment_len > max_steps:
            fail(f"--segment_len {args.segment_len} is longer than a {args.env_id} episode ({max_steps} "
                 f"steps); use --segment_len <= {max_steps}")
        if args.num_demos > args.demo_episodes * max_steps:
            fail(f"--num_demos {args.num_demos} exceeds what --demo_episodes {args.demo_episodes} expert episodes "
                 f"of at most {max_steps} steps allow; raise --demo_episodes or lower --num_demos")
        if args.algo in ("aihf", "rlhf", "ipl") and args.num_prefs <= 0:
            fail(f"--algo {args.algo} needs --num_prefs > 0")
        if args.num_prefs > 0 and (not args.pool_noises or args.pool_steps < args.segment_len):
            fail("preferences need a segment pool: give --pool_noises and --pool_steps >= --segment_len")
        make_one = f"make one with: python aihf_mujoco.py --algo sac --env_id {args.env_id} --expert_out "
        if not os.path.isfile(args.expert_path):
            fail(f"no expert checkpoint at {args.expert_path}; {make_one}{args.expert_path}  (or pass --expert_path)")
        # loaded here (a small actor file), not first in the demo rollout, where another env's expert fails deep
        # inside a matmul and only after the run has started
        expert = load_or_fail(args.expert_path, "--expert_path", ACTOR_KEYS,
                              f"pass an actor file this script saved (e.g. experts/{args.env_id}.pt)")
        trained_on = expert.get("env_id") or f"an env with {expert['obs_dim']}-dim observations"  # older files: dims only
        if expert.get("env_id") not in (None, args.env_id) or (expert["obs_dim"], expert["act_dim"]) != (obs_dim, act_dim):
            fail(f"expert {args.expert_path} was trained on {trained_on}, not {args.env_id}: pass --expert_path "
                 f"for {args.env_id} (the default is experts/{args.env_id}.pt), or {make_one}experts/{args.env_id}.pt")
    if args.resume is not None:
        ckpt = args.resume if args.resume.endswith(".pt") else os.path.join(args.resume, "checkpoint.pt")
        if not os.path.isfile(ckpt):
            fail(f"--resume: no checkpoint at {ckpt}; pass a checkpoint.pt or a run folder holding one")
        # e.g. a run's actor.pt: refused now, not with a KeyError after the demos are made
        load_or_fail(ckpt, "--resume", CHECKPOINT_KEYS, "pass a run's checkpoint.pt (not actor.pt) or its run folder")
        args.resume = ckpt
    return args


# What load_actor and restore read: a file without them is no expert, or no training checkpoint.
ACTOR_KEYS = ("state_dict", "obs_dim", "act_dim", "hidden", "low", "high")
CHECKPOINT_KEYS = ("args", "step", "agent", "q_opt", "actor_opt", "alpha_opt", "torch_rng", "sample_rng", "np_rng",
                   "best_eval")


def load_or_fail(path, flag, keys, fix):
    """torch.load a file a flag names; fail() in one line if it is not a torch file holding a dict with keys."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # garbage, a truncated copy, another format: torch's traceback would hide the flag
        first_line = (str(e).splitlines() or [""])[0][:80]
        fail(f"{flag} {path} is not a torch checkpoint ({type(e).__name__}: {first_line}); {fix}")
    missing = [k for k in keys if k not in d] if isinstance(d, dict) else list(keys)
    if missing:
        fail(f"{flag} {path} lacks {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; {fix}")
    return d


def has_healthy_termination(env_id):
    """Whether the env can end an episode early (a fall) and has gymnasium's terminate_when_unhealthy switch."""
    creator = gym.envs.registration.load_env_creator(gym.spec(env_id).entry_point)
    return "terminate_when_unhealthy" in inspect.signature(creator).parameters


def make_train_env(args: Args):
    """The env SAC trains in; --fixed_horizon turns off early termination (evaluation never does)."""
    return gym.make(args.env_id, **(dict(terminate_when_unhealthy=False) if args.fixed_horizon else {}))


# Flags renamed since a checkpoint may have been written, and what a checkpoint written before a flag existed ran
# with: a resumed run is compared under today's names and refused if today's command changes its algorithm.
RENAMED_FLAGS = {"threads": "num_threads", "checkpoint_every": "save_every"}


def saved_args(saved: dict) -> dict:
    """A checkpoint's args under today's flag names, with the behaviour of flags it predates filled in."""
    saved = {RENAMED_FLAGS.get(k, k): v for k, v in saved.items()}
    if "rlhf_reward_steps" in saved:  # the rlhf-only pre-training flag became --reward_pretrain_steps for all
        steps = saved.pop("rlhf_reward_steps")
        saved.setdefault("reward_pretrain_steps", steps if saved.get("algo") == "rlhf" else 0)
        if saved.get("algo") != "rlhf":  # --bc_steps, then rlhf's alone, was ignored by the other methods
            saved["bc_steps"] = 0
    saved.setdefault("termination", "replay")
    saved.setdefault("demo_actions", "mean")
    return saved


def open_run(args: Args, data_key):
    """Check a --resume checkpoint against this command, then make the run folder and write config.json.
    Returns (run_dir, checkpoint or None)."""
    ckpt = None
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        saved = saved_args(ckpt["args"])
        # A resumed run may change how long it runs and what it logs; any other knob would splice two different
        # runs into one curve. The data flags are checked through the data key below, whose message names them.
        may_change = {"exp_name", "run_name", "num_threads", "total_timesteps", "buffer_size", "learning_starts",
                      "eval_every", "eval_episodes", "log_every", "save_every", "save_buffer", "resume",
                      "cache_dir", "expert_out", "demo_actions",  # demos: compared through the data key, below
                      "track", "wandb_project_name", "wandb_entity"}
        if args.algo != "ipl":  # knobs the run never read
            may_change |= {"ipl_reg_weight", "ipl_replay_weight", "ipl_pairs", "ipl_window"}
        if data_key is not None:
            may_change |= {"seed", "expert_path", "num_demos", "demo_episodes", "num_prefs", "segment_len",
                           "pref_noise", "pool_noises", "pool_steps"}
        for k, value in asdict(args).items():
            if k in may_change or k not in saved:  # a field newer than the checkpoint: nothing to compare
                continue
            if saved[k] != value:
                fail(f"--resume: checkpoint has --{k} {saved[k]!r} but this command has {value!r}; "
                     "repeat the original command's flags")
        if data_key is not None and ckpt.get("data_key", data_key) != data_key:
            fail("--resume: this command's demos/preferences differ from the checkpoint's (another --seed, expert or "
                 "data flag); repeat the original command's data flags")
        if ckpt["step"] >= args.total_timesteps:
            fail(f"--resume: the checkpoint is at step {ckpt['step']}, already >= --total_timesteps "
                 f"{args.total_timesteps}; raise --total_timesteps to continue training")
    resume_dir = os.path.dirname(os.path.abspath(args.resume)) if args.resume else None
    if resume_dir and os.path.isfile(os.path.join(resume_dir, "config.json")) and args.run_name is None:
        run_dir = resume_dir
    else:
        run_name = args.run_name or f"{args.exp_name}__{args.algo}__{args.env_id}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
    os.makedirs(run_dir, exist_ok=True)
    write_json(asdict(args), os.path.join(run_dir, "config.json"))
    return run_dir, ckpt


def open_writer(run_dir, args: Args, data):
    """The run's TensorBoard writer, with the flags as a table and the data's expert and demonstration returns; with
    --track mirrored to Weights & Biases as CleanRL does (a resumed run continues its W&B run)."""
    from torch.utils.tensorboard import SummaryWriter  # imported late: keeps --help fast

    if args.track:  # before the writer: W&B mirrors the TensorBoard files written after init
        import wandb

        name = os.path.basename(os.path.normpath(run_dir))
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, config=asdict(args), name=name,
                   id=re.sub(r"[^\w.-]", "-", name)[-128:], resume="allow", dir=run_dir, sync_tensorboard=True)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters",
                    "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    if data is not None:
        writer.add_scalar("charts/expert_return", data["expert_return"], 0)
        writer.add_scalar("charts/demo_return", data["demo_return"], 0)
    return writer


def wall_s(ckpt, started):
    """Wall-clock seconds of the whole run (data, pre-training, SAC, evals), including those before any --resume."""
    return (0.0 if ckpt is None else ckpt.get("wall_s", 0.0)) + time.time() - started


def save_checkpoint(args, run_dir, step, agent, reward_net, reward_opt, sample_gen, rng, rb, best_eval, eval_history,
                    data_key, wall):
    state = dict(step=step, args=asdict(args), agent=agent.state_dict(), q_opt=agent.q_opt.state_dict(),
                 actor_opt=agent.actor_opt.state_dict(), alpha_opt=agent.alpha_opt.state_dict(),
                 torch_rng=torch.get_rng_state(), sample_rng=sample_gen.get_state(), np_rng=rng.bit_generator.state,
                 best_eval=best_eval, eval_history=list(eval_history), data_key=data_key, wall_s=wall)
    if reward_net is not None:
        state.update(reward_net=reward_net.state_dict(), reward_opt=reward_opt.state_dict())
    if args.save_buffer:  # buffer first: a checkpoint never points at a stale buffer
        atomic_save(dict(step=step, buffer=rb.state_dict()), os.path.join(run_dir, "replay.pt"))
    atomic_save(state, os.path.join(run_dir, "checkpoint.pt"))
    save_actor(agent.actor, args.env_id, os.path.join(run_dir, "actor.pt"), dict(step=step))


def restore(ckpt, args, agent, reward_net, reward_opt, sample_gen, rng, rb):
    """Load a checkpoint (and its replay.pt when it matches). Returns (step, best_eval, eval_history, buffer_loaded)."""
    agent.load_state_dict(ckpt["agent"])
    for name in ("q_opt", "actor_opt", "alpha_opt"):
        getattr(agent, name).load_state_dict(ckpt[name])
    if reward_net is not None:
        reward_net.load_state_dict(ckpt["reward_net"])
        reward_opt.load_state_dict(ckpt["reward_opt"])
    torch.set_rng_state(ckpt["torch_rng"])
    sample_gen.set_state(ckpt["sample_rng"])
    rng.bit_generator.state = ckpt["np_rng"]
    buffer_loaded = False
    rpath = os.path.join(os.path.dirname(args.resume), "replay.pt")
    if os.path.isfile(rpath):
        rstate = torch.load(rpath, weights_only=False)
        if rstate["step"] == ckpt["step"]:
            rb.load_state_dict(rstate["buffer"])
            buffer_loaded = True
    history = [tuple(x) for x in ckpt.get("eval_history", [])]  # checkpoints of older versions keep none
    return ckpt["step"], ckpt["best_eval"], history, buffer_loaded


def save_actor(actor, env_id, path, extra=None):
    atomic_save(dict(env_id=env_id, state_dict=actor.state_dict(), obs_dim=actor.fc1.in_features,
                     act_dim=actor.fc_mean.out_features, hidden=actor.fc1.out_features,
                     low=(actor.action_bias - actor.action_scale).tolist(),
                     high=(actor.action_bias + actor.action_scale).tolist(), **(extra or {})), path)


def load_actor(path):
    d = torch.load(path, map_location="cpu", weights_only=False)
    actor = Actor(d["obs_dim"], d["act_dim"], d["hidden"], d["low"], d["high"])
    actor.load_state_dict(d["state_dict"])
    return actor.eval()


def record_expert(args, actor, run_dir, step, quick_mean):
    """A new best: re-measure on fresh seeds (the max over evals is optimistic) and save the actor."""
    mean, std, _ = evaluate_policy(actor, args.env_id, 10, args.seed + 70_000 + step)
    save_actor(actor, args.env_id, os.path.join(run_dir, "actor_best.pt"), dict(step=step))
    print(f"step {step}: new best policy, fresh 10-episode return {mean:.1f} +- {std:.1f}")
    if not args.expert_out:
        return
    jpath = os.path.join(os.path.dirname(os.path.abspath(args.expert_out)), "returns.json")
    table = json.load(open(jpath)) if os.path.isfile(jpath) else {}
    name = os.path.basename(args.expert_out)
    shipped = table.get(name, {}).get("return_mean", -float("inf"))
    # a resumed run restarts its best-so-far from its last checkpoint: never replace a better shipped expert
    if os.path.isfile(args.expert_out) and mean <= shipped:
        print(f"step {step}: kept {args.expert_out} ({shipped:.1f} >= {mean:.1f})")
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.expert_out)), exist_ok=True)
    save_actor(actor, args.env_id, args.expert_out, dict(step=step))
    table[name] = dict(env_id=args.env_id, return_mean=round(mean, 1), return_std=round(std, 1), episodes=10,
                       train_steps=step, selection_eval_mean=round(quick_mean, 1), seed=args.seed,
                       command=f"python aihf_mujoco.py --algo sac --env_id {args.env_id} --seed {args.seed} "
                               f"--expert_out {args.expert_out}")
    write_json(table, jpath)


# ---- shared helpers: identical copies in every top-level script ----
def fail(message: str):
    """Bad input: one line on stderr that names the problem and the fix; exit code 2, as for tyro's own errors."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_track(args):
    """--track needs wandb (checked before anything is built or written)."""
    if args.track and importlib.util.find_spec("wandb") is None:
        fail("--track logs to Weights & Biases, and wandb is not installed; pip install wandb, or drop --track")


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


def progress_bar(total: int, desc: str, initial: int = 0):
    """A tqdm bar on a terminal, first process only (tqdm comes with transformers); the status lines carry the rest."""
    from tqdm.auto import tqdm

    hidden = not sys.stderr.isatty() or os.environ.get("RANK", "0") != "0"
    return tqdm(total=total, initial=initial, desc=desc, disable=hidden, dynamic_ncols=True, leave=False)


if __name__ == "__main__":
    main()

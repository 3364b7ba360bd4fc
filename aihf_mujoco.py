"""AIHF on MuJoCo: learn a reward and a SAC policy jointly from demonstrations AND preferences.

Li et al., "Learning Reward and Policy Jointly from Demonstration and Preference Improves Alignment"
(ICLR 2025, arXiv 2406.06874), MuJoCo experiments. The reward r_phi is the outer variable of a bilevel
problem; the inner problem is soft RL (SAC) on r_phi. Each iteration takes `--reward_steps` Adam steps on

    L(phi) = mean_{policy} r_phi(s,a) - mean_{demos} r_phi(s,a) - alpha * mean_{prefs} log sigma(R_phi(better) - R_phi(worse))

(alpha = `--pref_weight`, not SAC's entropy alpha; R_phi = sum of r_phi over a `--segment_len` segment; the
first two terms are the ML-IRL contrast, the last is Bradley-Terry), then runs `--sac_steps_per_iter` SAC env
steps on r_phi, relabelling every replayed transition with the *current* r_phi at sample time; the agent and the
replay buffer are never reset.
`--algo irl` is the same with alpha = 0 (ML-IRL, demos only); `--algo rlhf` is the paper's baseline:
behaviour cloning on the demos, a BT reward fitted on the preferences alone, then SAC on that fixed reward;
`--algo sac` trains on the true reward and is how the shipped experts in experts/ are made.
Demos are expert rollouts; preferences compare segments from a pool of policies of varied quality (the
expert with growing action noise), labelled by a Bradley-Terry teacher on the true segment return.

Speed (benchmarks/bench_sac.py): both critics are one batched ensemble, the actor's backward through the
critics skips critic weight grads, fused Adam, a preallocated buffer, no host reads between log steps;
`--bf16` also runs the matmuls in bfloat16 (opt-in).

    python aihf_mujoco.py --algo sac --env_id Hopper-v5 --total_timesteps 20000 --learning_starts 2000
    python aihf_mujoco.py --algo aihf --env_id Hopper-v5 --total_timesteps 1000000 --num_demos 10000 --num_prefs 20000
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
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
    threads: int = 1
    """torch CPU threads (1 is fastest per core for these small networks)"""
    env_id: str = "Hopper-v5"
    """gymnasium MuJoCo task: Hopper-v5, HalfCheetah-v5, Walker2d-v5"""
    algo: Literal["aihf", "rlhf", "irl", "sac"] = "aihf"
    """aihf: demos+prefs jointly; rlhf: BC then BT reward then SAC; irl: aihf with alpha 0; sac: true reward"""

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
    """train on episodes that never end early (gymnasium's terminate_when_unhealthy=False; ML-IRL's fixed-horizon
    envs): with a learned reward, a fall then neither ends a run of positive rewards nor escapes negative ones.
    Demonstrations, preferences and every evaluation use the standard env"""
    bf16: bool = False
    """run the SAC networks' matmuls in bfloat16 during updates (opt-in speed-up on CPUs with AVX512-BF16/AMX)"""

    # AIHF reward learning
    pref_weight: float = 1.0
    """alpha of the loss: weight of the preference (Bradley-Terry) term; --algo irl forces 0"""
    reward_input: Optional[Literal["state", "state_action"]] = None
    """reward features (default: state for HalfCheetah, state_action otherwise, as the paper)"""
    reward_lr: float = 1e-4
    """reward Adam learning rate (paper 1e-4)"""
    reward_wd: float = 1e-3
    """reward Adam weight decay (paper 1e-3)"""
    reward_steps: int = 1
    """reward gradient steps per AIHF iteration (paper 1; 10 did far better at 300k steps: README)"""
    sac_steps_per_iter: int = 5000
    """SAC env steps per AIHF iteration (paper 5000)"""
    policy_samples: int = 5000
    """most recent replay transitions used as the policy samples of the reward loss"""
    reward_batch_size: int = 10000
    """demo and policy transitions per reward step"""
    pref_batch_size: int = 256
    """preference pairs per reward step"""
    rlhf_reward_steps: int = 3000
    """rlhf: BT reward gradient steps on the preferences before SAC"""
    bc_steps: int = 10000
    """rlhf: behaviour-cloning steps (MSE on the actor's mean action) before SAC"""

    # data
    expert_path: Optional[str] = None
    """expert actor checkpoint (default: experts/{env_id}.pt)"""
    num_demos: int = 10000
    """expert transitions used as demonstrations (paper 10,000)"""
    demo_episodes: int = 20
    """at most this many expert episodes are rolled out to collect the demos"""
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
    checkpoint_every: int = 50000
    """write runs/<run>/checkpoint.pt (compact: nets, optimizers, RNG) every this many steps; 0 = never"""
    save_buffer: bool = True
    """also write the replay buffer (runs/<run>/replay.pt) with each checkpoint, for exact-ish resume"""
    resume: Optional[str] = None
    """resume from a checkpoint.pt (or a run folder holding one); without replay.pt the buffer is refilled"""
    expert_out: Optional[str] = None
    """on each new best eval, re-measure on fresh seeds and save the actor here (+ returns.json beside it)"""


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------
def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def resolve_and_validate(args: Args) -> Args:
    """Fill algorithm-dependent defaults and reject bad input before anything is written."""
    paper = args.algo != "sac"
    if args.batch_size is None:
        args.batch_size = 100 if paper else 256
    if args.policy_lr is None:
        args.policy_lr = 1e-3 if paper else 3e-4
    if args.autotune is None:
        args.autotune = not paper
    if args.reward_input is None:
        args.reward_input = "state" if args.env_id.startswith("HalfCheetah") else "state_action"
    if args.algo == "irl":  # ML-IRL: demonstrations alone
        args.pref_weight, args.num_prefs = 0.0, 0
    if args.expert_path is None:
        args.expert_path = f"experts/{args.env_id}.pt"
    for name in ["total_timesteps", "buffer_size", "batch_size", "policy_frequency", "target_network_frequency",
                 "eval_every", "eval_episodes", "log_every", "sac_steps_per_iter", "segment_len", "num_demos",
                 "demo_episodes", "threads", "hidden", "policy_samples", "reward_batch_size", "pref_batch_size",
                 "reward_steps"]:
        if getattr(args, name) <= 0:
            fail(f"--{name} must be > 0 (got {getattr(args, name)})")
    if args.learning_starts < 1 or args.learning_starts >= args.total_timesteps:
        fail(f"--learning_starts must be in [1, --total_timesteps) (got {args.learning_starts}); lower it")
    if args.buffer_size < args.policy_samples:
        fail("--buffer_size must be >= --policy_samples")
    if args.pref_noise < 0:
        fail("--pref_noise must be >= 0 (0 = noiseless teacher)")
    try:
        env = gym.make(args.env_id)
    except Exception as e:  # unknown id, missing mujoco, ...
        fail(f"cannot make env {args.env_id!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
             "use e.g. --env_id Hopper-v5")
    if args.fixed_horizon:  # checked on the env's constructor: making one with a bad option may write logs
        creator = gym.envs.registration.load_env_creator(env.spec.entry_point)
        if "terminate_when_unhealthy" not in inspect.signature(creator).parameters:
            fail(f"--fixed_horizon: {args.env_id} has no terminate_when_unhealthy option (its episodes never end "
                 "early anyway); drop --fixed_horizon")
    if not isinstance(env.action_space, gym.spaces.Box):
        fail(f"{args.env_id} has a {type(env.action_space).__name__} action space; SAC needs a continuous "
             "Box action space (use a MuJoCo task such as Hopper-v5)")
    if not (isinstance(env.observation_space, gym.spaces.Box) and len(env.observation_space.shape) == 1):
        fail(f"{args.env_id} needs a flat Box observation space")
    max_steps = env.spec.max_episode_steps or 1000
    env.close()
    if args.algo != "sac":
        if args.segment_len > max_steps:
            fail(f"--segment_len {args.segment_len} is longer than a {args.env_id} episode ({max_steps} "
                 f"steps); use --segment_len <= {max_steps}")
        if args.num_demos > args.demo_episodes * max_steps:
            fail(f"--num_demos {args.num_demos} exceeds what --demo_episodes {args.demo_episodes} expert episodes "
                 f"of at most {max_steps} steps allow; raise --demo_episodes or lower --num_demos")
        if args.algo in ("aihf", "rlhf") and args.num_prefs <= 0:
            fail(f"--algo {args.algo} needs --num_prefs > 0")
        if args.num_prefs > 0 and (not args.pool_noises or args.pool_steps < args.segment_len):
            fail("preferences need a segment pool: give --pool_noises and --pool_steps >= --segment_len")
        if not os.path.isfile(args.expert_path):
            fail(f"no expert checkpoint at {args.expert_path}; make one with: python aihf_mujoco.py --algo sac "
                 f"--env_id {args.env_id} --expert_out {args.expert_path}  (or pass --expert_path)")
    if args.resume is not None:
        ckpt = args.resume if args.resume.endswith(".pt") else os.path.join(args.resume, "checkpoint.pt")
        if not os.path.isfile(ckpt):
            fail(f"--resume: no checkpoint at {ckpt}; pass a checkpoint.pt or a run folder holding one")
        args.resume = ckpt
    return args


def make_train_env(args: Args):
    """The env SAC trains in; --fixed_horizon turns off early termination (evaluation never does)."""
    return gym.make(args.env_id, **(dict(terminate_when_unhealthy=False) if args.fixed_horizon else {}))


# ----------------------------------------------------------------------------------------------------------
# networks
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

    def sample(self, obs):
        """Reparameterised action and its log-probability (with the tanh change of variables)."""
        mean, log_std = self(obs)
        eps = torch.randn_like(mean)
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
        # the 1-wide output layer as multiply-and-sum: a batched matmul with one output column is ~6x slower
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


# ----------------------------------------------------------------------------------------------------------
# losses (small pure functions)
# ----------------------------------------------------------------------------------------------------------
def bt_loss(r_better, r_worse):
    """Bradley-Terry negative log-likelihood: -mean log sigma(R(better) - R(worse))."""
    return -F.logsigmoid(r_better - r_worse).mean()


def aihf_reward_loss(r_policy, r_demo, r_better, r_worse, pref_weight):
    """L(phi) = mean r(policy) - mean r(demo) - alpha * mean log sigma(R(better) - R(worse))."""
    loss = r_policy.mean() - r_demo.mean()
    if pref_weight != 0:
        loss = loss + pref_weight * bt_loss(r_better, r_worse)
    return loss


def bt_teacher_prob(ret_a, ret_b, temperature):
    """P(a preferred over b) of a Bradley-Terry teacher on true segment returns; temperature 0 = argmax."""
    ret_a, ret_b = np.asarray(ret_a, np.float64), np.asarray(ret_b, np.float64)
    if temperature == 0:
        return np.where(ret_a > ret_b, 1.0, np.where(ret_a < ret_b, 0.0, 0.5))
    return 1.0 / (1.0 + np.exp(-(ret_a - ret_b) / temperature))


def sac_critic_loss(q, target):
    """Sum over ensemble members of the mean squared TD error (= CleanRL's qf1_loss + qf2_loss)."""
    return (q - target.unsqueeze(0)).pow(2).mean(1).sum()


# ----------------------------------------------------------------------------------------------------------
# SAC agent and replay buffer
# ----------------------------------------------------------------------------------------------------------
class SAC(nn.Module):
    def __init__(self, obs_dim, act_dim, low, high, args: Args):
        super().__init__()
        self.actor = Actor(obs_dim, act_dim, args.hidden, low, high)
        self.qf = EnsembleQ(obs_dim + act_dim, args.hidden)
        self.qf_target = EnsembleQ(obs_dim + act_dim, args.hidden)
        self.qf_target.load_state_dict(self.qf.state_dict())
        self.qf_target.requires_grad_(False)
        self.gamma, self.tau, self.autotune = args.gamma, args.tau, args.autotune
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

    def update_critic(self, obs, act, rew, next_obs, done):
        alpha = self.alpha
        with torch.no_grad(), self.amp():
            next_act, next_logp = self.actor.sample(next_obs)
            q_next = self.qf_target(next_obs, next_act).min(0).values - alpha * next_logp
            target = rew + self.gamma * (1.0 - done) * q_next  # done = termination only: truncation bootstraps
        with self.amp():
            q = self.qf(obs, act)
        loss = sac_critic_loss(q, target)
        self.q_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.q_opt.step()
        return loss.detach(), q.detach()

    def update_actor(self, obs):
        with self.amp():
            act, logp = self.actor.sample(obs)
            # critic weights detached: the backward computes d/d(action) only, no wasted critic weight grads
            q = self.qf(obs, act, detach_params=True).min(0).values
        loss = (self.alpha * logp - q).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        alpha_loss = None
        if self.autotune:  # reuse this batch's log-probs (CleanRL draws a fresh no-grad sample; same expectation)
            alpha_loss = (-self.log_alpha.exp() * (logp.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()
        return loss.detach(), alpha_loss

    @torch.no_grad()
    def update_target(self):
        for p, tp in zip(self.qf.parameters(), self.qf_target.parameters()):
            tp.lerp_(p, self.tau)


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


def env_step(env, obs, action, rb):
    """One env step stored in rb. A single (non-vector) env reset by hand, so a stored transition never spans
    two episodes. done = terminated only: a time-limit truncation still bootstraps from the real final obs.
    Returns (obs for the next step, reward, episode_over, info)."""
    next_obs, reward, terminated, truncated, info = env.step(action)
    rb.add(obs, action, reward, next_obs, float(terminated))
    if terminated or truncated:
        next_obs, _ = env.reset()
    return next_obs, reward, terminated or truncated, info


# ----------------------------------------------------------------------------------------------------------
# data: expert rollouts -> demos; policy pool -> segments -> BT-labelled preferences (cached)
# ----------------------------------------------------------------------------------------------------------
def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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


@torch.no_grad()
def rollout(env, policy, steps=None, episodes=None, seed=0):
    """Run whole episodes (policy: obs batch -> action batch) until `steps` transitions or `episodes` episodes.
    Returns per-step arrays and episode ids/returns; the last episode is always complete."""
    obs_l, act_l, rew_l, ep_l, ep_returns = [], [], [], [], []
    obs, _ = env.reset(seed=seed)
    ep, ep_ret, n = 0, 0.0, 0
    while True:
        act = policy(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0].numpy()
        next_obs, r, term, trunc, _ = env.step(act)
        obs_l.append(obs), act_l.append(act), rew_l.append(r), ep_l.append(ep)
        ep_ret += r
        n += 1
        obs = next_obs
        if term or trunc:
            ep_returns.append(ep_ret)
            ep, ep_ret = ep + 1, 0.0
            if (steps is not None and n >= steps) or (episodes is not None and ep >= episodes):
                break
            obs, _ = env.reset()
    return (np.asarray(obs_l, np.float32), np.asarray(act_l, np.float32), np.asarray(rew_l, np.float32),
            np.asarray(ep_l), np.asarray(ep_returns))


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
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"{args.env_id}_{key}.pt")
    if os.path.isfile(path):
        return dict(torch.load(path, weights_only=False), key=key)
    expert = load_actor(args.expert_path)
    env = gym.make(args.env_id)
    rng = np.random.default_rng(args.seed)
    # demonstrations: deterministic expert episodes until num_demos transitions
    obs, act, rew, ep, ep_ret = rollout(env, expert.act_mean, steps=args.num_demos, seed=args.seed + 10_000)
    if len(ep_ret) > args.demo_episodes or len(obs) < args.num_demos:
        fail(f"the expert's {args.demo_episodes} episodes give fewer than --num_demos {args.num_demos} transitions "
             f"(its episodes last ~{len(obs) / max(len(ep_ret), 1):.0f} steps); raise --demo_episodes or lower "
             "--num_demos")
    data = dict(demo_obs=obs[:args.num_demos], demo_act=act[:args.num_demos],
                demo_return=float(ep_ret.mean()), demo_return_std=float(ep_ret.std()))
    # expert return on 10 separate episodes
    data["expert_return"], data["expert_return_std"] = evaluate(expert, args.env_id, 10, args.seed + 20_000)[:2]
    if args.num_prefs > 0:
        pool = dict(obs=[], act=[], rew=[], ep=[])
        for k, sigma in enumerate(args.pool_noises):
            gen = torch.Generator().manual_seed(args.seed * 100 + k)
            low, high = expert.action_bias - expert.action_scale, expert.action_bias + expert.action_scale

            def noisy(o, sigma=sigma, gen=gen):
                a = expert.act_mean(o)
                return (a + sigma * torch.randn(a.shape, generator=gen)).clamp(low, high)

            o, a, r, e, _ = rollout(env, noisy, steps=args.pool_steps, seed=args.seed + 30_000 + 1000 * k)
            offset = (pool["ep"][-1][-1] + 1) if pool["ep"] else 0
            for name, v in zip(("obs", "act", "rew", "ep"), (o, a, r, e + offset)):
                pool[name].append(v)
        pool = {k: np.concatenate(v) for k, v in pool.items()}
        starts = segment_starts(pool["ep"], args.segment_len)
        if len(starts) == 0:
            fail(f"no pool episode lasts --segment_len {args.segment_len} steps; lower --segment_len")
        a_idx, b_idx = rng.choice(starts, args.num_prefs), rng.choice(starts, args.num_prefs)
        csum = np.concatenate([[0.0], np.cumsum(pool["rew"], dtype=np.float64)])
        ret_a = csum[a_idx + args.segment_len] - csum[a_idx]
        ret_b = csum[b_idx + args.segment_len] - csum[b_idx]
        a_wins = label_preferences(ret_a, ret_b, args.pref_noise, rng)
        data.update(pool_obs=pool["obs"], pool_act=pool["act"],
                    better=np.where(a_wins, a_idx, b_idx), worse=np.where(a_wins, b_idx, a_idx),
                    pref_teacher_agreement=float(np.mean((ret_a >= ret_b) == a_wins)))
    env.close()
    os.makedirs(args.cache_dir, exist_ok=True)
    atomic_save(data, path)
    return dict(data, key=key)


# ----------------------------------------------------------------------------------------------------------
# evaluation and checkpoint helpers
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(actor, env_id, episodes, seed, reward_net=None, reward_input="state_action"):
    """Deterministic (mean-action) policy on the TRUE return; the episodes run side by side with one batched
    actor call per step. With reward_net: Pearson correlation of r_phi with the true reward on these rollouts."""
    envs = [gym.make(env_id) for _ in range(episodes)]
    obs = np.stack([e.reset(seed=seed + i)[0] for i, e in enumerate(envs)]).astype(np.float32)
    returns, alive = np.zeros(episodes), np.ones(episodes, bool)
    feats, true_r = [], []
    while alive.any():
        ids = np.flatnonzero(alive)
        o = torch.as_tensor(obs[ids])
        act = actor.act_mean(o)
        if reward_net is not None:
            feats.append(reward_features(o, act, reward_input))
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
    if reward_net is not None:
        learned = reward_net(torch.cat(feats)).numpy()
        if learned.std() > 0:
            corr = float(np.corrcoef(learned, np.asarray(true_r))[0, 1])
    return float(returns.mean()), float(returns.std()), corr


def main(args: Args):
    started = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)

    # ---- data (before any run folder exists: data errors leave nothing half-written) ----
    data = make_data(args) if args.algo != "sac" else None

    env = make_train_env(args)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    agent = SAC(obs_dim, act_dim, low, high, args)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim)
    sample_gen = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    learn_reward = args.algo in ("aihf", "irl")
    reward_net = reward_opt = None
    if args.algo != "sac":
        reward_net = RewardNet(obs_dim if args.reward_input == "state" else obs_dim + act_dim)
        reward_opt = torch.optim.Adam(reward_net.parameters(), lr=args.reward_lr, weight_decay=args.reward_wd)
        demo_obs, demo_act = torch.as_tensor(data["demo_obs"]), torch.as_tensor(data["demo_act"])
        if args.num_prefs > 0:
            pool_obs, pool_act = torch.as_tensor(data["pool_obs"]), torch.as_tensor(data["pool_act"])
            better, worse = torch.as_tensor(data["better"]), torch.as_tensor(data["worse"])
            seg_offsets = torch.arange(args.segment_len)

    def segment_return(starts):  # R_phi(segment) = sum of r_phi over its steps
        idx = starts.unsqueeze(1) + seg_offsets
        return reward_net(reward_features(pool_obs[idx], pool_act[idx], args.reward_input)).sum(1)

    def minibatch(n, size):  # indices of a random minibatch, or all n when size >= n (full batch)
        return torch.arange(n) if size >= n else torch.randint(n, (size,), generator=sample_gen)

    def pref_batch():
        i = torch.randint(len(better), (args.pref_batch_size,), generator=sample_gen)
        return segment_return(better[i]), segment_return(worse[i])

    # ---- run folder ----
    start_step, best_eval, resumed_buffer = 0, -float("inf"), False
    ckpt = None
    if args.resume:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
        # A resumed run may change how long it runs and what it logs; any other knob would splice two different
        # runs into one curve. The data flags are checked through the data key below, whose message names them.
        may_change = {"exp_name", "run_name", "threads", "total_timesteps", "buffer_size", "learning_starts",
                      "eval_every", "eval_episodes", "log_every", "checkpoint_every", "save_buffer", "resume",
                      "cache_dir", "expert_out"}
        if data is not None:
            may_change |= {"seed", "expert_path", "num_demos", "demo_episodes", "num_prefs", "segment_len",
                           "pref_noise", "pool_noises", "pool_steps"}
        for k, value in asdict(args).items():
            if k in may_change or k not in ckpt["args"]:  # a field newer than the checkpoint: nothing to compare
                continue
            saved = ckpt["args"][k]
            if saved != value:
                fail(f"--resume: checkpoint has --{k} {saved!r} but this command has {value!r}; "
                     "repeat the original command's flags")
        if data is not None and ckpt.get("data_key", data["key"]) != data["key"]:
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
    atomic_write_json(asdict(args), os.path.join(run_dir, "config.json"))
    from torch.utils.tensorboard import SummaryWriter  # imported late: keeps --help fast

    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    if data is not None:
        writer.add_scalar("charts/expert_return", data["expert_return"], 0)
        writer.add_scalar("charts/demo_return", data["demo_return"], 0)

    if ckpt is not None:
        agent.load_state_dict(ckpt["agent"])
        for name in ("q_opt", "actor_opt", "alpha_opt"):
            getattr(agent, name).load_state_dict(ckpt[name])
        if reward_net is not None:
            reward_net.load_state_dict(ckpt["reward_net"])
            reward_opt.load_state_dict(ckpt["reward_opt"])
        torch.set_rng_state(ckpt["torch_rng"])
        sample_gen.set_state(ckpt["sample_rng"])
        rng.bit_generator.state = ckpt["np_rng"]
        start_step, best_eval = ckpt["step"], ckpt["best_eval"]
        rpath = os.path.join(os.path.dirname(args.resume), "replay.pt")
        if os.path.isfile(rpath):
            rstate = torch.load(rpath, weights_only=False)
            if rstate["step"] == start_step:
                rb.load_state_dict(rstate["buffer"])
                resumed_buffer = True
        print(f"resumed at step {start_step} ({'with' if resumed_buffer else 'refilling'} the replay buffer)")
    elif args.algo == "rlhf":
        # ---- RLHF baseline, stage 1: behaviour cloning on the demos (MSE on the mean action) ----
        bc_opt = torch.optim.Adam(agent.actor.parameters(), lr=args.policy_lr)
        for i in range(args.bc_steps):
            j = torch.randint(len(demo_obs), (256,), generator=sample_gen)
            bc_loss = F.mse_loss(agent.actor.act_mean(demo_obs[j]), demo_act[j])
            bc_opt.zero_grad(set_to_none=True)
            bc_loss.backward()
            bc_opt.step()
            if i % args.log_every == 0 or i == args.bc_steps - 1:
                writer.add_scalar("losses/bc_loss", bc_loss.item(), i)
        # ---- stage 2: Bradley-Terry reward from the preferences alone ----
        for i in range(args.rlhf_reward_steps):
            r_b, r_w = pref_batch()
            loss = bt_loss(r_b, r_w)
            reward_opt.zero_grad(set_to_none=True)
            loss.backward()
            reward_opt.step()
            if i % args.log_every == 0 or i == args.rlhf_reward_steps - 1:
                writer.add_scalar("losses/reward_loss", loss.item(), i)
                writer.add_scalar("rewards/accuracies", (r_b > r_w).float().mean().item(), i)
        bc_ret, _, corr = evaluate(agent.actor, args.env_id, args.eval_episodes, args.seed + 50_000, reward_net,
                                   args.reward_input)
        writer.add_scalar("charts/bc_return", bc_ret, 0)
        writer.add_scalar("charts/reward_corr", corr, 0)
        print(f"rlhf: BC policy return {bc_ret:.1f}, BT reward correlation with true reward {corr:.3f}")

    def wall_s():
        """Wall-clock seconds of the whole run (data, pre-training stages, SAC, evals), over all its sessions."""
        return (0.0 if ckpt is None else ckpt.get("wall_s", 0.0)) + time.time() - started

    def checkpoint(step):
        state = dict(step=step, args=asdict(args), agent=agent.state_dict(), q_opt=agent.q_opt.state_dict(),
                     actor_opt=agent.actor_opt.state_dict(), alpha_opt=agent.alpha_opt.state_dict(),
                     torch_rng=torch.get_rng_state(), sample_rng=sample_gen.get_state(), np_rng=rng.bit_generator.state,
                     best_eval=best_eval, data_key=None if data is None else data["key"], wall_s=wall_s())
        if reward_net is not None:
            state.update(reward_net=reward_net.state_dict(), reward_opt=reward_opt.state_dict())
        if args.save_buffer:  # buffer first: a checkpoint never points at a stale buffer
            atomic_save(dict(step=step, buffer=rb.state_dict()), os.path.join(run_dir, "replay.pt"))
        atomic_save(state, os.path.join(run_dir, "checkpoint.pt"))
        save_actor(agent.actor, args.env_id, os.path.join(run_dir, "actor.pt"), dict(step=step))

    def record_expert(step, quick_mean):
        """A new best: re-measure on fresh seeds (the max over evals is optimistic) and save the actor."""
        mean, std, _ = evaluate(agent.actor, args.env_id, 10, args.seed + 70_000 + step)
        save_actor(agent.actor, args.env_id, os.path.join(run_dir, "actor_best.pt"), dict(step=step))
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
        save_actor(agent.actor, args.env_id, args.expert_out, dict(step=step))
        table[name] = dict(env_id=args.env_id, return_mean=round(mean, 1), return_std=round(std, 1), episodes=10,
                           train_steps=step, selection_eval_mean=round(quick_mean, 1), seed=args.seed,
                           command=f"python aihf_mujoco.py --algo sac --env_id {args.env_id} --seed {args.seed} "
                                   f"--expert_out {args.expert_out}")
        atomic_write_json(table, jpath)

    # ---- the loop: (AIHF/IRL) reward step(s) every sac_steps_per_iter, SAC every step ----
    obs, _ = env.reset(seed=args.seed + start_step)
    warm_actor = args.algo == "rlhf"  # rlhf warms up with its behaviour-cloned actor, the others act randomly
    update_from = start_step + (0 if (resumed_buffer or start_step == 0) else args.learning_starts)
    update_from = max(update_from, args.learning_starts)
    ep_ret, ep_len, last_eval = 0.0, 0, (float("nan"), float("nan"), float("nan"))
    t0, step0 = time.time(), start_step
    actor_loss = alpha_loss = None
    for global_step in range(start_step, args.total_timesteps):
        if learn_reward and global_step >= update_from and \
                (global_step - args.learning_starts) % args.sac_steps_per_iter == 0:
            pol_obs, pol_act = rb.recent(args.policy_samples)
            pol_f = reward_features(pol_obs, pol_act, args.reward_input)
            for _ in range(args.reward_steps):
                i, j = minibatch(len(pol_f), args.reward_batch_size), minibatch(len(demo_obs), args.reward_batch_size)
                r_pol = reward_net(pol_f[i])
                r_demo = reward_net(reward_features(demo_obs[j], demo_act[j], args.reward_input))
                r_b = r_w = None
                if args.pref_weight != 0:
                    r_b, r_w = pref_batch()
                loss = aihf_reward_loss(r_pol, r_demo, r_b, r_w, args.pref_weight)
                reward_opt.zero_grad(set_to_none=True)
                loss.backward()
                reward_opt.step()
            writer.add_scalar("losses/reward_loss", loss.item(), global_step)
            writer.add_scalar("rewards/demo_minus_policy", (r_demo.mean() - r_pol.mean()).item(), global_step)
            if r_b is not None:
                writer.add_scalar("rewards/accuracies", (r_b > r_w).float().mean().item(), global_step)

        # act
        if global_step < args.learning_starts and not warm_actor:
            action = rng.uniform(low, high).astype(np.float32)
        else:
            with torch.no_grad():
                action = agent.actor.sample(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0][0].numpy()
        prev_obs = obs
        obs, reward, episode_over, _ = env_step(env, prev_obs, action, rb)
        ep_ret += reward
        ep_len += 1
        if episode_over:
            writer.add_scalar("charts/episodic_return", ep_ret, global_step)
            writer.add_scalar("charts/episodic_length", ep_len, global_step)
            ep_ret, ep_len = 0.0, 0

        # SAC update on the true reward (sac) or on the current learned reward (relabelled at sample time)
        if global_step >= update_from:
            b_obs, b_act, b_rew, b_next, b_done = rb.sample(args.batch_size, sample_gen)
            if reward_net is not None:
                with torch.no_grad():
                    b_rew = reward_net(reward_features(b_obs, b_act, args.reward_input))
            qf_loss, q = agent.update_critic(b_obs, b_act, b_rew, b_next, b_done)
            if global_step % args.policy_frequency == 0:
                for _ in range(args.policy_frequency):
                    actor_loss, alpha_loss = agent.update_actor(b_obs)
            if global_step % args.target_network_frequency == 0:
                agent.update_target()
            if global_step % args.log_every == 0:
                writer.add_scalar("losses/qf_loss", qf_loss.item() / 2, global_step)
                writer.add_scalar("losses/qf1_values", q[0].mean().item(), global_step)
                writer.add_scalar("losses/qf2_values", q[1].mean().item(), global_step)
                if actor_loss is not None:
                    writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                writer.add_scalar("losses/alpha", agent.alpha.item(), global_step)
                if alpha_loss is not None:
                    writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
                writer.add_scalar("charts/SPS", int((global_step + 1 - step0) / (time.time() - t0)), global_step)

        step = global_step + 1
        if step % args.eval_every == 0 or step == args.total_timesteps:
            last_eval = evaluate(agent.actor, args.env_id, args.eval_episodes, args.seed + 40_000 + step, reward_net,
                                 args.reward_input)
            writer.add_scalar("charts/eval_return", last_eval[0], step)
            writer.add_scalar("charts/eval_return_std", last_eval[1], step)
            if reward_net is not None:
                writer.add_scalar("charts/reward_corr", last_eval[2], step)
            print(f"step {step}: eval return {last_eval[0]:.1f} +- {last_eval[1]:.1f}  "
                  f"SPS {int((step - step0) / (time.time() - t0))}", flush=True)
            if last_eval[0] > best_eval:
                best_eval = last_eval[0]
                record_expert(step, last_eval[0])
        if args.checkpoint_every and (step % args.checkpoint_every == 0 or step == args.total_timesteps):
            checkpoint(step)

    env.close()
    save_actor(agent.actor, args.env_id, os.path.join(run_dir, "actor.pt"), dict(step=args.total_timesteps))
    metrics = dict(algo=args.algo, task=args.env_id, seed=args.seed, steps=args.total_timesteps,
                   wall_s=round(wall_s(), 1), sps=round((args.total_timesteps - step0) / (time.time() - t0), 1),
                   eval_return_mean=last_eval[0], eval_return_std=last_eval[1], best_eval_return=best_eval,
                   reward_corr=None if reward_net is None else last_eval[2],
                   expert_return=None if data is None else data["expert_return"],
                   expert_return_std=None if data is None else data["expert_return_std"],
                   demo_return=None if data is None else data["demo_return"],
                   num_demos=None if data is None else args.num_demos,
                   num_prefs=None if data is None else args.num_prefs)
    atomic_write_json(metrics, os.path.join(run_dir, "metrics.json"))
    writer.close()
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main(resolve_and_validate(tyro.cli(Args, use_underscores=True)))

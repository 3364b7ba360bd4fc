"""What did a run's critic and reward learn, on the policy's own recent transitions?

Loads runs/<name>/checkpoint.pt and its replay.pt (written at the same step) and takes the last --rows transitions of
the replay buffer, the states the policy visited most recently. For each run it gives:
- the per-step reward the critic was trained on against the true reward (Pearson): the reward net's r(s,a) for
  aihf/irl/rlhf, IPL's implicit reward Q(s,a) - gamma (1 - terminated) V(s') for ipl;
- the critics' Q(s,a) (their mean) against the true discounted return-to-go of the same episode (Pearson), on the
  transitions whose return-to-go is known: episodes that ended in a fall, or more than 300 steps before a time-limit
  end (0.99^300 < 0.05);
- on Hopper/Walker2d, where a fall ends the episode: the mean reward and Q on the other transitions against those at
  the falls. With a value of 0 after a fall (no absorbing state), a critic that rates the fall above staying up
  would teach the actor to fall.
With --actions it instead scores each run's final actor (runs/<name>/actor.pt) on 10 episodes with its mean action (how
every evaluation in these tables is made), with sampled actions (how it acts while training), and with sampled
actions for the first 100 steps (--kick), then its mean action.
With --start it instead looks at the env's start states (where every evaluation begins, at rest): the actor's
pre-tanh mean |mu| and std there, the critics' Q of its mean action, and how much better any of 512 sampled actions
scores. A critic that is flat in the action there gives the actor no push to start moving.
With --pref_falls ENV_ID it instead counts how many of the preference pairs' segments end in a fall (the cached data of
the runs' default preferences, seed 1): what the labels can say about falling.

    python experiments/mujoco/critic_check.py hopper_ipl_s1 hopper_aihf_rec_s1 walker2d_ipl_s1
    python experiments/mujoco/critic_check.py --actions halfcheetah_ipl_s1 halfcheetah_aihf_rec_s1
    python experiments/mujoco/critic_check.py --start halfcheetah_ipl_s1 halfcheetah_aihf_rec_s1
    python experiments/mujoco/critic_check.py --pref_falls Hopper-v5
"""

import argparse
import os
import sys

import gymnasium as gym
import numpy as np
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
sys.path.insert(0, ROOT)
import aihf_mujoco as am  # noqa: E402


def load_run(name, rows):
    """The run's Args, its SAC agent and reward net (None for ipl) as checkpointed, and its last `rows` replay rows."""
    ckpt = torch.load(os.path.join(ROOT, "runs", name, "checkpoint.pt"), weights_only=False)
    replay = torch.load(os.path.join(ROOT, "runs", name, "replay.pt"), weights_only=False)
    if replay["step"] != ckpt["step"]:
        sys.exit(f"{name}: replay.pt is from step {replay['step']}, checkpoint.pt from {ckpt['step']}; run it again")
    args = am.Args(**{k: v for k, v in ckpt["args"].items() if k in am.Args.__dataclass_fields__})
    env = gym.make(args.env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    absorbing = args.termination == "absorbing"
    agent = am.SAC(obs_dim, act_dim, env.action_space.low, env.action_space.high, args, absorbing)
    agent.load_state_dict(ckpt["agent"])
    reward_net = None
    if "reward_net" in ckpt:
        reward_net = am.RewardNet(obs_dim + absorbing + (0 if args.reward_input == "state" else act_dim))
        reward_net.load_state_dict(ckpt["reward_net"])
    buf = replay["buffer"]
    last = slice(max(0, buf["size"] - rows), buf["size"])
    batch = {k: torch.as_tensor(buf[k][last]) for k in ("obs", "act", "rew", "next_obs", "done")}
    return ckpt["step"], args, agent, reward_net, batch, absorbing


def returns_to_go(rew, fell, episode_end, gamma, tail=300):
    """Discounted true return-to-go of each row of consecutive episodes, and where it is known (see the docstring)."""
    g, known = np.zeros(len(rew)), np.zeros(len(rew), bool)
    acc, ended_by_fall, since_end = 0.0, True, 0
    for i in range(len(rew) - 1, -1, -1):
        if episode_end[i]:
            acc, ended_by_fall, since_end = 0.0, bool(fell[i]), 0
        acc = rew[i] + gamma * acc
        g[i], known[i] = acc, ended_by_fall or since_end >= tail
        since_end += 1
    return g, known


@torch.no_grad()
def check(name, rows, seed=0):
    step, args, agent, reward_net, b, absorbing = load_run(name, rows)
    torch.manual_seed(seed)  # V(s') samples a' ~ pi
    q = agent.qf(b["obs"], b["act"]).mean(0)
    if reward_net is None:  # ipl: the implicit reward its critic loss is made of
        next_v = agent.reduce_q(agent.qf_target(b["next_obs"], agent.actor.sample(b["next_obs"])[0]))
        reward = am.ipl_implicit_reward(q, next_v, b["done"], args.gamma)
    else:
        reward = reward_net(am.reward_features(b["obs"], b["act"], args.reward_input)).reshape(-1)
    if absorbing:  # drop the absorbing state's own rows; a fall is the row that leads into it
        real = b["obs"][:, -1] == 0
        fell = (b["next_obs"][:, -1] == 1)[real]
        b = {k: (v[real][:, :-1] if k in ("obs", "next_obs") else v[real]) for k, v in b.items()}
        q, reward = q[real], reward[real]
    else:
        fell = b["done"] == 1
    obs, nxt = b["obs"].numpy(), b["next_obs"].numpy()
    episode_end = np.ones(len(obs), bool)  # a row ends an episode where the next row does not continue from it
    episode_end[:-1] = fell[:-1].numpy() | np.any(obs[1:] != nxt[:-1], axis=1)
    g, known = returns_to_go(b["rew"].numpy(), fell.numpy(), episode_end, args.gamma)
    corr = lambda x, y: float(np.corrcoef(x, y)[0, 1])  # noqa: E731
    up = ~fell
    out = dict(run=name, algo=args.algo, step=step, rows=len(obs), falls=int(fell.sum()),
               reward_corr=corr(reward.numpy(), b["rew"].numpy()), q_corr=corr(q.numpy()[known], g[known]),
               reward_up=float(reward[up].mean()), q_up=float(q[up].mean()))
    if fell.any():
        out.update(reward_fall=float(reward[fell].mean()), q_fall=float(q[fell].mean()))
    return out


@torch.no_grad()
def action_modes(name, episodes=10, seed=50_000, kick=100):
    """True returns per episode of the run's final actor: with its mean action, with sampled actions, and with sampled
    actions for the first `kick` steps, then its mean action (does the mean action hold a gait once it is moving?)."""
    path = os.path.join(ROOT, "runs", name, "actor.pt")
    actor, env = am.load_actor(path), gym.make(torch.load(path, weights_only=False)["env_id"])
    gen = torch.Generator().manual_seed(seed)
    sampled = lambda o: actor.sample(o, generator=gen)[0]  # noqa: E731
    out = {}
    for mode, sampled_steps in (("mean", 0), ("sampled", np.inf), (f"sampled for {kick} steps, then mean", kick)):
        returns = []
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            ret, over, t = 0.0, False, 0
            while not over:
                act = sampled if t < sampled_steps else actor.act_mean
                obs, r, term, trunc, _ = env.step(act(torch.as_tensor(obs, dtype=torch.float32)[None])[0].numpy())
                ret, over, t = ret + r, term or trunc, t + 1
            returns.append(ret)
        out[mode] = returns
    return out


@torch.no_grad()
def start_states(name, rows, episodes=10, seed=50_000, samples=512):
    """At the env's first observation of `episodes` episodes: the final actor's |mu| and std, Q of its mean action, the
    best of `samples` sampled actions' Q above it, and (for scale) Q on the last `rows` replay rows."""
    step, args, agent, _, b, absorbing = load_run(name, rows)
    env = gym.make(args.env_id)
    obs = torch.as_tensor(np.stack([env.reset(seed=seed + ep)[0] for ep in range(episodes)]), dtype=torch.float32)
    critic_obs = torch.cat([obs, torch.zeros(episodes, 1)], 1) if absorbing else obs  # the absorbing flag, 0
    mu, log_std = agent.actor(obs)
    q_mean = agent.qf(critic_obs, agent.actor.act_mean(obs)).mean(0).reshape(-1)
    sampled = agent.actor.sample(obs.repeat_interleave(samples, 0))[0]
    q_sampled = agent.qf(critic_obs.repeat_interleave(samples, 0), sampled).mean(0).reshape(episodes, samples)
    real = b["obs"][:, -1] == 0 if absorbing else slice(None)
    q_replay = agent.qf(b["obs"][real], b["act"][real]).mean(0)
    return dict(run=name, step=step, mu=float(mu.abs().mean()), std=float(log_std.exp().mean()),
                q_mean_action=float(q_mean.mean()), best_sampled_gain=float((q_sampled.max(1).values - q_mean).mean()),
                q_replay=float(q_replay.mean()))


def pref_falls(env_id, seed=1):
    """Fractions of the chosen and of the rejected segments that contain a fall."""
    args = am.validate_args(am.Args(algo="rlhf", env_id=env_id, seed=seed))
    data = am.make_data(args)
    fell = np.concatenate([[0], np.cumsum(data["pool_terminated"])])  # falls in [i, i + L) = fell[i + L] - fell[i]
    has_fall = lambda starts: float(np.mean(fell[starts + args.segment_len] - fell[starts] > 0))  # noqa: E731
    return has_fall(data["chosen"]), has_fall(data["rejected"])


def print_table(cols, rows):
    """A markdown table, one row per dict as it comes (floats to 2 decimals, missing cells empty)."""
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    for r in rows:
        cells = [r.get(c, "") for c in cols]
        print("| " + " | ".join(f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells) + " |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="run names under runs/ (each with checkpoint.pt and replay.pt)")
    p.add_argument("--rows", type=int, default=20000, help="the most recent replay transitions to score")
    p.add_argument("--actions", action="store_true", help="score the final actors, mean vs sampled actions, instead")
    p.add_argument("--kick", type=int, default=100, help="--actions: the sampled steps before the mean action")
    p.add_argument("--start", action="store_true", help="the critics and actors at the start states instead")
    p.add_argument("--pref_falls", metavar="ENV_ID", help="count the preference segments that end in a fall instead")
    a = p.parse_args()
    if a.actions:
        for name in a.runs:
            for mode, returns in action_modes(name, kick=a.kick).items():
                print(f"{name}, {mode} actions: mean {np.mean(returns):.0f}, per episode "
                      + " ".join(f"{r:.0f}" for r in returns), flush=True)
        return
    if a.pref_falls:
        chosen, rejected = pref_falls(a.pref_falls)
        print(f"{a.pref_falls}: {chosen:.2%} of the chosen and {rejected:.2%} of the rejected segments contain a fall")
        return
    if a.start:
        cols = ["run", "step", "mu", "std", "q_mean_action", "best_sampled_gain", "q_replay"]
        print_table(cols, (start_states(name, a.rows) for name in a.runs))
        return
    cols = ["run", "algo", "step", "falls", "reward_corr", "q_corr", "reward_up", "reward_fall", "q_up", "q_fall"]
    print_table(cols, (check(name, a.rows) for name in a.runs))


if __name__ == "__main__":
    main()

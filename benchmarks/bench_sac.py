"""SAC update throughput: aihf_mujoco.py's SAC vs a CleanRL-equivalent reference, side by side in one run (CPU).

The reference below re-implements the update of CleanRL's `sac_continuous_action.py` (two separate
SoftQNetwork modules + two targets, torch.distributions.Normal, plain Adam, critic every step, actor every
`policy_frequency` steps for `policy_frequency` updates each with an extra no-grad sample for the entropy
temperature, `.item()` of alpha, Polyak via `param.data` copies, and an SB3-style numpy replay buffer whose
samples are copied into new tensors). Same networks (256x256), batch 256, same hyper-parameters.
Rounds alternate (ref, ours, ref, ours, ...) so load from other processes hits both; the medians are reported.

    python benchmarks/bench_sac.py                      # updates/s and end-to-end env steps/s, 1 thread
    python benchmarks/bench_sac.py --num_threads 2 --rounds 5
"""

import argparse
import os
import platform
import statistics
import sys
import time

import gymnasium as gym
import mujoco
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import aihf_mujoco as ours  # noqa: E402

LOG_STD_MAX, LOG_STD_MIN = 2, -5


# ---------------------------------------------- CleanRL-equivalent reference ----------------------------------------
class RefQ(nn.Module):
    def __init__(self, obs_dim, act_dim):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(obs_dim + act_dim, 256), nn.Linear(256, 256), nn.Linear(256, 1)

    def forward(self, x, a):
        x = torch.cat([x, a], 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class RefActor(nn.Module):
    def __init__(self, obs_dim, act_dim, low, high):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(obs_dim, 256), nn.Linear(256, 256)
        self.fc_mean, self.fc_logstd = nn.Linear(256, act_dim), nn.Linear(256, act_dim)
        self.register_buffer("action_scale", torch.tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, x):
        x = F.relu(self.fc2(F.relu(self.fc1(x))))
        log_std = torch.tanh(self.fc_logstd(x))
        return self.fc_mean(x), LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (log_std + 1)

    def get_action(self, x):
        mean, log_std = self(x)
        normal = torch.distributions.Normal(mean, log_std.exp())
        x_t = normal.rsample()
        y_t = torch.tanh(x_t)
        action = y_t * self.action_scale + self.action_bias
        log_prob = normal.log_prob(x_t) - torch.log(self.action_scale * (1 - y_t.pow(2)) + 1e-6)
        return action, log_prob.sum(1, keepdim=True), torch.tanh(mean) * self.action_scale + self.action_bias


class RefSAC:
    def __init__(self, obs_dim, act_dim, low, high, capacity):
        self.actor = RefActor(obs_dim, act_dim, low, high)
        self.qf1, self.qf2 = RefQ(obs_dim, act_dim), RefQ(obs_dim, act_dim)
        self.qf1_t, self.qf2_t = RefQ(obs_dim, act_dim), RefQ(obs_dim, act_dim)
        self.qf1_t.load_state_dict(self.qf1.state_dict())
        self.qf2_t.load_state_dict(self.qf2.state_dict())
        self.q_opt = torch.optim.Adam(list(self.qf1.parameters()) + list(self.qf2.parameters()), lr=1e-3)
        self.actor_opt = torch.optim.Adam(list(self.actor.parameters()), lr=3e-4)
        self.target_entropy = -float(act_dim)
        self.log_alpha = torch.zeros(1, requires_grad=True)
        self.alpha = self.log_alpha.exp().item()
        self.a_opt = torch.optim.Adam([self.log_alpha], lr=1e-3)
        # SB3-style buffer: numpy storage, numpy indices, copied into fresh tensors on sampling
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.act = np.zeros((capacity, act_dim), np.float32)
        self.rew = np.zeros((capacity, 1), np.float32)
        self.done = np.zeros((capacity, 1), np.float32)
        self.size, self.ptr = 0, 0

    def add(self, o, a, r, o2, d):
        i = self.ptr
        self.obs[i], self.act[i], self.rew[i], self.next_obs[i], self.done[i] = o, a, r, o2, d
        self.ptr, self.size = (i + 1) % len(self.obs), min(self.size + 1, len(self.obs))

    def update(self, step, batch_size=256, gamma=0.99, tau=0.005, policy_frequency=2):
        idx = np.random.randint(0, self.size, size=batch_size)
        obs, act, rew, nobs, done = (torch.tensor(x[idx]) for x in (self.obs, self.act, self.rew, self.next_obs,
                                                                   self.done))
        with torch.no_grad():
            next_a, next_logp, _ = self.actor.get_action(nobs)
            min_q_next = torch.min(self.qf1_t(nobs, next_a), self.qf2_t(nobs, next_a)) - self.alpha * next_logp
            next_q = rew.flatten() + (1 - done.flatten()) * gamma * min_q_next.view(-1)
        qf1_a, qf2_a = self.qf1(obs, act).view(-1), self.qf2(obs, act).view(-1)
        qf_loss = F.mse_loss(qf1_a, next_q) + F.mse_loss(qf2_a, next_q)
        self.q_opt.zero_grad()
        qf_loss.backward()
        self.q_opt.step()
        if step % policy_frequency == 0:
            for _ in range(policy_frequency):
                pi, log_pi, _ = self.actor.get_action(obs)
                min_q_pi = torch.min(self.qf1(obs, pi), self.qf2(obs, pi))
                actor_loss = ((self.alpha * log_pi) - min_q_pi).mean()
                self.actor_opt.zero_grad()
                actor_loss.backward()
                self.actor_opt.step()
                with torch.no_grad():
                    _, log_pi, _ = self.actor.get_action(obs)
                alpha_loss = (-self.log_alpha.exp() * (log_pi + self.target_entropy)).mean()
                self.a_opt.zero_grad()
                alpha_loss.backward()
                self.a_opt.step()
                self.alpha = self.log_alpha.exp().item()
        for net, tgt in ((self.qf1, self.qf1_t), (self.qf2, self.qf2_t)):
            for p, tp in zip(net.parameters(), tgt.parameters()):
                tp.data.copy_(tau * p.data + (1 - tau) * tp.data)

    @torch.no_grad()
    def act_env(self, obs):
        return self.actor.get_action(torch.tensor(obs, dtype=torch.float32).unsqueeze(0))[0][0].numpy()


# ------------------------------------------------------- ours -------------------------------------------------------
class Ours:
    def __init__(self, obs_dim, act_dim, low, high, capacity, bf16=False):
        args = ours.Args(algo="sac", hidden=256, bf16=bf16)
        args.batch_size, args.policy_lr, args.autotune = 256, 3e-4, True
        self.args = args
        self.agent = ours.SAC(obs_dim, act_dim, low, high, args)
        self.rb = ours.ReplayBuffer(capacity, obs_dim, act_dim)
        self.gen = torch.Generator().manual_seed(0)

    def add(self, o, a, r, o2, d):
        self.rb.add(o, a, r, o2, d)

    def update(self, step):  # the body of the update block of aihf_mujoco.main, --algo sac
        a = self.args
        b_obs, b_act, b_rew, b_next, b_done = self.rb.sample(a.batch_size, self.gen)
        self.agent.update_critic(b_obs, b_act, b_rew, b_next, b_done)
        if step % a.policy_frequency == 0:
            for _ in range(a.policy_frequency):
                self.agent.update_actor(b_obs)
        if step % a.target_network_frequency == 0:
            self.agent.update_target()

    @torch.no_grad()
    def act_env(self, obs):
        return self.agent.actor.sample(torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0))[0][0].numpy()


def fill(impl, env_id, n):
    env = gym.make(env_id)
    obs, _ = env.reset(seed=0)
    for _ in range(n):
        a = env.action_space.sample()
        nobs, r, term, trunc, _ = env.step(a)
        impl.add(obs, a, r, nobs, float(term))
        obs = env.reset()[0] if term or trunc else nobs
    return env


def time_updates(impl, n, step0):
    t = time.perf_counter()
    for s in range(step0, step0 + n):
        impl.update(s)
    return n / (time.perf_counter() - t)


def time_end_to_end(impl, env, n, step0):
    """Act (stochastic actor, batch 1) + env.step + store + one SAC update per env step."""
    obs, _ = env.reset(seed=1)
    t = time.perf_counter()
    for s in range(step0, step0 + n):
        a = impl.act_env(obs)
        nobs, r, term, trunc, _ = env.step(a)
        impl.add(obs, a, r, nobs, float(term))
        obs = env.reset()[0] if term or trunc else nobs
        impl.update(s)
    return n / (time.perf_counter() - t)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env_id", default="Hopper-v5")
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per implementation")
    p.add_argument("--updates", type=int, default=300, help="timed updates per round")
    p.add_argument("--env_steps", type=int, default=300, help="timed end-to-end env steps per round (0: skip)")
    p.add_argument("--bf16", action="store_true", help="also time aihf_mujoco.py --bf16")
    a = p.parse_args()
    torch.set_num_threads(a.num_threads)
    torch.manual_seed(0)
    np.random.seed(0)
    env = gym.make(a.env_id)
    od, ad = env.observation_space.shape[0], env.action_space.shape[0]
    low, high = env.action_space.low, env.action_space.high
    impls = {"CleanRL-equivalent": RefSAC(od, ad, low, high, 100_000), "aihf_mujoco.py": Ours(od, ad, low, high, 100_000)}
    if a.bf16:
        impls["aihf_mujoco.py --bf16"] = Ours(od, ad, low, high, 100_000, bf16=True)
    envs = {k: fill(v, a.env_id, 5000) for k, v in impls.items()}
    for k, v in impls.items():  # warm-up (allocator, first-call costs)
        time_updates(v, 30, 0)
    ups = {k: [] for k in impls}
    e2e = {k: [] for k in impls}
    step = 30
    for _ in range(a.rounds):
        for k, v in impls.items():
            ups[k].append(time_updates(v, a.updates, step))
            if a.env_steps:
                e2e[k].append(time_end_to_end(v, envs[k], a.env_steps, step))
        step += a.updates + a.env_steps
    ref = "CleanRL-equivalent"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.processor())
    print(f"command: python {' '.join(sys.argv)}")
    print(f"machine: {cpu}, {os.cpu_count()} cores visible, torch threads {a.num_threads}; python {platform.python_version()}, "
          f"torch {torch.__version__}, gymnasium {gym.__version__}, mujoco {mujoco.__version__}")
    print(f"{a.env_id}, nets 256x256, batch 256, policy_frequency 2, autotune; median of {a.rounds} alternating rounds\n")
    print("| implementation | SAC updates/s | ratio | end-to-end env steps/s (1 update/step) | ratio |")
    print("|---|---|---|---|---|")
    for k in impls:
        u, r = statistics.median(ups[k]), statistics.median(ups[k]) / statistics.median(ups[ref])
        if a.env_steps:
            e, er = statistics.median(e2e[k]), statistics.median(e2e[k]) / statistics.median(e2e[ref])
            print(f"| {k} | {u:.0f} | {r:.2f}x | {e:.0f} | {er:.2f}x |")
        else:
            print(f"| {k} | {u:.0f} | {r:.2f}x | - | - |")


if __name__ == "__main__":
    main()

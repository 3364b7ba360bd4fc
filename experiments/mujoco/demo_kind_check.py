"""Does the kind of demonstration teach AIHF's reward to detect action noise?

The ML-IRL contrast (aihf_mujoco.irl_contrast) pushes a reward up on demonstrations and down on the policy's own
samples, which SAC draws with exploration noise. With demos of the expert's deterministic (mean) actions, the reward
could learn to tell mean-action states from noisy ones instead of good states from bad ones. Offline check: the
"policy" is the expert itself with sampled actions; the reward is trained for 600 steps (what 10 reward steps per
5,000 SAC steps give over 300k) against mean-action demos or sampled-action demos, and then scored on held-out
mean-action and sampled-action rollouts. An untrained reward is the control.

    python experiments/mujoco/demo_kind_check.py --env_id Walker2d-v5
"""

import argparse
import os
import sys

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import aihf_mujoco as am  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env_id", default="Walker2d-v5")
    p.add_argument("--steps", type=int, default=600, help="reward Adam steps (lr 1e-4, wd 1e-3, as aihf_mujoco.py)")
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(1)
    expert = am.load_actor(os.path.join(os.path.dirname(am.__file__), "experts", f"{a.env_id}.pt"))
    env = gym.make(a.env_id)

    def rollouts(kind, seed, n):
        gen = torch.Generator().manual_seed(seed)
        policy = expert.act_mean if kind == "mean" else (lambda o: expert.sample(o, generator=gen)[0])
        data, returns = am.rollout(env, policy, steps=n, seed=seed)
        return torch.as_tensor(data["obs"][:n]), torch.as_tensor(data["act"][:n]), float(returns.mean())

    policy = rollouts("sample", 500, 10000)  # stands in for the policy's own (noisy) samples
    demos = {kind: rollouts(kind, 600, 10000) for kind in ("mean", "sample")}
    held_out = {kind: rollouts(kind, 700, 5000) for kind in ("mean", "sample")}
    print(f"{a.env_id}: returns of the rollouts: 'policy' (sampled actions) {policy[2]:.0f}, mean-action demos "
          f"{demos['mean'][2]:.0f}, sampled-action demos {demos['sample'][2]:.0f}")
    print("| reward input | trained against | r(mean-action states) - r(sampled-action states), per step |")
    print("|---|---|---|")
    for features in ("state_action", "state"):
        feats = (lambda o, act: torch.cat([o, act], 1)) if features == "state_action" else (lambda o, act: o)
        for kind in ("untrained", "mean", "sample"):
            gaps = []
            for seed in range(a.seeds):
                torch.manual_seed(seed)
                net = am.RewardNet(feats(*policy[:2]).shape[1])
                opt = torch.optim.Adam(net.parameters(), lr=1e-4, weight_decay=1e-3)
                if kind != "untrained":
                    pol, dem = feats(*policy[:2]), feats(*demos[kind][:2])
                    for _ in range(a.steps):
                        i, j = torch.randint(len(pol), (10000,)), torch.randint(len(dem), (10000,))
                        am.adam_step(opt, am.irl_contrast(net(pol[i]), net(dem[j])))
                with torch.no_grad():
                    gaps.append(net(feats(*held_out["mean"][:2])).mean().item()
                                - net(feats(*held_out["sample"][:2])).mean().item())
            label = {"untrained": "nothing (untrained)", "mean": "mean-action demos", "sample": "sampled-action demos"}
            print(f"| {features} | {label[kind]} | {np.mean(gaps):+.2f} (seeds {', '.join(f'{g:+.2f}' for g in gaps)}) |")


if __name__ == "__main__":
    main()

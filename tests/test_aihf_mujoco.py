"""Tests for aihf_mujoco.py: math against hand-written references, env-boundary handling on a crafted env,
Bradley-Terry labelling, and subprocess smoke runs of every --algo that really train, plus the bad-input errors.
A tiny expert is trained here (a ~1k-step SAC run) so nothing depends on a long run."""

import json
import math
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "aihf_mujoco.py")
sys.path.insert(0, ROOT)
import aihf_mujoco as am  # noqa: E402

TINY = ["--hidden", "32", "--batch_size", "32", "--eval_episodes", "2", "--threads", "1"]


def run(args, cwd, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(cwd, run_name):
    with open(os.path.join(cwd, "runs", run_name, "metrics.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("aihf_mujoco")


@pytest.fixture(scope="module")
def tiny_expert(workdir):
    """SAC smoke run that really trains (learning_starts < total_timesteps); its actor is the tests' expert."""
    run(["--algo", "sac", "--total_timesteps", "1200", "--learning_starts", "400", "--eval_every", "600",
         "--checkpoint_every", "600", "--run_name", "sac", *TINY], workdir)
    return workdir / "runs" / "sac"


# ------------------------------------------------------------------ smoke runs --------------------------------------
def test_sac_smoke_trains_and_writes_metrics(tiny_expert):
    m = json.loads((tiny_expert / "metrics.json").read_text())
    for k in ("algo", "task", "seed", "steps", "wall_s", "eval_return_mean", "eval_return_std", "expert_return"):
        assert k in m
    assert m["algo"] == "sac" and m["task"] == "Hopper-v5" and m["steps"] == 1200
    assert math.isfinite(m["eval_return_mean"]) and m["eval_return_std"] >= 0
    config = json.loads((tiny_expert / "config.json").read_text())
    assert config["learning_starts"] < config["total_timesteps"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tiny_expert))
    # updates really happened: the saved actor differs from a fresh seed-1 initialisation
    env = gym.make("Hopper-v5")
    torch.manual_seed(1)
    fresh = am.Actor(11, 3, 32, env.action_space.low, env.action_space.high)
    trained = am.load_actor(tiny_expert / "actor.pt")
    assert not torch.equal(fresh.fc1.weight, trained.fc1.weight)


def test_sac_deterministic_and_resume(tiny_expert, workdir):
    """Same seed, same command -> same result; --resume continues a run from its checkpoint."""
    common = ["--algo", "sac", "--total_timesteps", "1200", "--learning_starts", "400", "--eval_every", "600",
              "--checkpoint_every", "600", *TINY]
    run([*common, "--run_name", "sac_again"], workdir)
    assert metrics(workdir, "sac_again")["eval_return_mean"] == metrics(workdir, "sac")["eval_return_mean"]
    ckpt_path = workdir / "runs" / "sac_again" / "checkpoint.pt"
    first = torch.load(ckpt_path, weights_only=False)
    assert first["step"] == 1200 and first["wall_s"] > 0
    p = run([*common, "--total_timesteps", "1800", "--resume", str(ckpt_path)], workdir)
    assert "resumed at step 1200 (with the replay buffer)" in p.stdout
    m = metrics(workdir, "sac_again")  # resumed into the same run folder
    assert m["steps"] == 1800 and math.isfinite(m["eval_return_mean"])
    assert m["wall_s"] > first["wall_s"]  # the whole run's time, its first session included
    # a finished run resumed without a larger --total_timesteps: refused, metrics.json left as it was
    p = run([*common, "--total_timesteps", "1800", "--resume", str(ckpt_path)], workdir, check=False)
    assert p.returncode != 0 and "raise --total_timesteps" in p.stderr
    assert metrics(workdir, "sac_again") == m
    # another training knob on resume would splice two runs into one curve: refused, before anything is written
    p = run([*common, "--total_timesteps", "2400", "--q_lr", "3e-4", "--resume", str(ckpt_path)], workdir, check=False)
    assert p.returncode != 0 and "checkpoint has --q_lr 0.001" in p.stderr, p.stderr
    assert metrics(workdir, "sac_again") == m
    # cross-session resume: the compact checkpoint alone (no replay.pt beside it) refills the buffer first
    compact = workdir / "compact"
    compact.mkdir()
    (compact / "trainer.pt").write_bytes(ckpt_path.read_bytes())
    p = run([*common, "--total_timesteps", "2000", "--learning_starts", "100", "--resume", str(compact / "trainer.pt"),
             "--run_name", "cont"], workdir)  # refill 100 steps with the restored actor, then 100 updates
    assert "resumed at step 1800 (refilling the replay buffer)" in p.stdout
    assert metrics(workdir, "cont")["steps"] == 2000


def test_expert_out_never_replaced_by_a_worse_policy(workdir):
    """--expert_out saves each new best with its fresh return in returns.json, but a later (e.g. resumed) run
    whose best is below the shipped expert's return leaves the expert alone."""
    out = workdir / "experts_out" / "Hopper-v5.pt"
    common = ["--algo", "sac", "--total_timesteps", "600", "--learning_starts", "300", "--eval_every", "300",
              "--checkpoint_every", "0", "--expert_out", str(out), *TINY]
    run([*common, "--run_name", "expert_a"], workdir)
    table = json.loads((out.parent / "returns.json").read_text())
    entry = table["Hopper-v5.pt"]
    assert entry["env_id"] == "Hopper-v5" and entry["train_steps"] in (300, 600) and entry["episodes"] == 10
    saved = out.read_bytes()
    entry["return_mean"] = 1e9  # pretend the shipped expert is far better
    (out.parent / "returns.json").write_text(json.dumps(table))
    p = run([*common, "--run_name", "expert_b", "--seed", "2"], workdir)
    assert "kept" in p.stdout and out.read_bytes() == saved
    assert json.loads((out.parent / "returns.json").read_text())["Hopper-v5.pt"]["return_mean"] == 1e9


def data_args(expert, workdir):
    return ["--expert_path", str(expert / "actor.pt"), "--cache_dir", str(workdir / "cache"), "--num_demos", "600",
            "--demo_episodes", "100", "--num_prefs", "300", "--pool_steps", "600", "--pool_noises", "0.0", "0.5",
            "--segment_len", "10"]


def test_rlhf_smoke(tiny_expert, workdir):
    run(["--algo", "rlhf", "--total_timesteps", "800", "--learning_starts", "300", "--eval_every", "800",
         "--bc_steps", "100", "--rlhf_reward_steps", "100", "--run_name", "rlhf", *TINY,
         *data_args(tiny_expert, workdir)], workdir)
    m = metrics(workdir, "rlhf")
    assert m["algo"] == "rlhf" and m["steps"] == 800 and m["num_prefs"] == 300
    for k in ("eval_return_mean", "expert_return", "demo_return", "reward_corr"):
        assert math.isfinite(m[k]), k


def test_aihf_smoke_and_data_cache(tiny_expert, workdir):
    run(["--algo", "aihf", "--total_timesteps", "900", "--learning_starts", "300", "--sac_steps_per_iter", "200",
         "--eval_every", "900", "--run_name", "aihf", *TINY, *data_args(tiny_expert, workdir)], workdir)
    m = metrics(workdir, "aihf")
    assert m["algo"] == "aihf" and m["steps"] == 900 and math.isfinite(m["reward_corr"])
    cached = list((workdir / "cache").iterdir())
    assert len(cached) == 1  # rlhf and aihf with the same data arguments share one cache file
    data = torch.load(cached[0], weights_only=False)
    assert len(data["demo_obs"]) == 600 and len(data["better"]) == 300
    assert data["pref_teacher_agreement"] == 1.0  # noiseless teacher
    # resuming with other data (here another seed) would train the old reward on new demos: refused
    p = run(["--algo", "aihf", "--total_timesteps", "1200", "--learning_starts", "300", "--sac_steps_per_iter", "200",
             "--seed", "2", "--resume", str(workdir / "runs" / "aihf"), *TINY, *data_args(tiny_expert, workdir)],
            workdir, check=False)
    assert p.returncode != 0 and "differ from the checkpoint" in p.stderr, p.stderr
    assert metrics(workdir, "aihf")["steps"] == 900  # the finished run is untouched


# ------------------------------------------------------------------ bad input ---------------------------------------
BAD_INPUTS = [
    (["--env_id", "CartPole-v1"], "Box action space"),
    (["--num_demos", "5000", "--demo_episodes", "2"], "--num_demos"),
    (["--segment_len", "1001"], "--segment_len"),
    (["--expert_path", "nowhere/none.pt"], "python aihf_mujoco.py --algo sac"),
    (["--reward_steps", "0"], "--reward_steps"),
    (["--env_id", "HalfCheetah-v5", "--fixed_horizon"], "--fixed_horizon"),
]


def test_bad_input_cli_fails_fast_and_writes_nothing(tiny_expert, tmp_path):
    """The real CLI: one-line error, exit code != 0, nothing written."""
    extra, needle = BAD_INPUTS[0]
    p = run(["--algo", "aihf", "--expert_path", str(tiny_expert / "actor.pt"), "--cache_dir", str(tmp_path / "c"),
             *extra], tmp_path, check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
    assert os.listdir(tmp_path) == []  # no runs/, no cache


@pytest.mark.parametrize("extra, needle", BAD_INPUTS[1:])
def test_bad_input_rejected_before_anything_is_written(tiny_expert, tmp_path, monkeypatch, capsys, extra, needle):
    """The same validation in-process (fast): SystemExit != 0 from resolve_and_validate, one stderr line."""
    import tyro

    monkeypatch.chdir(tmp_path)
    argv = ["--algo", "aihf", "--expert_path", str(tiny_expert / "actor.pt"), "--cache_dir", str(tmp_path / "c"), *extra]
    with pytest.raises(SystemExit) as e:
        am.resolve_and_validate(tyro.cli(am.Args, args=argv, use_underscores=True))
    assert e.value.code not in (0, None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    # MuJoCo itself logs a model deprecation warning of HalfCheetah to ./MUJOCO_LOG.TXT; nothing of ours is written
    assert [f for f in os.listdir(tmp_path) if f != "MUJOCO_LOG.TXT"] == []


def test_help_is_fast():
    p = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 0 and "--total_timesteps" in p.stdout and "--pref_noise" in p.stdout


# ------------------------------------------------------------------ env boundaries ------------------------------------
class Tiny(gym.Env):
    """obs = [episode id, t]; odd episodes terminate at t == 3; a TimeLimit of 5 truncates the even ones."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Box(-1, 1, (1,), np.float32)

    def __init__(self):
        self.episode = -1

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.t = 0
        return np.array([self.episode, 0], np.float32), {}

    def step(self, action):
        self.t += 1
        terminated = self.episode % 2 == 1 and self.t == 3
        return np.array([self.episode, self.t], np.float32), float(self.t), terminated, False, {}


def test_env_step_never_crosses_episode_boundary():
    env = gym.wrappers.TimeLimit(Tiny(), max_episode_steps=5)
    rb = am.ReplayBuffer(100, 2, 1)
    obs, _ = env.reset(seed=0)
    ends = 0
    for _ in range(40):
        obs, _, over, _ = am.env_step(env, obs, np.zeros(1, np.float32), rb)
        ends += over
    o, o2, d = rb.np["obs"][:40], rb.np["next_obs"][:40], rb.np["done"][:40]
    assert ends > 4
    assert np.all(o[:, 0] == o2[:, 0])  # every stored transition stays inside one episode
    assert np.all(o2[:, 1] == o[:, 1] + 1)  # next_obs is the real successor, also at the last step
    terminal = (o2[:, 0] % 2 == 1) & (o2[:, 1] == 3)
    truncated = (o2[:, 0] % 2 == 0) & (o2[:, 1] == 5)
    assert terminal.any() and truncated.any()
    np.testing.assert_array_equal(d, terminal.astype(np.float32))  # done only on termination, not truncation
    # the observation after each episode end is a fresh episode's first observation
    starts = np.flatnonzero(terminal | truncated) + 1
    starts = starts[starts < 40]
    assert np.all(o[starts, 1] == 0) and np.all(o[starts, 0] == o[starts - 1, 0] + 1)


@pytest.mark.parametrize("new_capacity", [10, 25, 6])
def test_replay_buffer_state_survives_a_capacity_change(new_capacity):
    """A wrapped buffer saved and loaded into another capacity (a resumed run with a larger --total_timesteps
    gets a larger buffer) keeps its transitions in order: recent() still returns the newest ones."""
    rb = am.ReplayBuffer(10, 1, 1)
    for t in range(23):  # wraps twice; ptr ends at 3
        rb.add(np.array([t], np.float32), np.zeros(1, np.float32), float(t), np.array([t + 1], np.float32), 0.0)
    new = am.ReplayBuffer(new_capacity, 1, 1)
    new.load_state_dict(rb.state_dict())
    kept = min(10, new_capacity)
    assert new.size == kept
    np.testing.assert_array_equal(np.sort(new.np["rew"][:new.size]), np.arange(23 - kept, 23))
    obs, _ = new.recent(4)
    np.testing.assert_array_equal(obs[:, 0].numpy(), [19, 20, 21, 22])
    new.add(np.array([23], np.float32), np.zeros(1, np.float32), 23.0, np.array([24], np.float32), 0.0)
    np.testing.assert_array_equal(new.recent(2)[0][:, 0].numpy(), [22, 23])


def test_fixed_horizon_training_env_never_terminates():
    """Random actions topple Hopper within ~100 steps; with --fixed_horizon the training env runs on to the
    time limit, while the standard env (evaluation, data) still terminates."""
    def first_end(env):
        env.reset(seed=0)
        env.action_space.seed(0)
        for t in range(1000):
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            if terminated or truncated:
                return t + 1, terminated
    steps, terminated = first_end(am.make_train_env(am.Args(env_id="Hopper-v5")))
    assert terminated and steps < 300
    assert first_end(am.make_train_env(am.Args(env_id="Hopper-v5", fixed_horizon=True))) == (1000, False)


def test_segments_stay_inside_episodes():
    ep = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
    starts = am.segment_starts(ep, 4)
    np.testing.assert_array_equal(starts, [3, 7, 8])
    assert len(am.segment_starts(ep, 6)) == 0


# ------------------------------------------------------------------ math ---------------------------------------------
def test_bt_teacher_labels():
    ra, rb = np.array([3.0, 1.0, 5.0, 2.0]), np.array([1.0, 4.0, 5.0, -1.0])
    p0 = am.bt_teacher_prob(ra, rb, 0.0)
    np.testing.assert_array_equal(p0, [1.0, 0.0, 0.5, 1.0])  # noiseless: the higher return wins
    labels = am.label_preferences(ra[[0, 1, 3]], rb[[0, 1, 3]], 0.0, np.random.default_rng(0))
    np.testing.assert_array_equal(labels, [True, False, True])
    T = 2.0
    expected = [1 / (1 + math.exp(-(a - b) / T)) for a, b in zip(ra, rb)]
    np.testing.assert_allclose(am.bt_teacher_prob(ra, rb, T), expected, rtol=1e-12)
    # the noisy teacher's empirical label frequency follows sigma((R_a - R_b) / T)
    n = 20000
    freq = am.label_preferences(np.full(n, 1.0), np.zeros(n), T, np.random.default_rng(1)).mean()
    assert abs(freq - 1 / (1 + math.exp(-0.5))) < 0.015


def test_aihf_reward_loss_matches_formula():
    r_pol, r_demo = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, -1.0])
    r_b, r_w = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.5])
    alpha = 0.7
    log_sig = [math.log(1 / (1 + math.exp(-(2.0 - 1.0)))), math.log(1 / (1 + math.exp(-(0.0 - 1.5))))]
    expected = (3.5 / 3) - (2.0 / 2) - alpha * sum(log_sig) / 2
    assert am.aihf_reward_loss(r_pol, r_demo, r_b, r_w, alpha).item() == pytest.approx(expected, rel=1e-6)
    assert am.aihf_reward_loss(r_pol, r_demo, None, None, 0.0).item() == pytest.approx(3.5 / 3 - 1.0, rel=1e-6)
    assert am.bt_loss(r_b, r_w).item() == pytest.approx(-sum(log_sig) / 2, rel=1e-6)


def test_reward_net_clamped():
    net = am.RewardNet(3)
    with torch.no_grad():
        net.net[-1].bias.fill_(50.0)
    assert torch.all(net(torch.randn(5, 3)) == 10.0)


def test_ensemble_q_equals_two_separate_mlps():
    torch.manual_seed(0)
    q = am.EnsembleQ(5, 16)
    obs, act = torch.randn(7, 3), torch.randn(7, 2)
    x = torch.cat([obs, act], 1)
    for i in range(2):
        (w1, w2, w3), (b1, b2, b3) = q.ws, q.bs
        h = F.relu(x @ w1[i] + b1[i])
        h = F.relu(h @ w2[i] + b2[i])
        ref = (h @ w3[i] + b3[i]).squeeze(-1)
        torch.testing.assert_close(q(obs, act)[i], ref)
    target = torch.randn(7)
    qv = q(obs, act)
    naive = F.mse_loss(qv[0], target) + F.mse_loss(qv[1], target)
    torch.testing.assert_close(am.sac_critic_loss(qv, target), naive)
    # detach_params: gradient reaches the action, not the critic weights
    a = act.clone().requires_grad_(True)
    q(obs, a, detach_params=True).sum().backward()
    assert a.grad is not None and all(p.grad is None for p in q.parameters())


def test_actor_log_prob_matches_tanh_normal():
    torch.manual_seed(0)
    low, high = np.array([-2.0, -1.0]), np.array([2.0, 3.0])
    actor = am.Actor(4, 2, 16, low, high)
    obs = torch.randn(6, 4)
    torch.manual_seed(5)
    act, logp = actor.sample(obs)
    torch.manual_seed(5)
    mean, log_std = actor(obs)
    normal = torch.distributions.Normal(mean, log_std.exp())
    u = normal.rsample()
    y = torch.tanh(u)
    ref_logp = (normal.log_prob(u) - torch.log(actor.action_scale * (1 - y.pow(2)))).sum(1)
    torch.testing.assert_close(act, y * actor.action_scale + actor.action_bias)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-4, atol=1e-4)


def test_bf16_updates_stay_close_to_fp32():
    """--bf16 only lowers the matmul precision: Q-values and log-probs stay fp32 and near the fp32 ones."""
    torch.manual_seed(0)
    args = am.Args(algo="sac", hidden=64, bf16=True)
    args.policy_lr, args.autotune = 3e-4, True
    agent = am.SAC(5, 2, np.array([-1.0, -1.0]), np.array([1.0, 1.0]), args)
    obs, act = torch.randn(32, 5), torch.rand(32, 2) * 2 - 1
    with agent.amp():
        q16 = agent.qf(obs, act)
        mean16 = agent.actor(obs)[0]
    assert q16.dtype == torch.float32 and mean16.dtype == torch.float32
    torch.testing.assert_close(q16, agent.qf(obs, act), rtol=0.05, atol=0.05)
    torch.testing.assert_close(mean16, agent.actor(obs)[0], rtol=0.05, atol=0.05)
    loss, _ = agent.update_critic(obs, act, torch.randn(32), torch.randn(32, 5), torch.zeros(32))
    actor_loss, alpha_loss = agent.update_actor(obs)
    assert all(torch.isfinite(x) for x in (loss, actor_loss, alpha_loss))

"""Tests for aihf_mujoco.py: every loss and target against numbers worked out by hand, the agent's update steps
against a reference written here, env-boundary and absorbing-state handling on a crafted env, Bradley-Terry
labelling, the range check of every numeric flag, and subprocess smoke runs of every --algo that really train
(with resume, and directional checks on the learned reward). A tiny expert is trained here (a ~1k-step SAC run)
so nothing depends on a long run."""

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "aihf_mujoco.py")
sys.path.insert(0, ROOT)
import aihf_mujoco as am  # noqa: E402
from conftest import Run, assert_learned  # noqa: E402

TINY = ["--hidden", "32", "--batch_size", "32", "--eval_episodes", "2", "--num_threads", "1"]
SCRATCH = ["--bc_steps", "0", "--reward_pretrain_steps", "0"]  # the paper's AIHF start: random policy and reward
HOPPER_EXPERT = os.path.join(ROOT, "experts", "Hopper-v5.pt")


def run(args, cwd, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return p


def metrics(cwd, run_name):
    with open(os.path.join(cwd, "runs", run_name, "metrics.json")) as f:
        return json.load(f)


def scalars(run_dir, tag):
    return Run(run_dir).scalars(tag)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("aihf_mujoco")


# SAC smoke run that really trains (learning_starts < total_timesteps); its actor is the tests' expert.
EXPERT_RUN = ["--algo", "sac", "--total_timesteps", "1200", "--learning_starts", "400", "--eval_every", "600",
              "--save_every", "600", *TINY]


def smoke_runs(expert, workdir):
    """The smoke runs that learn a reward from the tiny expert's data: RLHF, and AIHF from a random reward, fast."""
    return {
        "rlhf": ["--algo", "rlhf", "--total_timesteps", "800", "--learning_starts", "300", "--eval_every", "800",
                 "--bc_steps", "100", "--reward_pretrain_steps", "100", *TINY, *data_args(expert, workdir)],
        "aihf": ["--algo", "aihf", "--total_timesteps", "1500", "--learning_starts", "300", "--sac_steps_per_iter", "300",
                 "--reward_steps", "20", "--reward_lr", "1e-3", "--eval_every", "1500", *SCRATCH, *TINY,
                 *data_args(expert, workdir)],
    }


# What each must have learned (tests/margins.md has each value over seeds and CPU code paths). A flipped contrast, a
# flipped or dropped preference term fails AIHF's: in the loop the reward puts the demos above the policy's samples,
# and it ranks the preference pairs.
LEARNED = {
    "rlhf": [("the Bradley-Terry pre-training ranks the pairs: last accuracy",
              lambda r: r.scalars("rewards/pretrain_accuracies")[-1][1], 0.8)],
    "aihf": [("the learned reward goes with the true one: correlation", lambda r: r.m["reward_corr"], 0.0),
             ("it ranks the pairs in every iteration: lowest accuracy",
              lambda r: min(v for _, v in r.scalars("rewards/accuracies")), 0.8),
             ("demonstrations over the policy's samples, last iteration", lambda r: r.scalars("rewards/demo_minus_policy")[-1][1], 0.1)],
}


@pytest.fixture(scope="module")
def tiny_expert(workdir):
    run([*EXPERT_RUN, "--run_name", "sac"], workdir)
    return workdir / "runs" / "sac"


# ------------------------------------------------------------------ smoke runs --------------------------------------
def test_sac_smoke_trains_and_writes_metrics(tiny_expert):
    m = json.loads((tiny_expert / "metrics.json").read_text())
    for k in ("algo", "task", "seed", "steps", "wall_s", "eval_return_mean", "eval_return_std", "expert_return",
              "last10_mean"):
        assert k in m
    assert m["algo"] == "sac" and m["task"] == "Hopper-v5" and m["steps"] == 1200
    assert math.isfinite(m["eval_return_mean"]) and m["eval_return_std"] >= 0
    assert m["last10_mean"] == m["eval_return_mean"]  # two evaluations: the last 10% is the last one
    config = json.loads((tiny_expert / "config.json").read_text())
    assert config["learning_starts"] < config["total_timesteps"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tiny_expert))
    # updates really happened: the saved actor differs from a fresh seed-1 initialisation
    env = gym.make("Hopper-v5")
    torch.manual_seed(1)
    fresh = am.Actor(11, 3, 32, env.action_space.low, env.action_space.high)
    trained = am.load_actor(tiny_expert / "actor.pt")
    assert not torch.equal(fresh.fc1.weight, trained.fc1.weight)


def old_style_checkpoint(path):
    """Rewrite a checkpoint's saved args as a version before the flag renames wrote them."""
    ckpt = torch.load(path, weights_only=False)
    a = ckpt["args"]
    a["threads"], a["checkpoint_every"], a["rlhf_reward_steps"] = a.pop("num_threads"), a.pop("save_every"), 3000
    for k in ("reward_pretrain_steps", "termination", "demo_actions", "ipl_reg_weight", "ipl_replay_weight",
              "ipl_pairs", "ipl_window"):
        a.pop(k)
    ckpt.pop("eval_history")
    torch.save(ckpt, path)


def test_sac_deterministic_and_resume(tiny_expert, workdir, monkeypatch, capsys):
    """Same seed, same command -> same result; --resume continues a run from its checkpoint."""
    common = ["--algo", "sac", "--total_timesteps", "1200", "--learning_starts", "400", "--eval_every", "600",
              "--save_every", "600", *TINY]
    run([*common, "--run_name", "sac_again"], workdir)
    assert metrics(workdir, "sac_again")["eval_return_mean"] == metrics(workdir, "sac")["eval_return_mean"]
    ckpt_path = workdir / "runs" / "sac_again" / "checkpoint.pt"
    first = torch.load(ckpt_path, weights_only=False)
    assert first["step"] == 1200 and first["wall_s"] > 0 and [s for s, _ in first["eval_history"]] == [600, 1200]
    p = run([*common, "--total_timesteps", "1800", "--resume", str(ckpt_path)], workdir)
    assert "resumed at step 1200 (with the replay buffer)" in p.stdout
    m = metrics(workdir, "sac_again")  # resumed into the same run folder
    assert m["steps"] == 1800 and math.isfinite(m["eval_return_mean"])
    assert m["wall_s"] > first["wall_s"]  # the whole run's time, its time before the resume included
    history = torch.load(ckpt_path, weights_only=False)["eval_history"]
    assert [s for s, _ in history] == [600, 1200, 1800] and m["last10_mean"] == history[-1][1]
    # refused before anything is written (in-process, as main calls it): a finished run resumed without a larger
    # --total_timesteps, and another training knob, which would splice two runs into one curve
    import tyro

    monkeypatch.chdir(workdir)
    for extra, needle in [([], "raise --total_timesteps"), (["--total_timesteps", "2400", "--q_lr", "3e-4"],
                                                             "checkpoint has --q_lr 0.001")]:
        capsys.readouterr()
        args = am.validate_args(tyro.cli(am.Args, args=[*common, "--total_timesteps", "1800", *extra, "--resume",
                                                        str(ckpt_path)], use_underscores=True))
        with pytest.raises(SystemExit) as e:
            am.open_run(args, None)
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert metrics(workdir, "sac_again") == m and sorted(os.listdir(workdir / "runs")) == ["sac", "sac_again"]
    # a checkpoint written before the flag renames (--threads, --checkpoint_every, --rlhf_reward_steps), alone
    # (no replay.pt beside it): still resumes, refilling the buffer first
    compact = workdir / "compact"
    compact.mkdir()
    (compact / "trainer.pt").write_bytes(ckpt_path.read_bytes())
    old_style_checkpoint(compact / "trainer.pt")
    p = run([*common, "--total_timesteps", "2000", "--learning_starts", "100", "--resume", str(compact / "trainer.pt"),
             "--run_name", "cont"], workdir)  # refill 100 steps with the restored actor, then 100 updates
    assert "resumed at step 1800 (refilling the replay buffer)" in p.stdout
    assert metrics(workdir, "cont")["steps"] == 2000


def test_saved_args_of_older_checkpoints():
    old = dict(algo="aihf", threads=1, checkpoint_every=10000, rlhf_reward_steps=3000, bc_steps=10000, reward_steps=10)
    assert am.saved_args(old) == dict(algo="aihf", num_threads=1, save_every=10000, reward_pretrain_steps=0,
                                      bc_steps=0, reward_steps=10, termination="replay", demo_actions="mean")
    old_rlhf = am.saved_args(dict(algo="rlhf", rlhf_reward_steps=3000, bc_steps=10000))
    assert old_rlhf["reward_pretrain_steps"] == 3000 and old_rlhf["bc_steps"] == 10000


def test_expert_out_never_replaced_by_a_worse_policy(workdir):
    """--expert_out saves each new best with its fresh return in returns.json, but a later (e.g. resumed) run
    whose best is below the shipped expert's return leaves the expert alone."""
    out = workdir / "experts_out" / "Hopper-v5.pt"
    common = ["--algo", "sac", "--total_timesteps", "600", "--learning_starts", "300", "--eval_every", "300",
              "--save_every", "0", "--expert_out", str(out), *TINY]
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
    run([*smoke_runs(tiny_expert, workdir)["rlhf"], "--run_name", "rlhf"], workdir)
    m = metrics(workdir, "rlhf")
    assert m["algo"] == "rlhf" and m["steps"] == 800 and m["num_prefs"] == 300
    for k in ("eval_return_mean", "expert_return", "demo_return", "reward_corr"):
        assert math.isfinite(m[k]), k
    config = json.loads((workdir / "runs" / "rlhf" / "config.json").read_text())
    assert config["demo_actions"] == "mean" and config["termination"] == "replay"
    assert_learned(workdir / "runs" / "rlhf", LEARNED["rlhf"])


def test_aihf_learns_its_reward_in_the_right_direction(tiny_expert, workdir):
    """AIHF (absorbing state) with a fast reward, from a random reward, learns its reward the right way round."""
    run([*smoke_runs(tiny_expert, workdir)["aihf"], "--run_name", "aihf"], workdir)
    m = metrics(workdir, "aihf")
    assert m["algo"] == "aihf" and m["steps"] == 1500
    run_dir = workdir / "runs" / "aihf"
    assert [s for s, _ in scalars(run_dir, "rewards/demo_minus_policy")] == [300, 600, 900, 1200]  # one per iteration
    assert len(scalars(run_dir, "rewards/accuracies")) == 4
    assert_learned(run_dir, LEARNED["aihf"])
    data = torch.load(next((workdir / "cache").iterdir()), weights_only=False)
    assert len(data["demo_obs"]) == 600 and len(data["chosen"]) == 300
    assert len(data["pool_next_obs"]) == len(data["pool_obs"]) == len(data["pool_terminated"]) >= 1200
    assert data["pref_teacher_agreement"] == 1.0  # noiseless teacher
    # resuming with other data (here another seed) would train the old reward on new demos: refused
    p = run(["--algo", "aihf", "--total_timesteps", "1800", "--learning_starts", "300", "--sac_steps_per_iter", "300",
             "--reward_steps", "20", "--reward_lr", "1e-3", "--seed", "2", *SCRATCH,
             "--resume", str(run_dir), *TINY, *data_args(tiny_expert, workdir)], workdir, check=False)
    assert p.returncode == 2 and "differ from the checkpoint" in p.stderr, p.stderr
    assert metrics(workdir, "aihf")["steps"] == 1500  # the finished run is untouched


def test_sac_trains_on_the_learned_reward(tiny_expert, workdir, monkeypatch):
    """AIHF's SAC updates use the learned reward (each replayed transition relabelled), not the env's: with a reward
    net that says -5 everywhere, the critic's values go negative, where Hopper's true rewards would make them
    positive. In-process, a short run."""
    import tyro

    monkeypatch.setattr(am.RewardNet, "forward", lambda self, x: self.net(x).squeeze(-1) * 0 - 5.0)
    args = tyro.cli(am.Args, use_underscores=True, args=[
        "--algo", "aihf", "--total_timesteps", "700", "--learning_starts", "300", "--sac_steps_per_iter", "200",
        "--eval_every", "700", "--run_name", "constant_reward", *SCRATCH, *TINY, *data_args(tiny_expert, workdir)])
    _run_in_process(args, workdir, monkeypatch)
    assert scalars(workdir / "runs" / "constant_reward", "losses/qf1_values")[-1][1] < -2


def _run_in_process(args, workdir, monkeypatch):
    """am.main(args) in this process (chdir'd to workdir), giving the test run its torch state back afterwards."""
    monkeypatch.chdir(workdir)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    rng = torch.get_rng_state()
    try:
        am.main(args)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_rng_state(rng)


def test_replayed_transitions_are_relabelled_at_their_own_state_action(tiny_expert, workdir, monkeypatch):
    """The learned reward SAC trains on is r(s, a) of each replayed transition itself: with r = the first feature of
    its input (the state's first coordinate), every reward the critic sees is that of its own state, not its s'."""
    import tyro

    monkeypatch.setattr(am.RewardNet, "forward", lambda self, x: self.net(x).squeeze(-1) * 0 + x[..., 0])
    seen, update_critic = [], am.SAC.update_critic

    def spy(self, obs, act, rew, next_obs, done):
        seen.append((obs[:, 0].clone(), rew.clone(), next_obs[:, 0].clone()))
        return update_critic(self, obs, act, rew, next_obs, done)

    monkeypatch.setattr(am.SAC, "update_critic", spy)
    _run_in_process(tyro.cli(am.Args, use_underscores=True, args=[
        "--algo", "aihf", "--total_timesteps", "500", "--learning_starts", "300", "--sac_steps_per_iter", "100",
        "--eval_every", "500", "--run_name", "relabel", *SCRATCH, *TINY, *data_args(tiny_expert, workdir)]),
        workdir, monkeypatch)
    assert len(seen) == 200
    for state, reward, next_state in seen:
        torch.testing.assert_close(reward, state.float())
    assert any(not torch.equal(s, n) for s, _, n in seen)


def test_demonstrations_reach_the_absorbing_state(tiny_expert, workdir, monkeypatch):
    """--termination absorbing: the reward step's demonstrations hold one absorbing row after each of their
    terminations, as the docstring says (DAC). With r = the absorbing flag of its input, the demonstrations' summed
    reward in a full-batch reward step counts those rows."""
    import tyro

    args = tyro.cli(am.Args, use_underscores=True, args=[
        "--algo", "aihf", "--total_timesteps", "400", "--learning_starts", "300", "--sac_steps_per_iter", "100",
        "--reward_batch_size", "1000000", "--eval_every", "400", "--run_name", "absorbing", *SCRATCH, *TINY,
        *data_args(tiny_expert, workdir)])
    assert args.termination is None  # aihf's default: absorbing
    obs_dim = 11  # Hopper's observation, then its absorbing flag
    monkeypatch.setattr(am.RewardNet, "forward", lambda self, x: self.net(x).squeeze(-1) * 0 + x[..., obs_dim])
    demo_sums, loss = [], am.aihf_reward_loss

    def spy(policy_rewards, demo_rewards, *rest):
        demo_sums.append((len(demo_rewards), demo_rewards.sum().item()))
        return loss(policy_rewards, demo_rewards, *rest)

    monkeypatch.setattr(am, "aihf_reward_loss", spy)
    _run_in_process(args, workdir, monkeypatch)
    data = torch.load(next((workdir / "cache").iterdir()), weights_only=False)
    falls = int(sum(data["demo_terminated"]))
    assert falls > 0, "the tiny expert's demonstrations never fall: nothing checked"
    assert demo_sums and all(d == (len(data["demo_obs"]) + falls, falls) for d in demo_sums), (demo_sums, falls)


def test_each_optimizer_gets_its_own_learning_rate(tiny_expert, workdir, monkeypatch):
    """Every Adam the script makes, at values no default has: behaviour cloning and the actor at --policy_lr, the
    critics and the entropy temperature at --q_lr, the reward (pre-training and AIHF's steps) at --reward_lr with
    --reward_wd."""
    import tyro

    made = []

    class Adam(torch.optim.Adam):
        def __init__(self, params, lr, *args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == am.__name__:
                made.append((lr, kwargs.get("weight_decay", 0)))
            super().__init__(params, lr, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", Adam)
    _run_in_process(tyro.cli(am.Args, use_underscores=True, args=[
        "--algo", "aihf", "--total_timesteps", "400", "--learning_starts", "300", "--sac_steps_per_iter", "100",
        "--bc_steps", "5", "--reward_pretrain_steps", "5", "--policy_lr", "2.1e-4", "--q_lr", "1.3e-3", "--reward_lr", "3.7e-4",
        "--reward_wd", "2e-3", "--eval_every", "400", "--run_name", "optimizers", *TINY, *data_args(tiny_expert, workdir)]),
        workdir, monkeypatch)
    assert sorted(made) == sorted([(1.3e-3, 0), (2.1e-4, 0), (1.3e-3, 0), (3.7e-4, 2e-3), (2.1e-4, 0)]), made


def test_aihf_rollouts_and_ipl_smoke_and_resume(tiny_expert, workdir):
    """--termination rollouts and --algo ipl train, and a resumed ipl run continues its curve."""
    run(["--algo", "aihf", "--termination", "rollouts", "--policy_samples", "1000", "--bc_steps", "50",
         "--reward_pretrain_steps", "20", "--total_timesteps", "700",
         "--learning_starts", "300", "--sac_steps_per_iter", "200", "--eval_every", "700", "--run_name", "rollouts",
         *TINY, *data_args(tiny_expert, workdir)], workdir)
    assert [s for s, _ in scalars(workdir / "runs" / "rollouts", "rewards/demo_minus_policy")] == [300, 500]
    common = ["--algo", "ipl", "--learning_starts", "300", "--eval_every", "300", "--save_every", "300",
              "--ipl_pairs", "4", "--ipl_window", "5", "--reward_pretrain_steps", "20", *TINY,
              *data_args(tiny_expert, workdir)]
    run([*common, "--total_timesteps", "600", "--run_name", "ipl"], workdir)
    m = metrics(workdir, "ipl")
    assert m["algo"] == "ipl" and m["reward_corr"] is None and math.isfinite(m["eval_return_mean"])
    assert len(scalars(workdir / "runs" / "ipl", "losses/ipl_reg")) > 0
    p = run([*common, "--total_timesteps", "900", "--resume", str(workdir / "runs" / "ipl")], workdir)
    assert "resumed at step 600 (with the replay buffer)" in p.stdout
    m = metrics(workdir, "ipl")
    assert m["steps"] == 900 and m["last10_mean"] == m["eval_return_mean"]



@pytest.mark.parametrize("algo, flag, value", [("ipl", "ipl_reg_weight", 1.0), ("aihf", "termination", "rollouts"),
                                               ("aihf", "reward_pretrain_steps", 5), ("aihf", "demo_actions", "mean")])
def test_resume_refuses_a_changed_new_flag(tiny_expert, workdir, monkeypatch, capsys, algo, flag, value):
    """The resume check covers the new flags: a changed IPL or termination knob is refused before anything is
    written; the demos through the data key."""
    base = dict(algo=algo, seed=1, total_timesteps=3000, learning_starts=300, reward_pretrain_steps=0, bc_steps=0,
                hidden=32, batch_size=32, eval_episodes=2, expert_path=str(tiny_expert / "actor.pt"))
    ckpt = dict(step=1000, args=asdict(am.validate_args(am.Args(**base))), data_key="k")
    ckpt.update({k: None for k in am.CHECKPOINT_KEYS if k not in ckpt})  # the shape of a checkpoint; the flags differ
    path = workdir / f"fake_{flag}.pt"
    torch.save(ckpt, path)
    args = am.validate_args(am.Args(**dict(base, **{flag: value}), resume=str(path)))
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        am.open_run(args, "k2" if flag == "demo_actions" else "k")
    err = capsys.readouterr().err
    assert e.value.code == 2 and (f"--{flag}" in err or "differ from the checkpoint" in err), err


# ------------------------------------------------------------------ bad input ---------------------------------------
def test_bad_input_cli_fails_fast_and_writes_nothing(tmp_path):
    """The real CLI: one line on stderr starting "error:" that names the flag, exit code 2, nothing written."""
    for extra, needle in [(["--q_lr", "-1"], "--q_lr"), (["--env_id", "CartPole-v1"], "Box action space"),
                          (["--env_id", "Walker2d-v5"], "trained on Hopper-v5, not Walker2d-v5")]:
        p = run(["--algo", "aihf", "--expert_path", HOPPER_EXPERT, "--cache_dir", str(tmp_path / "c"), *extra],
                tmp_path, check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], p.stderr
    assert os.listdir(tmp_path) == []  # no runs/, no cache


BAD_INPUTS = [
    (["--num_demos", "5000", "--demo_episodes", "2"], "--num_demos"),
    (["--segment_len", "1001"], "--segment_len"),
    (["--expert_path", "nowhere/none.pt"], "python aihf_mujoco.py --algo sac"),
    (["--reward_steps", "0"], "--reward_steps"),
    (["--env_id", "HalfCheetah-v5", "--fixed_horizon"], "--fixed_horizon"),
    (["--learning_starts", "2000", "--total_timesteps", "2000"], "--learning_starts"),
    (["--algo", "rlhf", "--termination", "absorbing"], "--termination"),
    (["--algo", "irl", "--reward_pretrain_steps", "10"], "--reward_pretrain_steps"),
    (["--algo", "ipl", "--num_prefs", "0"], "--num_prefs"),
    (["--algo", "ipl", "--ipl_window", "60"], "--ipl_window"),
    (["--pool_noises", "0.1", "nan"], "--pool_noises"),
    (["--resume", "nowhere"], "--resume"),
    (["--alpha", "0"], "--alpha"),  # a fixed alpha (autotune off) is used as log(alpha)
    (["--env_id", "Walker2d-v5"], "trained on Hopper-v5, not Walker2d-v5: pass --expert_path"),
    (["--expert_path", os.path.join(ROOT, "experts", "returns.json")], "not a torch checkpoint"),
    (["--resume", HOPPER_EXPERT], "lacks args"),  # an actor file (like a run's actor.pt), no training checkpoint
]


@pytest.mark.parametrize("extra, needle", BAD_INPUTS)
def test_bad_input_rejected_before_anything_is_written(tmp_path, monkeypatch, capsys, extra, needle):
    """The same validation in-process (fast): SystemExit 2 from validate_args, one stderr line."""
    import tyro

    monkeypatch.chdir(tmp_path)
    argv = ["--algo", "aihf", "--expert_path", HOPPER_EXPERT, "--cache_dir", str(tmp_path / "c"), *extra]
    with pytest.raises(SystemExit) as e:
        am.validate_args(tyro.cli(am.Args, args=argv, use_underscores=True))
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    # MuJoCo itself logs a model deprecation warning of HalfCheetah to ./MUJOCO_LOG.TXT; nothing of ours is written
    assert [f for f in os.listdir(tmp_path) if f != "MUJOCO_LOG.TXT"] == []


def test_help_is_fast():
    p = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 0 and "--total_timesteps" in p.stdout and "--num_threads" in p.stdout


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


def test_env_step_enters_the_absorbing_state_on_termination_only():
    """Episode 0 is truncated at t = 5 (no absorbing state); episode 1 terminates at t = 3: (s_3 -> s_abs), then
    (s_abs, action 0 -> s_abs); every done flag 0, so the critic bootstraps through the absorbing state."""
    env = gym.wrappers.TimeLimit(Tiny(), max_episode_steps=5)
    rb = am.ReplayBuffer(100, 3, 1)
    obs, _ = env.reset(seed=0)
    for _ in range(8):  # 5 steps of episode 0, 3 of episode 1
        obs, _, _, _ = am.env_step(env, obs, np.full(1, 0.5, np.float32), rb, absorbing=True)
    assert rb.size == 9
    o, a, o2, d = rb.np["obs"][:9], rb.np["act"][:9], rb.np["next_obs"][:9], rb.np["done"][:9]
    s_abs = [0, 0, 1]
    np.testing.assert_array_equal(o[:8, 2], 0)  # real observations carry the flag 0
    np.testing.assert_array_equal(o2[4], [0, 5, 0])  # truncation: the real final observation, no absorbing state
    np.testing.assert_array_equal(o[7], [1, 2, 0])
    np.testing.assert_array_equal(o2[7], s_abs)  # termination leads to the absorbing state
    np.testing.assert_array_equal(o[8], s_abs)
    np.testing.assert_array_equal(o2[8], s_abs)
    assert a[8, 0] == 0 and a[7, 0] == 0.5 and rb.np["rew"][8] == 0
    np.testing.assert_array_equal(d, 0)


def test_demos_get_absorbing_rows_after_each_termination():
    obs = np.arange(8, dtype=np.float32).reshape(4, 2)
    act = np.ones((4, 1), np.float32)
    o, a = am.with_absorbing_rows(obs, act, np.array([0, 1, 0, 1], np.float32))
    np.testing.assert_array_equal(o, [[0, 1, 0], [2, 3, 0], [0, 0, 1], [4, 5, 0], [6, 7, 0], [0, 0, 1]])
    np.testing.assert_array_equal(a[:, 0], [1, 1, 0, 1, 1, 0])


def test_fixed_length_rollouts_ignore_falls():
    """ML-IRL's policy samples: exactly n x length steps; a random Hopper falls within ~100 steps, and the rollout
    goes on with the fallen body (torso height below the healthy range) instead of resetting."""
    torch.manual_seed(0)
    env = gym.make("Hopper-v5")
    actor = am.Actor(11, 3, 16, env.action_space.low, env.action_space.high)
    obs, act = am.fixed_length_rollouts(actor, "Hopper-v5", 2, 300, seed=0)
    assert obs.shape == (600, 11) and act.shape == (600, 3)
    height = obs[:, 0].reshape(300, 2)  # the rollouts run side by side: row t holds step t of each
    assert (height[-50:] < 0.7).all()  # Hopper's healthy z range starts at 0.7
    with torch.no_grad():
        assert (act - actor.act_mean(obs)).abs().mean() > 0.1  # the policy's sampled actions, not its mean


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


def test_last_tenth_mean():
    assert am.last_tenth_mean(list(range(1, 31))) == 29.0  # 30 evaluations: the last 3
    assert am.last_tenth_mean([5.0, 7.0]) == 7.0 and am.last_tenth_mean(list(range(11))) == 9.5
    assert math.isnan(am.last_tenth_mean([]))


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


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_bt_loss_per_pair_and_direction():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.5])
    torch.testing.assert_close(am.bt_loss(chosen, rejected), torch.tensor([-log_sigmoid(1.0), -log_sigmoid(-1.5)]))
    assert am.bt_loss(torch.tensor(3.0), torch.tensor(0.0)) < am.bt_loss(torch.tensor(0.0), torch.tensor(3.0))


def test_aihf_reward_loss_matches_formula():
    r_pol, r_demo = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, -1.0])
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.5])
    w = 0.7
    pref = -(log_sigmoid(1.0) + log_sigmoid(-1.5)) / 2
    expected = (3.5 / 3) - (2.0 / 2) + w * pref
    loss, stats = am.aihf_reward_loss(r_pol, r_demo, chosen, rejected, w)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["rewards/demo_minus_policy"].item() == pytest.approx(1.0 - 3.5 / 3, rel=1e-6)
    assert stats["losses/pref_loss"].item() == pytest.approx(pref, rel=1e-6)
    assert stats["rewards/accuracies"].item() == 0.5 and stats["rewards/margins"].item() == pytest.approx(-0.25)
    loss0, stats0 = am.aihf_reward_loss(r_pol, r_demo, None, None, 0.0)
    assert loss0.item() == pytest.approx(3.5 / 3 - 1.0, rel=1e-6) and "rewards/accuracies" not in stats0
    assert am.irl_contrast(r_pol, r_demo).item() == pytest.approx(3.5 / 3 - 1.0, rel=1e-6)


def test_sac_math_by_hand():
    r, d = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    next_q, next_logp = torch.tensor([10.0, 10.0]), torch.tensor([-1.0, 3.0])
    # y = r + 0.9 * (1 - done) * (Q' - 0.5 * logp): 1 + 0.9 * 10.5 = 10.45, and 2 (terminal)
    torch.testing.assert_close(am.soft_q_target(r, d, next_q, next_logp, 0.9, 0.5), torch.tensor([10.45, 2.0]))
    q = torch.tensor([[1.0, 2.0], [0.0, 4.0]])
    torch.testing.assert_close(am.sac_critic_loss(q, torch.tensor([2.0, 2.0])), torch.tensor((1 + 0) / 2 + (4 + 4) / 2))
    logp, qa = torch.tensor([-1.0, 2.0]), torch.tensor([3.0, 1.0])
    torch.testing.assert_close(am.sac_actor_loss(logp, qa, 0.5), torch.tensor(((-0.5 - 3) + (1 - 1)) / 2))
    torch.testing.assert_close(am.sac_actor_loss(logp, qa, 0.5, torch.tensor([1.0, 0.0])), torch.tensor(-3.5))
    log_alpha = torch.tensor([math.log(2.0)])
    # -alpha * (logp + target_entropy) with target -1: -2 * (-2) = 4 and -2 * 1 = -2
    torch.testing.assert_close(am.sac_alpha_loss(log_alpha, logp, -1.0), torch.tensor(1.0))
    torch.testing.assert_close(am.sac_alpha_loss(log_alpha, logp, -1.0, torch.tensor([0.0, 1.0])), torch.tensor(-2.0))
    target, online = [torch.tensor([0.0, 10.0])], [torch.tensor([1.0, 0.0])]
    am.polyak_update(target, online, 0.1)
    torch.testing.assert_close(target[0], torch.tensor([0.1, 9.0]))
    act, logp2 = am.absorbing_next_action(torch.ones(3, 2), torch.tensor([1.0, 2.0, 3.0]),
                                          torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(act, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))
    torch.testing.assert_close(logp2, torch.tensor([1.0, 0.0, 3.0]))


def test_ipl_math_by_hand():
    q, next_v, term = torch.tensor([[2.0, 1.0]]), torch.tensor([1.0, 5.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(am.ipl_implicit_reward(q, next_v, term, 0.5), torch.tensor([[1.5, 1.0]]))
    chosen = torch.tensor([[[1.0, 1.0]]])  # (members, pairs, steps): segment return 2
    rejected = torch.tensor([[[0.0, 1.0]]])  # return 1
    replay = torch.tensor([[2.0, 0.0]])
    loss, stats = am.ipl_loss(chosen, rejected, replay, 0.5, 0.25)
    segment_sq = (1.0 + 0.5) / 2  # (E chosen r^2 + E rejected r^2) / 2
    reg = 0.75 * segment_sq + 0.25 * 2.0  # E replay r^2 = 2
    assert loss.item() == pytest.approx(-log_sigmoid(1.0) + 0.5 * reg, rel=1e-6)
    assert stats["losses/ipl_reg"].item() == pytest.approx(reg) and stats["rewards/accuracies"].item() == 1.0
    loss_pref_only, _ = am.ipl_loss(chosen, rejected, None, 0.5, 0.25)
    assert loss_pref_only.item() == pytest.approx(-log_sigmoid(1.0) + 0.5 * segment_sq, rel=1e-6)


def small_agent(algo="aihf", absorbing=False, autotune=True):
    torch.manual_seed(0)
    args = am.validate_args(am.Args(algo=algo, hidden=16, gamma=0.9, alpha=0.3, autotune=autotune,
                                    expert_path=HOPPER_EXPERT))
    return am.SAC(3, 2, np.array([-1.0, -1.0]), np.array([1.0, 1.0]), args, absorbing), args


def first_adam_step_follows(params_before, params_after, grads, lr):
    """Adam's first step moves each weight by -lr * sign(its gradient) (up to eps): the update took this gradient."""
    for before, after, g in zip(params_before, params_after, grads):
        big = g.abs() > 1e-5
        assert big.any()
        torch.testing.assert_close((after - before)[big], -lr * g[big].sign(), rtol=1e-2, atol=lr * 1e-2)


def test_update_critic_trains_towards_the_soft_target():
    """update_critic's loss is sum_j mean (Q_j - y)^2 with y = r + gamma (1 - done)(min_j Qbar_j(s',a') - alpha logp)
    computed here from the networks themselves (same random draw of a')."""
    agent, _ = small_agent()
    obs, act, next_obs = torch.randn(6, 3), torch.rand(6, 2) * 2 - 1, torch.randn(6, 3)
    rew, done = torch.randn(6), torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    with torch.no_grad():
        agent.qf_target.bs[2].add_(torch.tensor([[[1.0]], [[-2.0]]]))  # targets differ from the critics
        torch.manual_seed(5)
        next_act, next_logp = agent.actor.sample(next_obs)
        q_next = agent.qf_target(next_obs, next_act)
        y = rew + 0.9 * (1 - done) * (torch.minimum(q_next[0], q_next[1]) - agent.alpha * next_logp)
        q = agent.qf(obs, act)
        expected = F.mse_loss(q[0], y) + F.mse_loss(q[1], y)
    before = [p.clone() for p in agent.qf.parameters()]
    q = agent.qf(obs, act)
    grads = torch.autograd.grad(F.mse_loss(q[0], y) + F.mse_loss(q[1], y), list(agent.qf.parameters()))
    torch.manual_seed(5)
    loss, q_out = agent.update_critic(obs, act, rew, next_obs, done)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(q_out, q.detach())
    first_adam_step_follows(before, list(agent.qf.parameters()), grads, 1e-3)


def test_update_critic_bootstraps_through_the_absorbing_state():
    """With an absorbing state, rows whose s' is absorbing bootstrap from Qbar(s_abs, 0) without entropy term;
    done stays 0."""
    agent, _ = small_agent(absorbing=True)
    obs = torch.cat([torch.randn(4, 3), torch.zeros(4, 1)], 1)
    act = torch.rand(4, 2) * 2 - 1
    s_abs = torch.tensor([0.0, 0.0, 0.0, 1.0])
    next_obs = torch.stack([torch.cat([torch.randn(3), torch.zeros(1)]), s_abs, s_abs, torch.cat([torch.randn(3),
                                                                                                   torch.zeros(1)])])
    rew, done = torch.randn(4), torch.zeros(4)
    with torch.no_grad():
        torch.manual_seed(3)
        next_act, next_logp = agent.actor.sample(next_obs[:, :3])
        next_act[1:3], next_logp[1:3] = 0.0, 0.0
        q_next = agent.qf_target(next_obs, next_act).min(0).values
        y = rew + 0.9 * (q_next - agent.alpha * next_logp)
        q = agent.qf(obs, act)
        expected = F.mse_loss(q[0], y) + F.mse_loss(q[1], y)
    torch.manual_seed(3)
    loss, _ = agent.update_critic(obs, act, rew, next_obs, done)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("absorbing", [False, True])
def test_update_actor_and_alpha(absorbing):
    """Actor loss mean(alpha logp - min_j Q_j(s, a~)) and alpha loss mean(-alpha (logp + target_entropy)), over the
    non-absorbing rows; the Polyak step moves the targets by tau towards the critics."""
    agent, _ = small_agent(absorbing=absorbing)
    obs = torch.randn(5, 3 + absorbing)
    keep = torch.ones(5)
    if absorbing:
        obs[:, -1] = 0
        obs[3] = torch.tensor([0.0, 0.0, 0.0, 1.0])
        keep[3] = 0
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.4))
        agent.qf.ws[2].mul_(100)  # a steep critic: the actor's gradient comes mostly through Q(s, a~)
    torch.manual_seed(7)
    act, logp = agent.actor.sample(obs[:, :3])
    q = agent.qf(obs, act).min(0).values
    expected_actor = ((0.4 * logp - q) * keep).sum() / keep.sum()
    expected_alpha = ((-0.4 * (logp.detach() - 2.0)) * keep).sum() / keep.sum()  # target entropy -|A| = -2
    before = [p.detach().clone() for p in agent.actor.parameters()]
    grads = torch.autograd.grad(expected_actor, list(agent.actor.parameters()))
    torch.manual_seed(7)
    actor_loss, alpha_loss = agent.update_actor(obs)
    torch.testing.assert_close(actor_loss, expected_actor.detach())
    torch.testing.assert_close(alpha_loss.detach(), expected_alpha)
    first_adam_step_follows(before, list(agent.actor.parameters()), grads, 1e-3)
    assert agent.alpha.item() != pytest.approx(0.4, abs=1e-7)  # the temperature took a step
    with torch.no_grad():
        for p in agent.qf.parameters():
            p.add_(1.0)
    old = [p.clone() for p in agent.qf_target.parameters()]
    agent.update_target()
    for o, p, t in zip(old, agent.qf.parameters(), agent.qf_target.parameters()):
        torch.testing.assert_close(t, 0.995 * o + 0.005 * p)


def test_update_critic_ipl_matches_a_reference():
    """IPL's critic step: r = Q(s,a) - gamma (1 - terminated) mean_j Qbar_j(s', a'), then BT on segment sums per
    member plus lambda [(1 - w)(E r_c^2 + E r_r^2)/2 + w E r_replay^2], all written out here."""
    agent, _ = small_agent(algo="ipl", autotune=False)
    with torch.no_grad():
        agent.qf_target.bs[2].add_(torch.tensor([[[1.0]], [[-2.0]]]))
    P, W, B = 3, 4, 5

    def part(*lead):
        return (torch.randn(*lead, 3), torch.rand(*lead, 2) * 2 - 1, torch.randn(*lead, 3),
                (torch.rand(*lead) < 0.3).float())

    chosen, rejected, replay = part(P, W), part(P, W), part(B)

    def implicit(obs, act, next_obs, term):
        next_a, _ = agent.actor.sample(next_obs)
        v = agent.qf_target(next_obs, next_a).mean(0)
        return agent.qf(obs, act) - 0.9 * (1 - term) * v

    torch.manual_seed(11)
    flat = [torch.cat([x.reshape(-1, *x.shape[2:]) for x in (c, r)] + [b]) for c, r, b in zip(chosen, rejected, replay)]
    r_all = implicit(*flat)
    r_c, r_r, r_b = r_all[:, :P * W].reshape(2, P, W), r_all[:, P * W:2 * P * W].reshape(2, P, W), r_all[:, 2 * P * W:]
    pref = -F.logsigmoid(r_c.sum(-1) - r_r.sum(-1)).mean()
    reg = 0.8 * (r_c.pow(2).mean() + r_r.pow(2).mean()) / 2 + 0.2 * r_b.pow(2).mean()
    expected = pref + 0.7 * reg
    before = [p.detach().clone() for p in agent.qf.parameters()]
    grads = torch.autograd.grad(expected, list(agent.qf.parameters()))
    torch.manual_seed(11)
    stats = agent.update_critic_ipl(chosen, rejected, replay, 0.7, 0.2)
    torch.testing.assert_close(stats["losses/qf_loss"], expected.detach())
    torch.testing.assert_close(stats["losses/pref_loss"], pref.detach())
    first_adam_step_follows(before, list(agent.qf.parameters()), grads, 1e-3)


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

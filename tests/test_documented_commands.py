"""Every command the documentation gives (the bash blocks of every markdown file, each script's docstring, the GPU
checks' script runs, the MuJoCo lane files that experiments/mujoco/queue.sh runs) parses with the script's own flags: a
renamed or removed flag fails here, not in a reader's terminal or on a GPU machine."""

import ast
import glob
import os
import re
import shlex
from importlib import import_module

import pytest
import tyro

from conftest import ROOT

SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py")) if not p.endswith("sort_task.py"))
MARKDOWN = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "**", "*.md"), recursive=True)
                  if not os.path.relpath(p, ROOT).startswith((".", "runs")))  # not .venv/, not the runs' own logs
# benchmarks/gpu_checks.sh's shell variables, each given a value its flag accepts
SHELL_VALUES = {"algo": "rl", "cache": "cache", "runs": "runs", "out": "out"}
SHELL_OPERATORS = ("&&", "||", "|", ";")


def commands_in(text, where):
    """(where, script, argv) of each line of shell text that runs a script: continuations joined; comments, what follows
    a shell operator (&&, |, >) and the `...` of an abbreviated command dropped; $variables given SHELL_VALUES."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.split(r"(?:^|\s)#", line)[0]  # a comment may hold an apostrophe, which shlex reads as a quote
        if not set(line.split()) & set(SCRIPTS):
            continue
        words = shlex.split(re.sub(r"\$\{?(\w+)\}?", lambda v: SHELL_VALUES[v.group(1)], line))
        at = words.index(next(w for w in words if w in SCRIPTS))
        argv = []
        for word in words[at + 1 :]:
            if word in SHELL_OPERATORS or word.startswith((">", "2>")):
                break
            if word != "...":
                argv.append(word)
        found.append((where, words[at], argv))
    return found


def documented_commands():
    found = []
    for page in MARKDOWN:
        for block in re.findall(r"```bash\n(.*?)```", open(os.path.join(ROOT, page)).read(), re.S):
            found += commands_in(block, page)
    for script in SCRIPTS:
        found += commands_in(ast.get_docstring(ast.parse(open(os.path.join(ROOT, script)).read())) or "", script)
    found += commands_in(open(os.path.join(ROOT, "benchmarks", "gpu_checks.sh")).read(), "benchmarks/gpu_checks.sh")
    for lane in sorted(glob.glob(os.path.join(ROOT, "experiments", "mujoco", "lane_*.txt"))):
        for line in open(lane):  # as queue.sh reads it: `read -r name flags`, a '#' name skips the line, plain splitting
            name, *flags = line.split(maxsplit=1) or ["#"]
            if not name.startswith("#"):
                found.append((os.path.relpath(lane, ROOT), "aihf_mujoco.py", flags[0].split() if flags else []))
    return found


COMMANDS = documented_commands()


def test_the_documentation_is_read():
    """The search finds the commands (a broken pattern would make the test below pass on nothing)."""
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)
    assert sum(where == "README.md" for where, _, _ in COMMANDS) >= 15
    assert sum(where == "benchmarks/gpu_checks.sh" for where, _, _ in COMMANDS) == 1
    assert any(where.startswith("experiments/mujoco/lane_") for where, _, _ in COMMANDS)


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w}:{s}:{i}" for i, (w, s, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, script, argv, capsys):
    module = import_module(script[:-3])
    try:
        tyro.cli(module.Args, args=argv, use_underscores=True)
    except SystemExit:
        pytest.fail(f"{where}: `{script} {' '.join(argv)}` does not parse:\n{capsys.readouterr().err[-800:]}")

"""Every command the documentation gives (the READMEs' bash blocks, each script's docstring, the MuJoCo lane files
that results/mujoco/queue.sh runs) parses with the script's own flags: a renamed or removed flag fails here, not in a
reader's terminal."""

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
READMES = ["README.md", "benchmarks/README.md", "results/afd/README.md", "results/mujoco/README.md"]


def commands_in(text, where):
    """(where, script, argv) of each line of shell text that runs a script: continuations joined, comments and the
    `...` of an abbreviated command dropped."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.split(r"(?:^|\s)#", line)[0]  # a comment may hold an apostrophe, which shlex reads as a quote
        if not set(line.split()) & set(SCRIPTS):
            continue
        words = shlex.split(line)
        at = words.index(next(w for w in words if w in SCRIPTS))
        found.append((where, words[at], [w for w in words[at + 1 :] if w != "..."]))
    return found


def documented_commands():
    found = []
    for readme in READMES:
        text = open(os.path.join(ROOT, readme)).read()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            found += commands_in(block, readme)
    for script in SCRIPTS:
        found += commands_in(ast.get_docstring(ast.parse(open(os.path.join(ROOT, script)).read())), script)
    for lane in sorted(glob.glob(os.path.join(ROOT, "results", "mujoco", "lane_*.txt"))):
        for line in open(lane):
            words = shlex.split(re.split(r"(?:^|\s)#", line)[0])
            if words:  # <run name> <aihf_mujoco.py flags ...>
                found.append((os.path.relpath(lane, ROOT), "aihf_mujoco.py", words[1:]))
    return found


COMMANDS = documented_commands()


def test_the_documentation_is_read():
    """The search finds the commands (a broken pattern would make the test below pass on nothing)."""
    assert {script for _, script, _ in COMMANDS} == set(SCRIPTS)
    assert sum(where == "README.md" for where, _, _ in COMMANDS) >= 15
    assert any(where.startswith("results/mujoco/lane_") for where, _, _ in COMMANDS)


@pytest.mark.parametrize("where,script,argv", COMMANDS, ids=[f"{w}:{s}:{i}" for i, (w, s, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, script, argv, capsys):
    module = import_module(script[:-3])
    try:
        tyro.cli(module.Args, args=argv, use_underscores=True)
    except SystemExit:
        pytest.fail(f"{where}: `{script} {' '.join(argv)}` does not parse:\n{capsys.readouterr().err[-800:]}")

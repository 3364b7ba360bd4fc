"""How each script reads: its length, the length of main(), and how far down the file a reader meets the algorithm's
core update (the first call of it in main() or in a stage function main() calls). The targets are the project's:
main() at most 100 lines, the core update within the first 40% of the file, and each script's total at most its
budget below. tests/test_shared_machinery.py holds the ones the scripts meet; this prints all of them.

    python tests/structure.py
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# script: (the core update's function name, the line budget)
CORE = {"aihf_llm.py": ("reward_step", 1900), "rlhf_llm.py": ("ppo_update", 1650), "dpo_llm.py": ("dpo_batch_loss", 1250),
        "afd_llm.py": ("discriminator_loss", 1800), "aihf_mujoco.py": ("update_critic", 1150)}
MAIN_LINES, CORE_SHARE = 100, 0.40


def measure(script):
    """(total lines, main()'s lines, line of the core update's first call, that line as a share of the file)."""
    source = open(os.path.join(ROOT, script)).read()
    tree = ast.parse(source)
    total = len(source.splitlines())
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    main = functions["main"]
    # main() and the functions it calls by name (its stages), in the file's order
    called = {c.func.id for c in ast.walk(main) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    readers = [main] + [functions[n] for n in called if n in functions]
    core_name = CORE[script][0]
    lines = [c.lineno for f in readers for c in ast.walk(f) if isinstance(c, ast.Call)
             and core_name in (getattr(c.func, "id", None), getattr(c.func, "attr", None))
             or isinstance(c, ast.Call) and any(isinstance(a, ast.Name) and a.id == core_name for a in c.args)]
    first = min(lines) if lines else None
    return total, main.end_lineno - main.lineno + 1, first, (first / total if first else None)


if __name__ == "__main__":
    print(f"| script | lines (budget) | main() lines (<= {MAIN_LINES}) | core update | at line (share, <= {CORE_SHARE:.0%}) |")
    print("|---|---|---|---|---|")
    for script, (core, budget) in CORE.items():
        total, main_lines, first, share = measure(script)
        print(f"| {script} | {total} ({budget}) | {main_lines} | {core} | {first} ({share:.0%}) |" if first else
              f"| {script} | {total} ({budget}) | {main_lines} | {core} | not reached from main() |")

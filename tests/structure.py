"""How each script reads: its length, the length of main(), and how far down the file a reader meets the algorithm's
core update (the first call of it in main() or in a stage function main() calls). The targets are the project's:
main() at most 100 lines, the core update within the first 40% of the file, and each script's total at most its
budget below. tests/test_shared_machinery.py holds the ones the scripts meet; this prints all of them, and where
each script's lines go: the shared machinery by feature, and the script's own code.

    python tests/structure.py
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# script: (the core update's function name, the line budget)
CORE = {"aihf_llm.py": ("reward_step", 1900), "rlhf_llm.py": ("ppo_update", 1650), "dpo_llm.py": ("dpo_batch_loss", 1250),
        "afd_llm.py": ("discriminator_loss", 1800), "aihf_mujoco.py": ("update_critic", 1150)}
MAIN_LINES, CORE_SHARE = 100, 0.40
# The machinery the scripts share, by feature: the top-level definitions that serve it.
FEATURES = {
    "fused LM-head losses": "fused_linear_loss _chunk_logits _logits_buffer _chunk_forward _chunk_grad_ _accumulate_ "
                            "_chunk_plan chunked_logps FusedLinearLoss ChunkedLogprobsEntropy policy_logprobs_entropy",
    "Triton kernels, bf16 accumulation": "LOGPROB_KERNEL TRITON_BLOCK_V _use_triton _lse_kernel _grad_kernel _triton_lse "
                                         "_triton_grad_ _adds_bf16_into_fp32",
    "several processes (DDP, FSDP2)": "Parallel forward_pass DISTRIBUTED WORLD_SIZE RANK LOCAL_RANK SHARDED init_distributed "
                                      "parallelize process_mesh sync_gradients this_rank gather global_sum global_mean "
                                      "token_share seed_share _comm_device same_everywhere barrier whole whole_state "
                                      "shard_optimizer_state load_device check_processes",
    "--eval_reward_model": "evaluate_stage response_texts reward_model_scores score_texts load_eval_reward_model "
                           "held_out_prompts check_eval_reward_model eval_mode",
    "conversational data": "split_conversation_pair split_conversations conversation_column render_chat encode_prompts",
    "dataset loading (files, hub, HH)": "load_table DATA_FILE_TYPES HH_ASSISTANT split_hh split_hh_pair text_column "
                                        "preference_pairs demonstrations",
    "run folder, checkpoints, logging": "Run summary_writer open_run save_checkpoint finish_run atomic_save write_json "
                                        "parse_args save_model new_optimizer optimizer_step status progress_bar setup_torch",
    "input validation": "RANGES check_same_tokenizer check_context embedded_task check_batches_fit check_track "
                        "check_ranges fail",
}


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


def definition_lines(script):
    """name -> lines of each top-level definition (decorators and the comment lines above it included), with the two
    blank lines that follow it."""
    lines = open(os.path.join(ROOT, script)).read().splitlines()
    out = {}

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Assign)):
                name = node.targets[0].id if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) \
                    else getattr(node, "name", None)
                start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
                while start and lines[start - 1].startswith("#") and not lines[start - 1].startswith(("# ---", "# ===")):
                    start -= 1
                if name:
                    out[name] = node.end_lineno - start + 2
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)

    visit(ast.parse("\n".join(lines)).body)
    return out


def feature_table():
    """Lines by feature (rows) and script (columns), the script's own definitions last: those no other LLM script has,
    with Args, main and validate_args."""
    llm = [s for s in CORE if s.endswith("_llm.py")]
    spans = {s: definition_lines(s) for s in llm}
    rows = [(f, [sum(spans[s].get(n, 0) for n in names.split()) for s in llm]) for f, names in FEATURES.items()]
    own = [sum(k for n, k in spans[s].items() if n in ("Args", "main", "validate_args")
               or not any(n in spans[t] for t in llm if t != s)) for s in llm]
    totals = [measure(s)[0] for s in llm]
    rest = [t - o - sum(counts[i] for _, counts in rows) for i, (t, o) in enumerate(zip(totals, own))]
    print("| lines by feature | " + " | ".join(llm) + " |")
    print("|---|" + "---|" * len(llm))
    for name, counts in rows + [("other shared code (models, generation, PPO, batching), docstring, imports", rest),
                                ("the script's own code", own), ("total", totals)]:
        print(f"| {name} | " + " | ".join(map(str, counts)) + " |")


if __name__ == "__main__":
    print(f"| script | lines (budget) | main() lines (<= {MAIN_LINES}) | core update | at line (share, <= {CORE_SHARE:.0%}) |")
    print("|---|---|---|---|---|")
    for script, (core, budget) in CORE.items():
        total, main_lines, first, share = measure(script)
        print(f"| {script} | {total} ({budget}) | {main_lines} | {core} | {first} ({share:.0%}) |" if first else
              f"| {script} | {total} ({budget}) | {main_lines} | {core} | not reached from main() |")
    print()
    feature_table()

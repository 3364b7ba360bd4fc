#!/usr/bin/env bash
# The GPU checks, in one run of under 9 min (the inner timeouts add up to 545 s):
#   1. the Triton kernels the LLM scripts share, compiled, against the torch chunk path (tests/test_triton_chunk.py),
#      and the bf16 weight gradient added into fp32 in place on CUDA;
#   2. the log-prob benchmark's GPU rows: bf16, naive vs the torch chunk path vs the Triton kernels, N = 16384 and 4096;
#   3. one AIHF-RL round of aihf_llm.py at a Pythia-160m shape, by phase, and its peak memory, fused vs naive LM head;
#   4. aihf_llm.py end to end on CUDA + bf16 (the Triton kernels picked by auto), tiny runs of rl, direct and selfplay;
#   5. dpo_llm.py at a Pythia-410M shape (random init): DPO tokens/s of a plain run against torchrun with DDP of world
#      size 1, and FSDP2's peak memory against DDP's (benchmarks/bench_distributed.py).
# The GPU machine needs datasets and tyro. The script installs them offline: every wheel in .whl/ goes into .site/
# (no index, no dependency resolution), so first put in .whl/ the wheels of datasets, tyro and those of their
# needs the machine lacks (dill, multiprocess, docstring-parser, typeguard), fetched for its Python with
# `pip download --no-deps --only-binary=:all: --python-version <X.Y> -d .whl <package>==<version>`.
# Then, from the repository root:   bash benchmarks/gpu_checks.sh      (OUT=<folder> writes there instead)
# Tables, metrics and the log land in $OUT (default benchmarks/results/); copy the figures to benchmarks/README.md
# with the GPU named. TASK_CACHE=<folder> reuses a built embedded-task base model (default: built on first use).
set -u
[ -d .site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
cache=${TASK_CACHE:-~/.cache/aihf}
runs=$(mktemp -d)
exec > >(tee "$out/gpu_log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_triton_chunk.py \
  tests/test_dpo_llm.py::test_bf16_weight_gradient_accumulates_in_fp32 || echo "kernel tests failed or timed out"
# Each bench writes its table after every round, so a run cut short by `timeout` still leaves the rounds it finished.
timeout 90 python3 benchmarks/bench_logprob.py --device cuda --dtype bfloat16 --triton --tokens 16384 \
  --chunks 1024 2048 4096 8192 --rounds 3 --repeats 10 --out "$out/logprob_gpu_bf16_n16384.md" || echo "N=16384 did not finish"
timeout 65 python3 benchmarks/bench_logprob.py --device cuda --dtype bfloat16 --triton --tokens 4096 \
  --chunks 256 1024 4096 --rounds 2 --repeats 10 --out "$out/logprob_gpu_bf16_n4096.md" || echo "N=4096 did not finish"
timeout 80 python3 benchmarks/bench_aihf_round.py --device cuda --bf16 --hidden 768 --layers 12 --vocabs 50304 \
  --memory_vocab 50304 --response_length 128 --chunk 4096 --rounds 3 --out "$out/aihf_round_gpu.md" || echo "bench_aihf_round did not finish"
for algo in rl direct selfplay; do
  timeout 40 python3 aihf_llm.py --algo "$algo" --start pi0 --bf16 --device cuda --task.cache_dir "$cache" --task.num_demos 160 \
    --task.num_prefs 96 --task.num_eval_prompts 32 --task.num_eval_prefs 64 --num_eval_demos 32 --batch_size 16 \
    --total_episodes 96 --rollout_batch_size 16 --num_epochs 1 --eval_every 0 --output_dir "$runs" --run_name "aihf_$algo" \
    && cp "$runs/aihf_$algo/metrics.json" "$out/aihf_${algo}_bf16_tiny_metrics.json" || echo "aihf_llm.py --algo $algo --bf16 failed"
done
timeout 130 python3 benchmarks/bench_distributed.py --device cuda --rounds 1 --out "$out/distributed_gpu.md" \
  || echo "bench_distributed did not finish (its table holds the runs it finished)"

#!/usr/bin/env bash
# The GPU checks, in one run of about 7 min (the inner timeouts add up to 570 s):
#   1. the Triton kernels of dpo_llm.py / rlhf_llm.py, compiled, against the torch chunk path (tests/test_triton_chunk.py);
#   2. the log-prob benchmark's GPU rows: bf16, naive vs the torch chunk path vs the Triton kernels;
#   3. one whole DPO step at Pythia-160m/410m shapes with the three LM-head paths (benchmarks/bench_dpo_step.py);
#   4. the scripts end to end on CUDA + bf16: `python dpo_llm.py --bf16` (the default run) and a tiny rlhf_llm.py run.
# The GPU machine needs datasets and tyro. The script installs them offline: every wheel in .whl/ goes into .site/
# (no index, no dependency resolution), so first put in .whl/ the wheels of datasets, tyro and those of their
# needs the machine lacks (dill, multiprocess, docstring-parser, typeguard), fetched for its Python with
# `pip download --no-deps --only-binary=:all: --python-version <X.Y> -d .whl <package>==<version>`.
# Then, from the repository root:   bash benchmarks/gpu_checks.sh      (OUT=<folder> writes there instead)
# Tables, metrics and the log land in $OUT (default benchmarks/results/); copy the figures to benchmarks/README.md
# with the GPU named.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
runs=$(mktemp -d)
exec > >(tee "$out/gpu_log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_triton_chunk.py || echo "triton test failed or timed out"
# Each bench writes its table after every round, so a run cut short by `timeout` still leaves the rounds it finished.
timeout 130 python3 benchmarks/bench_logprob.py --device cuda --dtype bfloat16 --triton --tokens 16384 \
  --chunks 1024 2048 4096 8192 --rounds 3 --repeats 10 --out "$out/logprob_gpu_bf16_n16384.md" || echo "N=16384 did not finish"
timeout 150 python3 benchmarks/bench_dpo_step.py --steps 20 --rounds 5 --out "$out/dpo_step_gpu.md" || echo "bench_dpo_step did not finish"
timeout 100 python3 benchmarks/bench_logprob.py --device cuda --dtype bfloat16 --triton --tokens 4096 \
  --chunks 256 1024 4096 --rounds 2 --repeats 10 --out "$out/logprob_gpu_bf16_n4096.md" || echo "N=4096 did not finish"
timeout 90 python3 dpo_llm.py --bf16 --device cuda --output_dir "$runs" --run_name dpo_bf16 \
  && cp "$runs/dpo_bf16/metrics.json" "$out/dpo_bf16_metrics.json" || echo "dpo_llm.py --bf16 failed or timed out"
timeout 40 python3 rlhf_llm.py --bf16 --device cuda --task.num_demos 96 --task.num_prefs 64 --task.num_eval_prompts 32 \
  --task.num_eval_prefs 32 --sft_epochs 1 --rm_epochs 1 --batch_size 16 --total_episodes 96 --rollout_batch_size 16 \
  --num_mini_batches 2 --num_ppo_epochs 2 --num_reward_norm_samples 32 --eval_every 0 \
  --output_dir "$runs" --run_name rlhf_bf16_tiny \
  && cp "$runs/rlhf_bf16_tiny/metrics.json" "$out/rlhf_bf16_tiny_metrics.json" || echo "rlhf_llm.py --bf16 failed or timed out"

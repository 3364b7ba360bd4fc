#!/usr/bin/env bash
# Everything a lent GPU session checks, as one device call (~5 min):
#   1. the GPU rows of issue 3's log-prob benchmark: bf16, naive vs the torch chunk path vs the Triton candidate
#      (benchmarks/triton_chunk.py), at N=4096 and N=16384 tokens;
#   2. the Triton kernels compiled on the GPU against the torch chunk path (tests/test_triton_chunk.py);
#   3. the scripts' CUDA + bf16 path end to end: `python dpo_llm.py --bf16` (the default run) and a tiny rlhf_llm.py run.
# Once, here:   PATH=$PWD/.venv/bin:$PATH bash ../shared/device/fetch-wheels.sh   (the GPU image lacks datasets and
#               tyro; the venv on PATH pins the versions; .whl/ stays from one session to the next)
# Then:         device run, carry [".whl"], command "bash benchmarks/gpu_checks.sh", timeout_s 540
# Tables, metrics and the log come back in $OUT; copy them to benchmarks/results/ and the README with the device named.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/.site:${PYTHONPATH:-} PYTHONUNBUFFERED=1
out=${OUT:-benchmarks/results}
runs=$(mktemp -d)
exec > >(tee "$out/gpu_log.txt") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# N=4096 with the CPU table's chunk sizes; N=16384 with larger chunks, which a GPU's matmuls may prefer.
# Each bench writes its table after every round, so a run cut short by `timeout` still leaves the rounds it finished.
for spec in "4096 256 512 1024 4096" "16384 1024 2048 4096 8192"; do
  set -- $spec; n=$1; shift
  timeout 130 python3 benchmarks/bench_logprob.py --device cuda --dtype bfloat16 --triton --tokens $n --chunks "$@" \
    --rounds 3 --repeats 10 --out "$out/logprob_gpu_bf16_n$n.md" || echo "N=$n did not finish"
done
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_triton_chunk.py || echo "triton test failed or timed out"
timeout 120 python3 dpo_llm.py --bf16 --device cuda --output_dir "$runs" --run_name dpo_bf16 \
  && cp "$runs/dpo_bf16/metrics.json" "$out/dpo_bf16_metrics.json" || echo "dpo_llm.py --bf16 failed or timed out"
timeout 60 python3 rlhf_llm.py --bf16 --device cuda --task.num_demos 96 --task.num_prefs 64 --task.num_eval_prompts 32 \
  --task.num_eval_prefs 32 --sft_epochs 1 --rm_epochs 1 --batch_size 16 --total_episodes 96 --rollout_batch_size 16 \
  --num_mini_batches 2 --num_ppo_epochs 2 --num_reward_norm_samples 32 --eval_every 0 \
  --output_dir "$runs" --run_name rlhf_bf16_tiny \
  && cp "$runs/rlhf_bf16_tiny/metrics.json" "$out/rlhf_bf16_tiny_metrics.json" || echo "rlhf_llm.py --bf16 failed or timed out"

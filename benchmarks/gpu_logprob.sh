#!/usr/bin/env bash
# The GPU rows of issue 3's log-prob benchmark, as one device call: bf16 on the lent GPU, naive vs the torch
# chunk path vs the Triton candidate (benchmarks/triton_chunk.py), at N=4096 and N=16384 tokens.
# Once, here:   PATH=$PWD/.venv/bin:$PATH bash ../shared/device/fetch-wheels.sh   (the GPU image lacks tyro, which
#               dpo_llm.py imports; the venv on PATH pins the versions; .whl/ stays from one session to the next)
# Then:         device run, carry [".whl"], command "bash benchmarks/gpu_logprob.sh", timeout_s 540
# The tables come back in $OUT; copy them to benchmarks/results/ and into the README with the device named.
set -eu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl
export PYTHONPATH=$PWD/.site:${PYTHONPATH:-}
out=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# N=4096 with the CPU table's chunk sizes; N=16384 with larger chunks, which a GPU's matmuls may prefer.
# Each bench writes its table after every round, so a run cut short by `timeout` still leaves round 1.
for spec in "4096 256 512 1024" "16384 1024 2048 4096"; do
  set -- $spec; n=$1; shift
  timeout 240 python3 benchmarks/bench_logprob.py --device cuda --dtype bfloat16 --triton --tokens $n --chunks "$@" \
    --rounds 2 --repeats 5 --out "$out/logprob_gpu_bf16_n$n.md" || echo "N=$n did not finish"
done

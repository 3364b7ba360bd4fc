#!/usr/bin/env bash
# Runs the aihf_mujoco.py jobs listed in a lane file one after another, resuming any that an earlier, interrupted
# run left unfinished (runs/<name>/checkpoint.pt) and skipping finished ones (runs/<name>/metrics.json with at least
# the line's --total_timesteps).
# One lane per core (PYTHON=... picks the interpreter):  nohup bash experiments/mujoco/queue.sh experiments/mujoco/lane_a.txt > runs/lane_a.log 2>&1 &
# A lane file holds one job per line: <run name> <aihf_mujoco.py flags...>; '#' starts a comment.
# Several lanes may run the same file: each job holds a lock (runs/<name>.lock) while it runs, so a second lane
# skips it and takes the next one; the lock dies with its process, so a killed lane leaves none behind.
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
mkdir -p runs
while read -r name flags; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  exec 9> "runs/$name.lock"
  if ! flock -n 9; then echo "[$(date +%T)] $name: another lane is running it, skipping"; continue; fi
  # checked under the lock, so a job another lane has just finished is skipped, not resumed; a finished run whose line
  # asks for more --total_timesteps than it ran (e.g. the same run again at 1M) is resumed from its last checkpoint
  if [[ -f "runs/$name/metrics.json" ]]; then
    ran=$(grep -o '"steps": [0-9]*' "runs/$name/metrics.json" | grep -o '[0-9]*$')
    want=$(grep -o -- '--total_timesteps [0-9]*' <<< "$flags" | grep -o '[0-9]*$')
    if [[ -z "$want" || "$ran" -ge "$want" ]]; then echo "[$(date +%T)] $name: done, skipping"; exec 9>&-; continue; fi
  fi
  resume=()
  [[ -f "runs/$name/checkpoint.pt" ]] && resume=(--resume "runs/$name/checkpoint.pt")
  echo "[$(date +%T)] $name: python aihf_mujoco.py --run_name $name $flags ${resume[*]}"
  # shellcheck disable=SC2086
  nice -n 10 "${PYTHON:-python}" aihf_mujoco.py --run_name "$name" $flags "${resume[@]}" < /dev/null >> "runs/$name.log" 2>&1 \
    || echo "[$(date +%T)] $name: FAILED (see runs/$name.log)"
  exec 9>&-  # the lock is released here, or by the kernel when this lane dies
done < "$1"

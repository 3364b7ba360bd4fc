#!/usr/bin/env bash
# Regenerates the tables, curves (CSV) and plots of results/mujoco/ and its summary.csv from the run folders in runs/
# (whichever of the lane_j.txt runs exist so far; runs still going are drawn as far as they got) and the curves of
# the earlier runs kept in the committed CSVs. Needs matplotlib. Run from anywhere:
#   bash experiments/mujoco/make_tables.sh
set -eu
cd "$(dirname "$0")/../.."
shopt -s nullglob
PY=${PYTHON:-python}
AIHF="aihf reward_steps=10 termination=absorbing demo_actions=sample reward_pretrain_steps=3000 bc_steps=10000->AIHF"
IPL="ipl reward_pretrain_steps=3000 bc_steps=10000->IPL"
R=results/mujoco
PLOT=experiments/mujoco/plot.py
# (the expert's return over the 10 evaluation episodes of the seed-1 runs, for a table of CSV curves alone)
for env in hopper:3125.7 halfcheetah:10034.0 walker2d:3930.0; do
  e=${env%%:*}
  runs=(runs/${e}_aihf_rec_s[123]/ runs/${e}_ipl_s[123]/)
  # the 300k comparison: AIHF as recommended and IPL (from runs/), RLHF (unchanged, its curves from the earlier CSV)
  $PY $PLOT "${runs[@]}" --csv $R/${e}_v5_aihf_vs_rlhf_300k.csv --csv_method rlhf --rename "rlhf->RLHF" \
    --rename "$AIHF" --rename "$IPL" --max_step 300000 --expert_return ${env#*:} --out $R/${e}_v5_main_300k
done
# Walker2d-v5 probes and ablations of the recommended setting (seed 1), beside the earlier runs
probes=(runs/walker2d_probe_*/ runs/walker2d_abl_*/ runs/walker2d_aihf_rec_s[1]/)
if (( ${#probes[@]} )); then
  $PY $PLOT "${probes[@]}" --csv $R/walker2d_v5_aihf_vs_rlhf_300k.csv --csv_method rlhf \
    --csv_method "aihf reward_steps=10" --rename "$AIHF" --max_step 300000 --summary "" --out $R/walker2d_v5_probes
fi
# One reward step per iteration instead of ten (seed 1, 150k) on Hopper-v5 and HalfCheetah-v5 (Walker2d's is above)
RS1="aihf termination=absorbing demo_actions=sample reward_pretrain_steps=3000 bc_steps=10000->AIHF, 1 reward step"
for e in hopper halfcheetah; do
  abl=(runs/${e}_aihf_rec_s[1]/ runs/${e}_abl_rs1_s[1]/)
  if (( ${#abl[@]} )); then
    $PY $PLOT "${abl[@]}" --rename "$AIHF" --rename "$RS1" --max_step 150000 --summary "" --out $R/${e}_v5_reward_steps
  fi
done
# Walker2d-v5, seed 1, towards 1M SAC steps
long=(runs/walker2d_aihf_rec_s[1]/ runs/walker2d_rlhf_1m_s[1]/)  # [1]: a glob, so a missing run drops out
if (( ${#long[@]} )); then
  $PY $PLOT "${long[@]}" --rename "$AIHF" --rename "rlhf->RLHF" --summary "" --out $R/walker2d_v5_1m_seed1
fi
# HalfCheetah-v5, seed 1, AIHF towards 1M SAC steps (the env where its 300k mean ends just under 90% of the expert)
long=(runs/halfcheetah_aihf_rec_s[1]/)
if (( ${#long[@]} )); then
  $PY $PLOT "${long[@]}" --rename "$AIHF" --summary "" --out $R/halfcheetah_v5_1m_seed1
fi
# The earlier runs (paper settings and the first variants), redrawn from their committed CSVs with last10 columns
for f in hopper_v5_aihf_vs_rlhf_300k:3125.7 hopper_v5_ablations_seed1:3125.7 halfcheetah_v5_aihf_vs_rlhf_300k:10034.0 \
         walker2d_v5_aihf_vs_rlhf_300k:3930.0; do
  $PY $PLOT --csv $R/${f%%:*}.csv --expert_return ${f#*:} --summary "" --out $R/${f%%:*}
done

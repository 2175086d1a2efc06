#!/usr/bin/env bash
# A 224 px sweep on the device machine of these sessions (no Ray there): `rwft sweep --backend
# local`, its trials one after another on the GPU, centralised and federated (rwft's in-process
# federation: the real ServerApp and ClientApps, no Ray). Prepare here first
# (bash benchmarks/gpu_prepare.sh), then, one call right after the other:
#
#   run(command="bash benchmarks/gpu_stage.sh", carry=[".gpudata"])
#   run(command="bash benchmarks/gpu_sweep.sh run examples/paper/recipe_ablation_gpu224.yaml \
#        grid.setting=[federated] 'grid.variant=[default,candidate]' 'grid.seed=[0,1,2,3,4]'",
#       carry=[".gpukit"], timeout_s=600)
#
# `run` takes a sweep file and its overrides; it adds data.root (the staged chest_xray),
# model.weights (the carried ImageNet weights), output_dir under $RUNS and --backend local.
# A run stopped at the call's limit continues with `resume` (finished trials are kept):
#   run(command="bash benchmarks/gpu_sweep.sh resume", carry=[".gpukit"])
# With EVAL=1, benchmarks/eval_ingredients.py then scores the evaluation-only ingredients on
# every trial's checkpoint (the seed ensembles on the default arm's). $OUT receives the
# sweep's tables and report (results.csv, summary.csv, comparisons.csv, auroc_tests.csv,
# report.md, sweep.yaml), every trial.json,
# eval_ingredients/ and log.txt; checkpoints stay on the machine.
# Rehearsed on CPU here with PY=.venv/bin/python and tiny overrides (benchmarks/RESULTS.md).
set -uo pipefail
OUT=${OUT:-/tmp/out}
RUNS=${RUNS:-/tmp/rwft-sweeps}
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/log.txt") 2>&1
action=${1:-}; shift || true
[ "$action" = run ] || [ "$action" = resume ] || { echo "usage: gpu_sweep.sh run SWEEP.yaml [overrides] | resume"; exit 2; }
source "$(dirname "$0")/gpu_env.sh"

rwft() { "$PY" -m rwft.core.cli "$@"; }
if [ "$action" = run ]; then
    sweep_file=$1; shift
    echo "$RUNS/$(basename "$sweep_file" .yaml)" > "$RUNS/latest"
    rwft sweep --backend local "$sweep_file" "data.root=$DATA" "model.weights=$WEIGHTS" \
        "output_dir=$(cat "$RUNS/latest")" "$@"
else
    [ -f "$RUNS/latest" ] || { echo "nothing to resume on this machine ($RUNS/latest is missing)"; exit 1; }
    rwft sweep --backend local --resume "$(cat "$RUNS/latest")"
fi
status=$?
sweep_dir=$(cat "$RUNS/latest")
if [ "${EVAL:-0}" = 1 ]; then
    "$PY" benchmarks/eval_ingredients.py "$sweep_dir" --data "$DATA" --variants all --out "$OUT/eval_ingredients"
fi
for f in results.csv summary.csv comparisons.csv auroc_tests.csv report.md sweep.yaml; do
    [ -f "$sweep_dir/$f" ] && cp "$sweep_dir/$f" "$OUT/"
done
mkdir -p "$OUT/trials"
for t in "$sweep_dir"/trials/*/trial.json; do [ -f "$t" ] && cp "$t" "$OUT/trials/$(basename "$(dirname "$t")").json"; done
exit $status

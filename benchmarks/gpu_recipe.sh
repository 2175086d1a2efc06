#!/usr/bin/env bash
# The recipe ablation (issue 10), CENTRALISED arms only, as a plain loop over `rwft train` on
# one GPU: chest_xray at 224 px, each recipe ingredient added ONE AT A TIME to the default
# recipe, over several seeds, then the evaluation-only ingredients (threshold policies,
# temperature, TTA, AdaBN, ensembles) on the default arm's checkpoints. The full ablation,
# centralised AND federated, with the sweep's paired statistics, is
# examples/paper/recipe_ablation_gpu224.yaml through benchmarks/gpu_sweep.sh; this loop is
# the quickest look at the centralised side. NOT run yet (no GPU lent so far).
#
# Prepare here (bash benchmarks/gpu_prepare.sh), then, one call right after the other:
#   run(command="bash benchmarks/gpu_stage.sh", carry=[".gpudata"])
#   run(command="ARMS='default class_weights' SEEDS='0 1 2 3 4' bash benchmarks/gpu_recipe.sh", carry=[".gpukit"])
#   EXTRA="data.image_size=32 train.epochs=2" PY=.venv/bin/python ...   # a CPU rehearsal of the script
#
# Cost (H200, bf16, batch 256, 10 epochs: ~55-65 s per run, RESULTS.md): 11 training arms x
# 5 seeds ~ 55 min, more than one 10-minute device call; split the arms over calls with ARMS
# (each call appends to $OUT/results.jsonl and skips runs whose metrics.json already exists
# under $RUNS, so rerunning the same command continues where a call stopped).
# Results: $OUT/results.jsonl (one line per run: arm, seed, test metrics, threshold policy,
# wall seconds), $OUT/eval_only.jsonl, $OUT/summary.md (mean +- sd per arm), $OUT/log.txt.
set -uo pipefail
OUT=${OUT:-/tmp/out}
RUNS=${RUNS:-/tmp/recipe_runs}
SEEDS=${SEEDS:-"0 1 2 3 4"}
mkdir -p "$OUT" "$RUNS"
exec > >(tee -a "$OUT/log.txt") 2>&1
source "$(dirname "$0")/gpu_env.sh"
weights_arg="model.weights=$WEIGHTS"

# Each arm = the default recipe plus ONE ingredient (the last arm: all of them).
# LP-FT keeps 10 epochs in all: 2 probe + 8 fine-tuning epochs at lr/10.
declare -A ARM=(
    [default]=""
    [aug_crop]="data.augmentation.crop_scale=[0.7,1.0]"
    [aug_gamma]="data.augmentation.gamma=0.25"
    [lpft]="train.lp_epochs=2 train.ft_lr_scale=0.1"
    [layer_decay]="train.layer_decay=0.75"
    [ema]="train.ema_decay=0.99"
    [label_smoothing]="train.label_smoothing=0.1"
    [class_weights]="train.class_balance=weights"
    [sampler]="train.class_balance=sampler"
    [cosine_warmup]="train.schedule=cosine train.warmup_epochs=1"
    [full]="data.augmentation.crop_scale=[0.7,1.0] data.augmentation.gamma=0.25 train.lp_epochs=2 train.ft_lr_scale=0.1 train.layer_decay=0.75 train.ema_decay=0.99 train.label_smoothing=0.1 train.class_balance=weights"
)
ORDER="default aug_crop aug_gamma lpft layer_decay ema label_smoothing class_weights sampler cosine_warmup full"
ARMS=${ARMS:-$ORDER}

for arm in $ARMS; do
    [ -n "${ARM[$arm]+set}" ] || { echo "unknown arm $arm (known: $ORDER)"; exit 2; }
    for seed in $SEEDS; do
        dir=$RUNS/${arm}_s$seed
        [ -f "$dir/metrics.json" ] && continue
        start=$SECONDS
        # shellcheck disable=SC2086  # arm settings are word lists on purpose
        "$PY" -m rwft.core.cli train examples/chest_xray_224.yaml data.root=$DATA $weights_arg \
            ${ARM[$arm]} ${EXTRA:-} seed=$seed output_dir=$dir || { echo "FAILED $arm seed $seed"; continue; }
        "$PY" - "$dir" "$arm" "$seed" "$((SECONDS - start))" "$OUT/results.jsonl" <<'PY'
import json, sys, pathlib
run, arm, seed, seconds, out = sys.argv[1:]
m = json.loads((pathlib.Path(run) / "metrics.json").read_text())
row = {"arm": arm, "seed": int(seed), "wall_s": int(seconds), "best_epoch": m["best_epoch"],
       "threshold_policy": m["threshold_policy"], "threshold": m["threshold"], "val_auroc": m["val"]["auroc"],
       "test": {k: v["value"] for k, v in m["test"].items() if isinstance(v, dict)}}
with open(out, "a") as f:
    f.write(json.dumps(row) + "\n")
print(arm, seed, {k: round(v, 3) for k, v in row["test"].items()}, seconds, "s")
PY
    done
done

# Evaluation-only ingredients on the default arm's checkpoints (no retraining).
evaluate_only() {  # name, then rwft evaluate arguments
    local name=$1; shift
    "$PY" -m rwft.core.cli evaluate "$@" train.bootstrap=200 --output "$RUNS/eval_$name.json" >/dev/null && \
        "$PY" -c "import json,sys; m=json.load(open('$RUNS/eval_$name.json')); print(json.dumps({'name': '$name', 'policy': m.get('threshold_policy'), 'auroc': m['auroc']['value'], 'accuracy': m['accuracy']['value'], 'sensitivity': m['sensitivity']['value'], 'specificity': m['specificity']['value'], 'transductive_accuracy': m.get('test_transductive', {}).get('test', {}).get('accuracy', {}).get('value')}))" \
        >> "$OUT/eval_only.jsonl"
}
if [[ " $ARMS " == *" default "* ]] || [ -n "${EVAL_ONLY:-}" ]; then
    for seed in $SEEDS; do
        best=$RUNS/default_s$seed/best.pt
        [ -f "$best" ] || continue
        evaluate_only "s${seed}_sens95" "$best" eval.threshold=sensitivity:0.95
        evaluate_only "s${seed}_spec90" "$best" eval.threshold=specificity:0.90
        evaluate_only "s${seed}_temperature" "$best" eval.calibration=temperature
        evaluate_only "s${seed}_tta4" "$best" eval.tta=4
        evaluate_only "s${seed}_adabn" "$best" eval.adabn=true
    done
    defaults=$(ls "$RUNS"/default_s*/best.pt 2>/dev/null)
    [ -n "$defaults" ] && evaluate_only ensemble_default $defaults
    fulls=$(ls "$RUNS"/full_s*/best.pt 2>/dev/null)
    [ -n "$fulls" ] && evaluate_only ensemble_full $fulls
fi

"$PY" - "$OUT" <<'PY'
import json, statistics, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()] if (out / "results.jsonl").exists() else []
lines = ["| arm | seeds | test AUROC | accuracy | sensitivity | specificity | wall s |", "|---|---|---|---|---|---|---|"]
for arm in dict.fromkeys(r["arm"] for r in rows):
    arm_rows = [r for r in rows if r["arm"] == arm]
    def cell(key):
        values = [r["test"][key] for r in arm_rows]
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"
    lines.append(f"| {arm} | {len(arm_rows)} | {cell('auroc')} | {cell('accuracy')} | {cell('sensitivity')} | "
                 f"{cell('specificity')} | {statistics.mean(r['wall_s'] for r in arm_rows):.0f} |")
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY

#!/usr/bin/env bash
# CPU sanity check of the training recipe (issue 10): PneumoniaMNIST at 28 px, 1,000 training
# images, 3 epochs, default recipe vs the full recipe, 2 seeds. Minutes on 2 idle cores.
#   bash benchmarks/cpu_recipe_sanity.sh [RUNS_DIR]     # prints one line per run, writes RUNS_DIR/summary.json
set -uo pipefail
RUNS=${1:-/tmp/rwft_recipe_sanity}
DATA=${DATA:-../shared/data/pneumoniamnist.npz}
RWFT=${RWFT:-rwft}
mkdir -p "$RUNS"
common="data.root=$DATA data.image_size=28 data.max_train_images=1000 train.epochs=3 train.batch_size=64
        train.lr=0.002 train.bootstrap=200 train.device=cpu"
full="data.augmentation.crop_scale=[0.7,1.0] data.augmentation.gamma=0.25 train.lp_epochs=1 train.ft_lr_scale=0.1
      train.layer_decay=0.75 train.ema_decay=0.9 train.label_smoothing=0.1 train.class_balance=weights"
for seed in 0 1; do
    for arm in default full; do
        settings=""
        [ "$arm" = full ] && settings=$full
        start=$SECONDS
        # shellcheck disable=SC2086
        $RWFT train $common $settings seed=$seed output_dir=$RUNS/${arm}_s$seed >/dev/null 2>&1 || echo "FAILED $arm $seed"
        echo "$arm $seed $((SECONDS - start))" >> "$RUNS/seconds.txt"
    done
done
python3 - "$RUNS" <<'PY'
import json, pathlib, sys
runs = pathlib.Path(sys.argv[1])
seconds = {tuple(l.split()[:2]): int(l.split()[2]) for l in (runs / "seconds.txt").read_text().splitlines()}
rows = []
for metrics in sorted(runs.glob("*_s*/metrics.json")):
    arm, seed = metrics.parent.name.rsplit("_s", 1)
    m = json.loads(metrics.read_text())
    row = {"arm": arm, "seed": int(seed), "wall_s": seconds.get((arm, seed)), "best_epoch": m["best_epoch"],
           "val_auroc": round(m["val"]["auroc"], 3), "threshold": round(m["threshold"], 3),
           **{k: round(m["test"][k]["value"], 3) for k in ("auroc", "accuracy", "sensitivity", "specificity")}}
    rows.append(row)
    print(row)
(runs / "summary.json").write_text(json.dumps(rows, indent=2))
PY

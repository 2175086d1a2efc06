#!/usr/bin/env bash
# Everything rwft measures on a lent GPU in one work call: throughput at 224 and 64 px, six
# chest_xray runs (ImageNet vs scratch, probe, conv1x1) and two PneumoniaMNIST 28->224 runs.
# Prepare here (bash benchmarks/gpu_prepare.sh), then, one call right after the other:
#   run(command="bash benchmarks/gpu_stage.sh", carry=[".gpudata"])
#   run(command="bash benchmarks/gpu_suite.sh", carry=[".gpukit"], timeout_s=600)
# (benchmarks/gpu_env.sh says what the device image lacks and how it travels.)
# Results land in $OUT: throughput_224.json, throughput_64.json, accuracy.json, log.txt.
# Arguments pick parts (default all): throughput, chest (6 chest_xray runs, ~5 min on an
# H200), mnist (2 PneumoniaMNIST 28->224 runs), e.g. `bash benchmarks/gpu_suite.sh throughput mnist`.
set -uo pipefail
parts=" ${*:-throughput chest mnist} "
wants() { [[ $parts == *" $1 "* ]]; }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
source "$(dirname "$0")/gpu_env.sh"

wants throughput && "$PY" benchmarks/train_throughput.py --image-size 224 --batch-size 256 --steps 20 --repeats 3 \
    --output "$OUT/throughput_224.json" --profile "$OUT/profile_224.txt"
wants throughput && "$PY" benchmarks/train_throughput.py --image-size 64 --batch-size 256 --steps 20 --repeats 3 \
    --output "$OUT/throughput_64.json"

weights=$WEIGHTS
chest="examples/chest_xray_224.yaml data.root=$DATA"
mnist="data.dataset=medmnist data.root=$NPZ data.image_size=224 train.epochs=12 train.batch_size=256"
run() {  # name, then rwft train arguments
    local name=$1; shift
    local start=$SECONDS
    "$PY" -m rwft.core.cli train "$@" output_dir=/tmp/runs/$name && \
        echo "$name $((SECONDS - start))" >> /tmp/runs/seconds.txt
}
mkdir -p /tmp/runs
touch /tmp/runs/seconds.txt
wants chest && run chest_imagenet_s0 $chest model.weights=$weights seed=0
wants chest && run chest_imagenet_s1 $chest model.weights=$weights seed=1
wants chest && run chest_scratch_s0 $chest model.pretrained=false seed=0
wants chest && run chest_scratch_s1 $chest model.pretrained=false seed=1
wants chest && run chest_probe_s0 $chest model.weights=$weights model.mode=probe seed=0
wants chest && run chest_conv1x1_s0 $chest model.weights=$weights model.adapter=conv1x1 seed=0
wants mnist && run mnist_imagenet_s0 $mnist model.weights=$weights seed=0
wants mnist && run mnist_scratch_s0 $mnist model.pretrained=false seed=0

"$PY" - "$OUT/accuracy.json" <<'PY'
import json, sys, pathlib
seconds = dict(line.split() for line in pathlib.Path("/tmp/runs/seconds.txt").read_text().splitlines())
summary = {}
for run in sorted(pathlib.Path("/tmp/runs").glob("*/metrics.json")):
    m = json.loads(run.read_text())
    summary[run.parent.name] = {
        "test": {k: v for k, v in m["test"].items()}, "threshold": m["threshold"],
        "best_epoch": m["best_epoch"], "val_auroc": m["val"]["auroc"], "wall_s": int(seconds.get(run.parent.name, -1)),
    }
pathlib.Path(sys.argv[1]).write_text(json.dumps(summary, indent=2))
for name, s in summary.items():
    t = s["test"]
    print(f"{name:22s} AUROC {t['auroc']['value']:.3f} ACC {t['accuracy']['value']:.3f} "
          f"best epoch {s['best_epoch']} {s['wall_s']} s")
PY

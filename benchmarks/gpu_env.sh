# Sourced by the device scripts (gpu_suite.sh, gpu_recipe.sh, gpu_sweep.sh): rwft on the device
# machine's bare image, which has torch, timm, scikit-learn, pandas, scipy, tensorboard,
# pluggy, rich, matplotlib, grpcio and protobuf, but no omegaconf, flwr, Ray or the weights
# package (device KINDS.md). Needs the two folders benchmarks/gpu_prepare.sh makes:
#   .gpudata/chest_xray.zip  carried by the `stage` call (gpu_stage.sh), unpacked into the
#                             ignored .gpustage/, which stays on the machine for later calls
#   .gpukit/                  carried by every later call: wheels, ImageNet weights, npz
# (together they are over one call's 64 MiB, so they travel in two calls; the second must
# come before the machine is released, within its idle window.)
# Sets PY, DATA (chest_xray), NPZ (PneumoniaMNIST), WEIGHTS, PYTHONPATH; fails with what to do.
export PYTHONUNBUFFERED=1 RWFT_LOAD_PLUGINS="" RWFT_CACHE_DIR=${RWFT_CACHE_DIR:-/tmp/rwft-cache}
PY=${PY:-python3}
DATA=${DATA:-.gpustage/chest_xray}
NPZ=${NPZ:-.gpukit/pneumoniamnist.npz}
WEIGHTS=${WEIGHTS:-.gpukit/efficientnet-lite0-fp16.pth}
[ -d "$DATA" ] || { echo "no $DATA on this machine: first run 'bash benchmarks/gpu_stage.sh' with carry=[\".gpudata\"] (or the machine was released in between)"; exit 1; }
[ -d .gpukit ] || { echo "no .gpukit: carry=[\".gpukit\"] (made by benchmarks/gpu_prepare.sh)"; exit 1; }
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpukit/*.whl || exit 1
# rwft without an install: the namespace package rwft made of links to its folders.
mkdir -p /tmp/rwftpkg/rwft
for d in core plugins server clients federation experiments; do ln -sfn "$PWD/$d" "/tmp/rwftpkg/rwft/$d"; done
export PYTHONPATH=/tmp/rwftpkg:/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
"$PY" -c "import torch, timm, flwr; print('torch', torch.__version__, 'timm', timm.__version__, 'flwr', flwr.__version__, 'cuda', torch.cuda.is_available())" || exit 1

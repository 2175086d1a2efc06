#!/usr/bin/env bash
# Run HERE (the CPU machine, with the project's .venv and ../shared beside the checkout) before
# the GPU scripts: it makes the two ignored folders they carry to the device machine.
#
#   bash benchmarks/gpu_prepare.sh
#
#   .gpudata/  chest_xray.zip (Kermany's 5,824 JPEGs, 49 MB, one file: the transfer counts
#              per-file overhead too)
#   .gpukit/   what the device image lacks for rwft's configs and in-process federation
#              (device KINDS.md lists what it has): omegaconf, flwr 1.42 and the five packages
#              it imports there (cryptography, pycryptodome, iterators, tomli-w, typer), as
#              Python 3.12 manylinux wheels; efficientnet-lite0-fp16.pth (the ImageNet weights,
#              stored as fp16 to save 9 MB; training runs in bf16, which is coarser); and
#              pneumoniamnist.npz. About 22 MB.
#
# One device call may carry 64 MiB with the repository (about 7.5 MB): the two folders travel
# in two calls (benchmarks/gpu_stage.sh carries .gpudata, every later call .gpukit;
# benchmarks/gpu_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
PY=${PY:-.venv/bin/python}
for folder in /.gpudata/ /.gpukit/ /.gpustage/; do
    grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
mkdir -p .gpudata .gpukit
[ -f .gpudata/chest_xray.zip ] || (cd "$SHARED" && "$OLDPWD/$PY" -m zipfile -c "$OLDPWD/.gpudata/chest_xray.zip" chest_xray)
cp -u "$SHARED/pneumoniamnist.npz" .gpukit/
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpukit flwr==1.42.0 cryptography==50.0.2 pycryptodome==3.24.1 iterators==0.0.2 tomli_w==1.2.0 \
    typer==0.20.1 omegaconf==2.4.0
"$PY" - <<'PY'
import torch
from rwft.plugins.backbones_efficientnet_lite import default_weights_path
from rwft.core.model import load_state_dict_file
source = default_weights_path("efficientnet_lite0")
state = {name: (t.half() if t.is_floating_point() else t) for name, t in load_state_dict_file(source).items()}
torch.save(state, ".gpukit/efficientnet-lite0-fp16.pth")
print("weights:", source, "-> .gpukit/efficientnet-lite0-fp16.pth (fp16)")
PY
du -sh .gpudata .gpukit

#!/usr/bin/env bash
# One federation server and three hospitals on this machine, each with its own X-rays.
#
#   examples/three_hospitals/run.sh [CHEST_XRAY_DIR] [WORK_DIR]
#
# Run from the repository root with rwft installed (its commands on PATH, or the
# project's .venv/bin). CHEST_XRAY_DIR defaults to ../shared/data/chest_xray; WORK_DIR
# (a new folder outside the repository) to a fresh one under /tmp. Ctrl-C stops everything.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
source_dir="${1:-../shared/data/chest_xray}"
work="${2:-$(mktemp -d /tmp/rwft-three-hospitals.XXXXXX)}"
bin="$(dirname "$(command -v rwft-server || echo .venv/bin/rwft-server)")"
port="${RWFT_PORT:-9092}"

echo "== 1. Each hospital gets its own folder of X-rays (symbolic links into $source_dir)"
"$bin/python" "$here/make_sites.py" "$source_dir" "$work/data"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

echo "== 2. Trust both ways: the server's TLS certificates (a private CA whose ca.crt every"
echo "      hospital gets), and each hospital's key pair (its .pub goes to the server)"
"$bin/rwft-server" certs --out "$work/certs"
mkdir -p "$work/site-keys"
for site in hospitalA hospitalB hospitalC; do
    "$bin/rwft-client" keygen --site "$site" --out "$work/$site-key"
    cp "$work/$site-key/$site.pub" "$work/site-keys/"
done

echo "== 3. The hospitals join over TLS with their keys (each checks its data first; logs in $work/hospital*.log)"
for site in hospitalA hospitalB hospitalC; do
    "$bin/rwft-client" join --site "$site" --server "127.0.0.1:$port" --data "$work/data/$site" \
        --root-certificates "$work/certs/ca.crt" --auth-key "$work/$site-key/$site.key" \
        --workdir "$work/$site" --image-size 64 --threads 1 > "$work/$site.log" 2>&1 &
    pids+=($!)
done

echo "== 4. The server starts the federation and waits for the three hospitals"
"$bin/rwft-server" start --config "$here/federation.yaml" data.root="$work/data/server" \
    output_dir="$work/run" federation.address="127.0.0.1:$port" federation.certificates="$work/certs" \
    federation.site_keys="$work/site-keys"

echo "== Done. Each hospital's own log and TensorBoard files stay in $work/hospital{A,B,C}/"
echo "   Whole federation: tensorboard --logdir $work/run/tb"

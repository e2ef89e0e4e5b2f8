#!/usr/bin/env bash
# Time to the first mask and peak RSS of reclmis-infer against the PyTorch peer, interleaved in one
# run (BENCHMARKS.md, "reclmis-infer"). usage:
#   benches/deploy_time.sh CHECKPOINT IMAGE PEER_PYTHON [ROUNDS] [BINARY...]
# CHECKPOINT: an exported f32 checkpoint (cargo run --release --example official_checkpoint, then
# reclmis export); IMAGE: a PNG of the model's size; PEER_PYTHON: a python with torch, safetensors,
# tokenizers and pillow; BINARY: reclmis-infer builds to time (default target/release-min/reclmis-infer).
# Each round: a plain read of the checkpoint into one fresh buffer (dd, the weight read time),
# each binary, then the peer (meta + assign, and plain). Needs ../shared/peer (the official computation).
set -euo pipefail
ck=$1 img=$2 py=$3 rounds=${4:-5}
shift $(( $# < 4 ? $# : 4 ))
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(target/release-min/reclmis-infer)
here=$(cd "$(dirname "$0")" && pwd)
peer=${RECLMIS_PEER_DIR:-$here/../../shared/peer}
note="Bilateral pulmonary infection, two infected areas, upper left lung and upper right lung."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq "$rounds"); do
  echo "== round $r, load average $(cut -d' ' -f1 /proc/loadavg)"
  /usr/bin/time -f "dd: %e s, peak RSS %M KiB" dd if="$ck" of=/dev/null bs=2G count=1 iflag=fullblock 2>&1 | grep "^dd:"
  for b in "${bins[@]}"; do
    rm -rf "$out/ours"
    /usr/bin/time -f "$b: %e s, peak RSS %M KiB" "$b" --checkpoint "$ck" --image "$img" --note "$note" \
      --out "$out/ours" --device cpu --timings 2>&1 | grep -v "mask.png$"
  done
  for mode in "" --plain; do
    rm -f "$out/peer.png"
    /usr/bin/time -f "peer ${mode:-meta+assign}: %e s, peak RSS %M KiB" "$py" "$here/peer_infer.py" "$peer" "$ck" "$img" "$note" "$out/peer.png" $mode 2>&1
  done
done

#!/usr/bin/env bash
# The prepared GPU run (issue 16): everything a first GPU session should measure, in one device
# call. Here (no GPU needed):
#
#   bash scripts/gpu_run.sh
#
# builds the test and program binaries with ../shared/gpu/bundle.sh (which copies them into
# .gpu/, ignored by git), packs them into .gpu/bundle.tar.xz and writes .gpu/full.sh. Packed, because
# a device call carries at most 64 MiB: the 49 stripped test binaries are 527 MB (each embeds every
# kernel), and one xz stream with a 256 MiB dictionary stores what they share once (47 MiB with
# the programs; about 3 minutes here). Then, through the device tool: `run` with command
# `bash .gpu/full.sh`, carry [".gpu"], timeout_s 600. On the GPU machine it unpacks, then runs,
# each step under its own time limit (seconds, overridable by the environment) so that the whole
# call fits the tool's 10 minutes:
#
#   1. the GPU tests: every test binary's ignored tests (the ones marked "needs a CUDA GPU": the
#      cuda proptests, the GPU-vs-emu cross-checks of every fragment layout, the golden model at
#      f32, tf32 and bf16), 4 threads                                        T_TESTS=210
#   2. compute-sanitizer memcheck and racecheck over the kernel tests' cuda cases (gemm, gemm_bf16,
#      conv, conv_bf16, attention, linear_relu), when the machine has it     T_SANITIZER=90
#   3. `reclmis bench --device cuda`: every kernel case at every precision, with PyTorch on the
#      same card as the peer when its python has torch with CUDA             T_BENCH=150
#   4. `reclmis bench-model --device cuda --precision bf16` against the official model in PyTorch
#      on the card with bf16 autocast (benches/peer_model_gpu.py; eager only: torch.compile takes
#      minutes per scenario, MODEL_COMPILE=1 adds it)                        T_MODEL=120
#
# and writes $OUT/summary.txt (what ran, what failed, how long each step took), the logs, and
# $OUT/bench.md: the kernel table in BENCHMARKS.md's form (median, PyTorch's median and the ratio,
# the H100 roofline time and the fraction of it reached). Nothing here has run on a GPU yet: the
# step limits are estimates (the cpu/emu suite's GPU tests are the bulk of step 1).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/gpu/bundle.sh
# the fixtures and the kernel peer travel with the working tree (tests/fixtures, benches/); the
# whole-model peer needs the shared PyTorch model beside it
cp benches/peer_model_gpu.py ../shared/peer/reclmis_torch.py .gpu/
echo "packing .gpu/bundle.tar.xz ..."
tar -C .gpu -cf - tests bin | xz -T1 -6 --lzma2=preset=6,dict=256MiB > .gpu/bundle.tar.xz
rm -rf .gpu/tests .gpu/bin .gpu/fixtures .gpu/run.sh
cat > .gpu/full.sh <<'EOF'
#!/usr/bin/env bash
# Written by scripts/gpu_run.sh. Runs on the GPU machine from the project root.
set -u
OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
# unpack (xz, or python's lzma where the machine has no xz)
if command -v xz > /dev/null; then
  xz -dc .gpu/bundle.tar.xz | tar -C .gpu -xf -
else
  python3 -c 'import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' \
    .gpu/bundle.tar.xz .gpu
fi
export RECLMIS_FIXTURES=$PWD/tests/fixtures RUST_BACKTRACE=1 PATH=$PWD/.gpu/bin:$PATH
export RECLMIS_PEER_SCRIPT=$PWD/benches/peer_torch.py
sum="$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$sum"
status=0
step() { # step NAME LIMIT CMD...: runs CMD under LIMIT seconds, logs to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS r=ok
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || { r="FAILED (rc $?)"; status=1; }
  echo "$name: $r in $((SECONDS - start)) s (limit $limit)" | tee -a "$sum"
}

# 1. the GPU tests (each binary's ignored tests)
deadline=$((SECONDS + ${T_TESTS:-210}))
for t in .gpu/tests/*; do
  left=$((deadline - SECONDS))
  if ((left <= 0)); then echo "tests: out of time before $(basename "$t")" | tee -a "$sum"; status=1; break; fi
  step "test-$(basename "$t")" "$left" "$t" --ignored --test-threads=4
  grep -E '^test result' "$OUT/test-$(basename "$t").log" | tail -1 | sed 's/^/    /' | tee -a "$sum"
done

# 2. compute-sanitizer over the kernels' cuda proptests (few cases: it runs each launch slowly)
san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [[ -n $san ]]; then
  deadline=$((SECONDS + ${T_SANITIZER:-90}))
  for name in gemm gemm_bf16 conv conv_bf16 attention linear_relu; do
    exe=$(ls .gpu/tests/"$name"-* 2>/dev/null | head -1)
    [[ -n $exe ]] || continue
    for tool in memcheck racecheck; do
      left=$((deadline - SECONDS))
      ((left > 0)) || { echo "sanitizer: out of time at $name $tool" | tee -a "$sum"; break 2; }
      PROPTEST_CASES=4 step "sanitizer-$tool-$name" "$left" "$san" --tool "$tool" --error-exitcode 1 \
        "$exe" --ignored --test-threads=1 cuda
    done
  done
else
  echo "sanitizer: compute-sanitizer not found on this machine (not run)" | tee -a "$sum"
fi

# 3. every kernel case at every precision, PyTorch on the same card when available
peer=()
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  peer=(--peer python3)
else
  echo "bench: no python3 with CUDA torch here: no peer" | tee -a "$sum"
fi
step bench "${T_BENCH:-150}" reclmis bench --device cuda --reps 20 --format json "${peer[@]}"
# the log holds the JSON (after any warnings): the table in BENCHMARKS.md's form
python3 - "$OUT/bench.log" > "$OUT/bench.md" <<'PY' || echo "bench.md: no table (see bench.log)" | tee -a "$sum"
import json, sys
text = open(sys.argv[1]).read()
d = json.loads(text[text.index("{"):])
m = d["machine"]
print(f"{m['device']}, commit {m['commit']}\n")
print("| op | shape | median | PyTorch median | ratio | H100 min | of H100 min |")
print("|---|---|---|---|---|---|---|")
us = lambda s: "" if s is None else f"{s * 1e6:.1f} µs"
for r in d["results"]:
    med, peer, h = r["median_s"], r.get("peer_median_s"), r.get("h100_min_s")
    ratio = f"{peer / med:.2f}x" if peer else ""
    frac = f"{100 * h / med:.0f}%" if h else ""
    print(f"| {r['op']} | {r['shape']} | {us(med)} | {us(peer)} | {ratio} | {us(h)} | {frac} |")
PY

# 4. the whole model at bf16 (autocast), against PyTorch's on the card when it is there
mpeer=()
if ((${#peer[@]})); then
  mpeer=(--peer python3 --peer-script "$PWD/.gpu/peer_model_gpu.py")
  [[ ${MODEL_COMPILE:-0} == 1 ]] || mpeer+=(--no-compile)
fi
step bench-model "${T_MODEL:-120}" reclmis bench-model --device cuda --precision bf16 --rounds 1 "${mpeer[@]}"

cat "$sum"
exit $status
EOF
chmod +x .gpu/full.sh
echo "prepared: .gpu/ is $(du -sm .gpu | cut -f1) MiB (a device call carries 64)"
echo "prepared: on the GPU machine run 'bash .gpu/full.sh' (device tool: carry [\".gpu\"], timeout_s 600)"

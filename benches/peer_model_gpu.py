"""The whole model in PyTorch on a GPU, for `reclmis bench-model --device cuda --peer python3
--peer-script benches/peer_model_gpu.py` (the shared peer's bench_cpu.py is cpu-only): the same
scenarios and JSON lines as bench_cpu.py, on the official model of ../shared/peer/reclmis_torch.py,
eager or under torch.compile, with bf16 autocast by default (what `--precision bf16` compares with).

usage:
  python peer_model_gpu.py --only infer_b1     # one scenario (what bench-model calls)
  python peer_model_gpu.py [--no-compile]      # every scenario, each in its own process

Environment: RECLMIS_PEER_DEVICE (cuda when available, else cpu), RECLMIS_PEER_PRECISION (bf16
autocast, default; or f32), RECLMIS_PEER_DIR (where reclmis_torch.py is: default this script's
folder, then ../../shared/peer from it). Timing: CUDA synchronised before and after each call;
peak_rss_mb is the process's RSS, peak_device_mb torch's peak allocated device memory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# the same 18 token ids as bench_cpu.py
IDS = [49406, 25599, 39132, 14774, 267, 1237, 26136, 5429, 267, 615, 1823, 16271, 537, 615,
       1155, 16271, 269, 49407]
SCENARIOS = ["infer_b1", "infer_b8", "train_b4"]


def import_peer():
    for d in (os.environ.get("RECLMIS_PEER_DIR"), HERE, os.path.join(HERE, "..", "..", "shared", "peer")):
        if d and os.path.isfile(os.path.join(d, "reclmis_torch.py")):
            sys.path.insert(0, d)
            import reclmis_torch
            return reclmis_torch
    sys.exit("peer_model_gpu.py: reclmis_torch.py not found (set RECLMIS_PEER_DIR)")


def run_one(name: str):
    import torch
    R = import_peer()
    dev = os.environ.get("RECLMIS_PEER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = os.environ.get("RECLMIS_PEER_PRECISION", "bf16")
    if precision not in ("bf16", "f32"):
        sys.exit(f"RECLMIS_PEER_PRECISION must be bf16 or f32, not {precision!r}")
    if dev == "cpu":
        torch.set_num_threads(2)
    torch.manual_seed(0)
    compile_ = name.endswith("_compile")
    base = name.replace("_compile", "")
    B = int(base.split("_b")[1])

    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type=dev, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    model = R.build("official").to(dev)  # f32 master weights, PyTorch default init
    x = torch.rand(B, 3, 224, 224, device=dev)
    ids = torch.tensor([IDS] * B, device=dev)
    tm = (ids != 0).long()
    if base.startswith("infer"):
        model.eval()

        def call():
            with torch.inference_mode(), autocast():
                return R.inference_forward(model, x, ids, tm)

        fn = torch.compile(call) if compile_ else call
        n_warm, n_rep = 2, 10
    else:
        masks = (torch.rand(B, 224, 224, device=dev) > 0.7).long()
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-4)
        gen = torch.Generator().manual_seed(0)  # the sampler draws on the cpu
        fwd = torch.compile(model.forward_train) if compile_ else model.forward_train

        def fn():
            opt.zero_grad(set_to_none=True)
            with autocast():
                out = fwd(x, ids, tm, masks, generator=gen)
            out["loss.total"].backward()
            opt.step()
            return out["loss.total"]

        n_warm, n_rep = 1, 5
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - t0
    for _ in range(n_warm - 1):
        fn()
    times = []
    for _ in range(n_rep):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(out.float()).all()
    res = {"scenario": name, "torch": torch.__version__, "device": dev, "precision": precision,
           "img": 224, "tokens": 18, "batch": B, "warmups": n_warm, "reps": n_rep,
           "median_s": round(statistics.median(times), 5), "min_s": round(min(times), 5),
           "max_s": round(max(times), 5), "first_call_s": round(first, 2),
           "per_image_s": round(statistics.median(times) / B, 5),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)}
    if dev == "cuda":
        res["device_name"] = torch.cuda.get_device_name()
        res["peak_device_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(res), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    if args.only:
        run_one(args.only)
        return
    scen = SCENARIOS + ([] if args.no_compile else [s + "_compile" for s in SCENARIOS])
    for s in scen:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--only", s],
                           capture_output=True, text=True)
        line = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode == 0 and line:
            print(line[-1], flush=True)
        else:
            print(json.dumps({"scenario": s, "status": "failed", "rc": r.returncode,
                              "stderr_tail": r.stderr[-1500:]}), flush=True)


if __name__ == "__main__":
    main()

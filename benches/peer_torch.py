"""The PyTorch peer for `reclmis bench --peer PYTHON`: times the same cases in the same run.

usage: python peer_torch.py --device cpu|cuda --reps N SPEC...
SPEC is one of: "mm M N K", "softmax R C", "relu B C H W", "add_bcast B C H W", "sum1 B C H W",
"transpose B R C", "permute0213 B T H D". Prints "SPEC<TAB>median seconds" per spec. cpu: 2 threads (the machine's cores),
f32, TF32 off on cuda so that "gemm" compares like with like (gemm_tc is the TF32 figure).
A peer, not a dependency: needs torch in a virtual environment outside the repository.
"""
import argparse
import statistics
import time

import torch


def build(spec, dev):
    kind, *dims = spec.split()
    d = [int(x) for x in dims]
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: (torch.rand(*s, generator=g) * 2 - 1).to(dev)  # noqa: E731
    if kind == "mm":
        a, b = r(d[0], d[2]), r(d[2], d[1])
        return lambda: torch.mm(a, b)
    if kind == "softmax":
        x = r(d[0], d[1])
        return lambda: torch.softmax(x, -1)
    if kind == "relu":
        x = r(*d)
        return lambda: torch.relu(x)
    if kind == "add_bcast":
        x, b = r(*d), r(1, d[1], 1, 1)
        return lambda: x + b
    if kind == "sum1":
        x = r(*d)
        return lambda: x.sum(1)
    if kind == "permute0213":
        x = r(*d)
        return lambda: x.permute(0, 2, 1, 3).contiguous()
    if kind == "transpose":
        x = r(*d)
        return lambda: x.transpose(1, 2).contiguous()
    raise SystemExit(f"unknown spec {spec}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("specs", nargs="*")
    a = ap.parse_args()
    if a.device == "cpu":
        torch.set_num_threads(2)
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for spec in a.specs:
        fn = build(spec, a.device)
        for _ in range(2):
            fn()
        times = []
        for _ in range(a.reps):
            if a.device == "cuda":
                flush.zero_()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                e.synchronize()
                times.append(s.elapsed_time(e) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        print(f"{spec}\t{statistics.median(times)}", flush=True)


if __name__ == "__main__":
    main()

"""The PyTorch peer for `reclmis bench --peer PYTHON`: times the same cases in the same run.

usage: python peer_torch.py --device cpu|cuda --reps N SPEC...
SPEC is one of: "mm M N K", "mm_bf16 M N K", "softmax R C", "relu B C H W", "add_bcast B C H W", "sum1 B C H W",
"transpose B R C", "permute0213 B T H D", "narrow R C START LEN", "adam N", "cast_bf16 B C HW",
"cast_f16 B C HW",
"ccl B L N D", "ccl_fb B L N D", "dice_bce B HW", "mse B HW", "maxpool B C HW", "maxpool_bf16 B C HW",
"upsample B C HW", "upsample_bf16 B C HW", "conv B CI CO HW K", "conv_bwd B CI CO HW K", "conv_bf16 B CI CO HW K", "conv_bwd_bf16 B CI CO HW K", "conv1x1_bf16 B CI CO HW" (no bias), "conv_cat B C1 C2 CO HW", "unet B C HW",
"bn_relu B C HW", "plam B C HW", "plam_bf16 B C HW" and "plam_fb_bf16 B C HW" (the gate under bf16 autocast on a bf16 s;
fb adds the backward to s and every weight),
"attn B H TQ S DH CAUSAL COND KEYMASK", "attn_fb ..." (the official composition: matmul, mask, softmax,
·(w + 1e-10), renormalise, matmul; fb adds the backward to q, k, v and w), "attn_bf16 ..." (bf16 q, k, v:
scaled_dot_product_attention with the mask as an additive bias when there is no condition, else the
composition in bf16), "attn_fb_bf16 ..." (the same, forward and backward),
"layer_norm R C", "layer_norm_bwd R C", "gelu R C", "quick_gelu R C", "linear R K N", "linear_relu R K N", "linear_relu_bf16 R K N", "embedding T V D". Prints "SPEC<TAB>median seconds" per spec. cpu: 2 threads (the machine's cores),
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
    if kind == "mm_bf16":
        a, b = r(d[0], d[2]).bfloat16(), r(d[2], d[1]).bfloat16()
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
    if kind in ("ccl", "ccl_fb"):
        # the official composition (einsum + amax), as in ../shared/peer/reclmis_torch.py
        B, L, N, D = d
        t, v = r(B, L, D), r(B, N, D)
        mask = torch.ones(B, L, device=dev)
        tw, vw = torch.softmax(r(B, L), -1), torch.softmax(r(B, N), -1)
        g = r(B, B)

        def ccl():
            tn = t / t.norm(dim=-1, keepdim=True)
            vn = v / v.norm(dim=-1, keepdim=True)
            S = torch.einsum("atc,bvc->abtv", tn, vn) * mask[:, None, :, None]
            t2v = (S.amax(dim=3) * tw[:, None, :]).sum(-1)
            v2t = (S.amax(dim=2) * vw[None, :, :]).sum(-1)
            return t2v, v2t

        if kind == "ccl":
            return lambda: ccl()[0]

        def fb():
            t.requires_grad_(True)
            v.requires_grad_(True)
            t2v, v2t = ccl()
            ((t2v + v2t) * g).sum().backward()
            t.grad = v.grad = None
        return fb
    if kind == "dice_bce":
        b, hw = d
        z, g = r(b, hw * hw), (r(b, hw * hw) > 0).float()

        def seg():
            p = torch.sigmoid(z)
            pw, gw = p * 0.5, g * 0.5
            dice = (1 - (2 * (pw * gw).sum(1) + 1e-5) / ((pw * pw).sum(1) + (gw * gw).sum(1) + 1e-5)).mean()
            bce = torch.nn.functional.binary_cross_entropy(p, g)
            return 0.5 * dice + 0.5 * bce
        return seg
    if kind == "mse":
        b, hw = d
        x, y = r(b, hw * hw), r(b, hw * hw)
        return lambda: torch.nn.functional.mse_loss(x, y)
    if kind == "conv1x1_bf16":  # the PLAM gate's 1x1 convolution, bf16 operands, no bias
        b, ci, co, hw = d
        x, w = r(b, ci, hw, hw).bfloat16(), r(co, ci, 1, 1).bfloat16()
        return lambda: torch.nn.functional.conv2d(x, w, None)
    if kind in ("conv", "conv_bwd", "conv_bf16", "conv_bwd_bf16"):
        b, ci, co, hw, k = d
        x, w, bias = r(b, ci, hw, hw), r(co, ci, k, k), r(co)
        if kind.endswith("_bf16"):  # bf16 operands, as reclmis' conv3x3_bf16 cases
            x, w, bias = x.bfloat16(), w.bfloat16(), bias.bfloat16()
            kind = kind[: -len("_bf16")]
        if kind == "conv":
            return lambda: torch.nn.functional.conv2d(x, w, bias, padding=k // 2)
        g = r(b, co, hw, hw).to(x.dtype)

        def bwd():  # input, weight and bias gradients, as reclmis' conv3x3_bwd case computes
            return torch.ops.aten.convolution_backward(g, x, w, [co], [1, 1], [k // 2, k // 2], [1, 1], False, [0, 0], 1,
                                                       [True, True, True])
        return bwd
    if kind == "unet":  # the same U-Net as reclmis' `unet` case (src/bench/unet.rs), eval mode
        b, c, hw = d
        nn = torch.nn

        def convbn(ci, co):
            return nn.Sequential(nn.Conv2d(ci, co, 3, padding=1), nn.BatchNorm2d(co), nn.ReLU())

        class Gate(nn.Module):
            def __init__(self, ch):
                super().__init__()
                self.ca, self.cm = nn.Conv2d(ch, ch, 1, bias=False), nn.Conv2d(ch, ch, 1, bias=False)
                self.fc = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))

            def forward(self, s):
                a = torch.relu(self.ca(s)).mean(1, keepdim=True)
                m = torch.relu(self.cm(s)).amax(1, keepdim=True)
                g = self.fc(torch.cat([a, m, a + m], 1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                return g * s

        w = [c, 2 * c, 4 * c, 8 * c, 8 * c]
        inc = convbn(3, c)
        downs = nn.ModuleList([nn.Sequential(nn.MaxPool2d(2), convbn(w[k - 1], w[k]), convbn(w[k], w[k])) for k in range(1, 5)])
        ups, below = [], w[4]
        for k in range(4, 0, -1):
            out = c if k == 1 else w[k - 2]
            ups.append(nn.ModuleList([Gate(w[k - 1]), convbn(w[k - 1] + below, out), convbn(out, out)]))
            below = out
        ups = nn.ModuleList(ups)
        outc = nn.Conv2d(c, 1, 1)
        net = nn.ModuleList([inc, downs, ups, outc]).to(dev).eval()
        x = r(b, 3, hw, hw)

        def fwd():
            with torch.no_grad():
                skips = [inc(x)]
                for dn in downs:
                    skips.append(dn(skips[-1]))
                cur = skips.pop()
                for gate, c1, c2 in ups:
                    s = skips.pop()
                    u = torch.nn.functional.interpolate(cur, scale_factor=2, mode="nearest")
                    cur = c2(c1(torch.cat([gate(s), u], 1)))
                return outc(cur)
        assert net is not None
        return fwd
    if kind == "conv_cat":  # the decoder's torch.cat then conv2d (3x3)
        b, c1, c2, co, hw = d
        x1, x2, w, bias = r(b, c1, hw, hw), r(b, c2, hw, hw), r(co, c1 + c2, 3, 3), r(co)
        return lambda: torch.nn.functional.conv2d(torch.cat([x1, x2], 1), w, bias, padding=1)
    if kind == "bn_relu":
        b, c, hw = d
        x, g, bt = r(b, c, hw, hw), r(c), r(c)
        rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
        return lambda: torch.relu(torch.nn.functional.batch_norm(x, rm, rv, g, bt, training=True))
    if kind == "plam":
        b, c, hw = d
        s_, wa, wm = r(b, c, hw, hw), r(c, c, 1, 1), r(c, c, 1, 1)
        l1, l2 = torch.nn.Linear(3, 6).to(dev), torch.nn.Linear(6, 1).to(dev)

        def gate():
            with torch.no_grad():
                a = torch.relu(torch.nn.functional.conv2d(s_, wa)).mean(1, keepdim=True)
                m = torch.relu(torch.nn.functional.conv2d(s_, wm)).amax(1, keepdim=True)
                f = torch.cat([a, m, a + m], 1).permute(0, 2, 3, 1)
                g = l2(torch.relu(l1(f))).permute(0, 3, 1, 2)
                return g * s_
        return gate
    if kind in ("plam_bf16", "plam_fb_bf16"):
        b, c, hw = d
        fb = kind == "plam_fb_bf16"
        # s as the previous autocast op stores it (bf16); the weights are f32 masters
        s_, wa, wm = r(b, c, hw, hw).bfloat16(), r(c, c, 1, 1), r(c, c, 1, 1)
        l1, l2 = torch.nn.Linear(3, 6).to(dev), torch.nn.Linear(6, 1).to(dev)
        ins = [s_, wa, wm, *l1.parameters(), *l2.parameters()]
        for t in ins:
            t.requires_grad_(fb)
        go = r(b, c, hw, hw).bfloat16()

        def gate_bf16():
            with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16), torch.set_grad_enabled(fb):
                a = torch.relu(torch.nn.functional.conv2d(s_, wa)).mean(1, keepdim=True)
                m = torch.relu(torch.nn.functional.conv2d(s_, wm)).amax(1, keepdim=True)
                f = torch.cat([a, m, a + m], 1).permute(0, 2, 3, 1)
                g = l2(torch.relu(l1(f))).permute(0, 3, 1, 2)
                out = g * s_
            if fb:
                return torch.autograd.grad(out, ins, go)
            return out
        return gate_bf16
    if kind in ("attn", "attn_fb", "attn_bf16", "attn_fb_bf16"):
        B, H, TQ, S, DH, causal, cond, keymask = d
        fb = kind in ("attn_fb", "attn_fb_bf16")
        q, k, v = r(B, H, TQ, DH), r(B, H, S, DH), r(B, H, S, DH)
        half = kind in ("attn_bf16", "attn_fb_bf16")
        if half:
            q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
        w = torch.softmax(r(B, S), -1)
        for t in (q, k, v, w):
            t.requires_grad_(fb)
        valid = torch.tensor([[j < 12 + b % 6 for j in range(S)] for b in range(B)], device=dev)
        bias = torch.zeros(B, 1, TQ, S, device=dev)
        if causal:
            bias = bias.masked_fill(torch.ones(TQ, S, dtype=torch.bool, device=dev).triu(1), float("-inf"))
        if keymask:
            bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        go = r(B, H, TQ, DH)

        if half:
            bias, go = bias.bfloat16(), go.bfloat16()
            if not cond and fb:
                return lambda: torch.autograd.grad(
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias), (q, k, v), go)
            if not cond:
                def sdpa():
                    with torch.no_grad():
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                return sdpa
            w = w.bfloat16()

        def attn():
            p = torch.softmax(q @ k.transpose(-1, -2) * DH ** -0.5 + bias, -1)
            if cond:
                p = p * (w[:, None, None, :] + 1e-10)
                p = p / p.sum(-1, keepdim=True)
            return p @ v

        if not fb:
            def fwd():
                with torch.no_grad():
                    return attn()
            return fwd
        return lambda: torch.autograd.grad(attn(), (q, k, v, w) if cond else (q, k, v), go)
    if kind in ("layer_norm", "layer_norm_bwd"):
        rows, c = d
        x, g, b, go = r(rows, c), r(c), r(c), r(rows, c)
        if kind == "layer_norm":
            return lambda: torch.nn.functional.layer_norm(x, (c,), g, b, 1e-5)
        # dx, dγ and dβ, as ours computes
        for t in (x, g, b):
            t.requires_grad_(True)
        y = torch.nn.functional.layer_norm(x, (c,), g, b, 1e-5)
        return lambda: torch.autograd.grad(y, (x, g, b), go, retain_graph=True)
    if kind == "gelu":
        x = r(*d)
        return lambda: torch.nn.functional.gelu(x)
    if kind == "quick_gelu":
        x = r(*d)
        return lambda: x * torch.sigmoid(1.702 * x)
    if kind == "linear":
        rows, k, n = d
        x, w, b = r(rows, k), r(n, k), r(n)
        return lambda: torch.nn.functional.linear(x, w, b)
    if kind in ("linear_relu", "linear_relu_bf16"):
        # eager PyTorch (the model's fc1 then F.relu): two kernels, as the official layer runs them
        rows, k, n = d
        x, w, b = r(rows, k), r(n, k), r(n)
        if kind == "linear_relu_bf16":
            x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
        return lambda: torch.relu(torch.nn.functional.linear(x, w, b))
    if kind == "embedding":
        toks, vocab, dim = d
        table = r(vocab, dim)
        ids = torch.tensor([(i * 7919) % vocab for i in range(toks)], device=dev)
        return lambda: torch.nn.functional.embedding(ids, table)
    if kind in ("maxpool", "maxpool_bf16"):
        b, c, hw = d
        x = r(b, c, hw, hw)
        if kind == "maxpool_bf16":
            x = x.bfloat16()
        return lambda: torch.nn.functional.max_pool2d(x, 2)
    if kind in ("upsample", "upsample_bf16"):
        b, c, hw = d
        x = r(b, c, hw, hw)
        if kind == "upsample_bf16":
            x = x.bfloat16()
        return lambda: torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    if kind == "transpose":
        x = r(*d)
        return lambda: x.transpose(1, 2).contiguous()
    if kind == "narrow":
        rows, cols, start, length = d
        x = r(rows, cols)
        return lambda: x[start:start + length].contiguous()
    if kind in ("cast_bf16", "cast_f16"):
        b, c, hw = d
        x = r(b, c, hw, hw)
        to = torch.bfloat16 if kind == "cast_bf16" else torch.float16
        return lambda: x.to(to)
    if kind == "adam":  # one step of torch.optim.Adam (in place; reclmis writes new buffers)
        p = torch.nn.Parameter(r(d[0]))
        p.grad = r(d[0])
        opt = torch.optim.Adam([p], lr=3e-4, foreach=False)
        return opt.step
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

"""Time the Triton VQLogits kernel against the same op in plain torch, and against a dense head, on one GPU.

    python ops/vqlogits/gpu/bench.py [--out results.json]

Qwen2.5-0.5B head shape (V=151936, d=896, K=2048), rows N = 1 (decode), 8, 128 (prefill chunk); with and without
a rank-8 low-rank term. Median of CUDA-event timings after warm-up, eager (launch overhead included) and
replayed from a CUDA graph (kernel time); parity as max |kernel - float64 formula|.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vqlogits_triton import torch_reference, vq_logits  # noqa: E402

V, D, K, R = 151936, 896, 2048, 8


def _time(fn, iters=200, warmup=20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return float(np.median(times))


def _time_graph(fn, iters=200) -> float:
    """Per-call time with launch overhead removed: ``fn`` captured 10 times in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    return _time(graph.replay, iters=iters // 10 + 5, warmup=3) / 10


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cpu").manual_seed(0)
    ct = (torch.randn(D, K, generator=g) / D**0.5).cuda()
    m = torch.randint(0, K, (V,), generator=g, dtype=torch.int32).cuda()
    b = torch.randn(V, generator=g).cuda()
    p = (torch.randn(D, R, generator=g) / D**0.5).cuda()
    u = torch.randn(R, V, generator=g).cuda()
    w = (torch.randn(D, V, generator=g) / D**0.5).cuda()  # a dense head of the same V x d
    rows = []
    for n in (1, 8, 128):
        h = torch.randn(n, D, generator=g).cuda()
        for lowrank in (False, True):
            extra = (p, u) if lowrank else ()
            out = torch.empty((n, V), device="cuda")
            got = vq_logits(h, ct, m, b, *extra, out=out)
            torch.cuda.synchronize()
            h64, ct64 = h.double(), ct.double()
            want = (h64 @ ct64)[:, m.long()] + b.double()
            if lowrank:
                want = want + (h64 @ p.double()) @ u.double()
            err = float((got.double() - want).abs().max())
            rows.append({
                "rows": n, "lowrank_rank": R if lowrank else 0, "max_abs_err_vs_fp64": err,
                "triton_ms": _time(lambda: vq_logits(h, ct, m, b, *extra, out=out)),
                "torch_ms": _time(lambda: torch_reference(h, ct, m, b, *extra)),
                "dense_matmul_ms": _time(lambda: h @ w),
                "graph_triton_ms": _time_graph(lambda: vq_logits(h, ct, m, b, *extra, out=out)),
                "graph_torch_ms": _time_graph(lambda: torch_reference(h, ct, m, b, *extra)),
                "graph_dense_matmul_ms": _time_graph(lambda: h @ w),
            })
            print(json.dumps(rows[-1]), flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": __import__("triton").__version__, "shape": {"V": V, "d": D, "K": K}, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

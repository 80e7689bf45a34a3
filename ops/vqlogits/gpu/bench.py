"""Time the Triton kernels of the VQ-Logits heads against the same heads in plain torch, and against a dense head,
on one GPU.

    python ops/vqlogits/gpu/bench.py [--head vqlogits|two-stage] [--out results.json]

Qwen2.5-0.5B head shape (V=151936, d=896); rows N = 1 (decode), 8, 128 (prefill chunk). Median of CUDA-event
timings after warm-up, eager (launch overhead included) and replayed from a CUDA graph (kernel time); parity as
max |kernel - float64 formula| (the two-stage kernel probing the clusters float64 scores pick, and how many
positions its own float32 routing probed otherwise: near-ties).

* ``vqlogits`` (the fused op): K=2048, with and without a rank-8 low-rank term.
* ``two-stage``: K=9496 equal clusters of 16, P = 296 and 593 (K/32, K/16), the exact rows in float32 and in
  bfloat16 (a GPU model's own table); the dense head is the same rows' N x d . d x V product.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vqlogits_triton import torch_reference, two_stage_logits, two_stage_reference, vq_logits  # noqa: E402

V, D, K, R = 151936, 896, 2048, 8
K2, CAP = 9496, 16  # the two-stage head: V = K2 * CAP


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


def _vqlogits_rows(g) -> list[dict]:
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
    return rows


def two_stage_problem(g, vocab: int, d: int, k: int, device: str) -> dict:
    """A random two-stage head of ``k`` equal clusters (vocab = k * cap) on ``device``: its tensors by the names
    ``two_stage_logits`` takes, the rows float32."""
    members = torch.randperm(vocab, generator=g).reshape(k, vocab // k).to(torch.int32)
    mapping = torch.empty(vocab, dtype=torch.int32)
    mapping[members.flatten().long()] = torch.arange(k, dtype=torch.int32).repeat_interleave(vocab // k)
    rows = torch.randn(vocab, d, generator=g) * d**-0.5 * 3
    codebook = torch.zeros(k, d).index_add_(0, mapping.long(), rows) / (vocab // k)  # the clusters' means
    t = {"codebook_t": codebook.t().contiguous(), "mapping": mapping, "bias": torch.randn(vocab, generator=g) * 0.1,
         "members": members, "rows": rows, "route_bias": torch.randn(k, generator=g) * 0.1}
    return {name: v.to(device) for name, v in t.items()}


def route_top(h: torch.Tensor, t: dict, probes: int) -> torch.Tensor:
    """The probed clusters [N, P] by float64 route scores."""
    z = h.double() @ t["codebook_t"].double()
    return torch.topk(z + t["route_bias"].double(), probes, dim=-1).indices


def two_stage_error(h: torch.Tensor, t: dict, top: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - the two-stage head in float64| where both probe the clusters ``top`` [N, P] (the kernel's own
    routing, from float32 scores, may pick the other of two near-tied clusters: counted apart)."""
    h64 = h.double()
    want = (h64 @ t["codebook_t"].double())[:, t["mapping"].long()] + t["bias"].double()
    ids = t["members"].long()[top].flatten(-2)
    exact = h64 @ t["rows"].double().t()  # every exact logit: one product, then the probed ones picked
    want.scatter_(-1, ids, exact.gather(-1, ids))
    return float((got.double() - want).abs().max())


def _two_stage_rows(g) -> list[dict]:
    t = two_stage_problem(g, V, D, K2, "cuda")
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        rows = t["rows"].to(dtype)
        t_rows = {**t, "rows": rows}  # the kernel reads the table as the model stores it
        for n in (1, 8, 128):
            h = torch.randn(n, D, generator=g).cuda()
            head = (h, t["codebook_t"], t["mapping"], t["bias"], t["members"], rows)  # what both forms take first
            for probes in (K2 // 32, K2 // 16):
                buf = torch.empty((n, V), device="cuda")
                kernel = lambda: two_stage_logits(*head, probes, route_bias=t["route_bias"], out=buf)  # noqa: E731
                ops = lambda: two_stage_reference(*head, probes, route_bias=t["route_bias"])  # noqa: E731
                dense = lambda: h.to(dtype) @ rows.t()  # noqa: E731
                top = route_top(h, t, probes)
                given = two_stage_logits(*head, probes, route_bias=t["route_bias"], top=top)
                kernel()
                torch.cuda.synchronize()
                out.append({
                    "rows": n, "probes": probes, "rows_dtype": str(dtype).removeprefix("torch."),
                    "logits_scored": K2 + probes * CAP, "max_abs_err_vs_fp64": two_stage_error(h, t_rows, top, given),
                    "positions_routed_otherwise": int(((buf - given).abs().amax(-1) > 1e-3).sum()),
                    "triton_ms": _time(kernel), "torch_ms": _time(ops), "dense_matmul_ms": _time(dense),
                    "graph_triton_ms": _time_graph(kernel), "graph_torch_ms": _time_graph(ops),
                    "graph_dense_matmul_ms": _time_graph(dense),
                })
                print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--head", choices=("vqlogits", "two-stage"), default="vqlogits")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cpu").manual_seed(0)
    if args.head == "vqlogits":
        shape, rows = {"V": V, "d": D, "K": K}, _vqlogits_rows(g)
    else:
        shape, rows = {"V": V, "d": D, "K": K2, "cluster_size": CAP}, _two_stage_rows(g)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "head": args.head,
              "triton": __import__("triton").__version__, "shape": shape, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Speed and quality of the map's clustering (vqexport.convert.clustering) on random but structured rows.

    python tools/kmeans_bench.py [--small-only] [--lloyd-big] [--json out.json]

Rows imitate an output layer: cluster centres on a rank-64 subspace plus a full-rank part, Zipf-like
cluster sizes, per-row noise (seeded). Two cases, each measured side by side in one run:

* small (N = 32768, d = 256, K = 1024): exact Lloyd (25 iterations at most) vs the default ``kmeans``,
  euclidean and spherical: seconds and inertia (mean squared distance of a row to its cluster's mean),
  and the inertia ratio default / Lloyd;
* Qwen2.5-0.5B head shape (V = 151936, d = 896, K = V/32 = 4748): the default ``kmeans`` and the
  size-balanced pass after it: seconds, inertia, pass counts. ``--lloyd-big`` adds exact Lloyd (10
  iterations; slow: minutes) for the ratio at this size too.

Absolute seconds depend on the machine and its load (printed with the thread count); a benchmark,
never a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqexport.convert.clustering import balanced, capacity, kmeans, lloyd  # noqa: E402


def structured(n: int, d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(64, d, generator=g) / 8
    centres = torch.randn(k, 64, generator=g) @ basis + 0.3 * torch.randn(k, d, generator=g)
    sizes = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 0.7
    labels = torch.multinomial(sizes / sizes.sum(), n, replacement=True, generator=g)
    scale = 0.15 + 0.2 * torch.rand(k, 1, generator=g)
    return centres[labels] + scale[labels] * torch.randn(n, d, generator=g)


def inertia(x: torch.Tensor, assign: torch.Tensor, k: int, spherical: bool = False) -> float:
    if spherical:
        x = torch.nn.functional.normalize(x, dim=1)
    counts = torch.bincount(assign, minlength=k).clamp(min=1)
    means = torch.zeros(k, x.shape[1]).index_add_(0, assign, x) / counts[:, None]
    return float((x - means[assign]).pow(2).sum(1).mean())


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def small_case(threads: int) -> dict:
    n, d, k = 32768, 256, 1024
    x = structured(n, d, k, seed=1)
    out = {"shape": {"N": n, "d": d, "K": k}}
    for spherical in (False, True):
        (_, a_l), s_l = timed(lambda: lloyd(x, k, iters=25, spherical=spherical))
        stats: dict = {}
        (_, a_f), s_f = timed(lambda: kmeans(x, k, spherical=spherical, stats=stats))
        i_l, i_f = inertia(x, a_l, k, spherical), inertia(x, a_f, k, spherical)
        out["spherical" if spherical else "euclidean"] = {
            "lloyd_s": round(s_l, 2), "lloyd_inertia": i_l, "kmeans_s": round(s_f, 2), "kmeans_inertia": i_f,
            "inertia_ratio": i_f / i_l, "speedup": s_l / s_f, "kmeans_passes": stats}
        print(f"small {'spherical' if spherical else 'euclidean'}: lloyd {s_l:.1f} s inertia {i_l:.4f} | kmeans {s_f:.1f} s "
              f"inertia {i_f:.4f} (ratio {i_f / i_l:.3f}, {s_l / s_f:.1f}x faster) {stats}", flush=True)
    return out


def big_case(with_lloyd: bool) -> dict:
    n, d = 151936, 896
    k = n // 32
    x = structured(n, d, k, seed=2)
    stats: dict = {}
    (c, a), s = timed(lambda: kmeans(x, k, stats=stats))
    out = {"shape": {"N": n, "d": d, "K": k}, "kmeans_s": round(s, 1), "kmeans_inertia": inertia(x, a, k), "kmeans_passes": stats,
           "codes_used": int(len(torch.unique(a)))}
    print(f"big: kmeans {s:.1f} s inertia {out['kmeans_inertia']:.4f} {stats}", flush=True)
    (_, ab), sb = timed(lambda: balanced(x, k, c))
    sizes = torch.bincount(ab, minlength=k)
    out["balanced"] = {"s": round(sb, 1), "inertia": inertia(x, ab, k), "max_size": int(sizes.max()), "capacity": capacity(n, k, 1.5),
                       "min_size": int(sizes.min()), "kmeans_max_size": int(torch.bincount(a, minlength=k).max())}
    print(f"big: balanced pass {sb:.1f} s inertia {out['balanced']['inertia']:.4f} max cluster {int(sizes.max())} "
          f"(cap {capacity(n, k, 1.5)}; k-means max {out['balanced']['kmeans_max_size']})", flush=True)
    if with_lloyd:
        (_, al), sl = timed(lambda: lloyd(x, k, iters=10))
        out["lloyd_s"], out["lloyd_inertia"] = round(sl, 1), inertia(x, al, k)
        out["inertia_ratio"], out["speedup"] = out["kmeans_inertia"] / out["lloyd_inertia"], sl / s
        print(f"big: lloyd (10 iterations) {sl:.1f} s inertia {out['lloyd_inertia']:.4f} (ratio {out['inertia_ratio']:.3f}, "
              f"{out['speedup']:.1f}x)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small-only", action="store_true")
    ap.add_argument("--big-only", action="store_true")
    ap.add_argument("--lloyd-big", action="store_true", help="also exact Lloyd at the big size (slow)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
                          "load_avg_1m": os.getloadavg()[0], "torch": torch.__version__}}
    if not args.big_only:
        result["small"] = small_case(args.threads)
    if not args.small_only:
        result["big"] = big_case(args.lloyd_big)
    result["machine"]["load_avg_1m_after"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

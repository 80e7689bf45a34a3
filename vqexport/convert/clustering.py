"""Clustering the rows of an output layer into K codes: k-means (euclidean or spherical), fast at V = 152k.

    lloyd(x, k)                   exact Lloyd's k-means: the reference (every iteration is a full N x K x d pass)
    kmeans(x, k)                  the default: the same objective, most passes in a principal-component projection
    balanced(x, k, centroids)     size-balanced assignment: no cluster above ceil(slack * N / K) rows
    cluster(x, k, method)         the methods ``convert`` offers, by name (METHODS on the rows alone, METRIC in the
                                  hidden states' metric, and EQUAL / EQUAL_METRIC for two-stage heads)
    state_metric(states)          the metric METRIC and EQUAL_METRIC cluster in: the square root of the hidden
                                  states' covariance

``kmeans`` projects the rows onto their top principal directions (``proj_dim``; randomized subspace
iteration on a row subsample), seeds with k-means++ on a row subsample in the top ``seed_dim`` of them
(approximate D^2 sampling, for speed: K sequential steps), then runs Lloyd passes whose assignment step
is done in the projected space (an N x K x proj_dim matmul instead of N x K x d; the centroids are means
of the full rows) until the projected inertia stops improving (relative change below ``tol``), and
finishes with exact float32 full-assignment passes until the assignment is stable or ``exact_iters``
are done (a Lloyd fixed point whenever that limit is not hit). ``balanced`` makes its proposals in the
same projected space. With d <= ``proj_dim`` there is no projection and ``kmeans`` is Lloyd with early
stopping. Every method fills empty clusters (the rows farthest from their centroid, taken from clusters
of two or more), so all K codes are used whenever N >= K; all are deterministic for a seed on a given
machine and thread count (no unseeded randomness; ties broken by index).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

METHODS = ("euclidean", "spherical", "balanced", "balanced-spherical")  # what --clustering auto tries on the rows alone
METRIC = "metric"  # euclidean in the metric of the hidden states (state_metric): auto tries it too when there is text
EQUAL = "equal-spherical"  # clusters of at most ceil(N / K) rows (all N / K when K divides N): a two-stage head's
# member table; spherical geometry
EQUAL_METRIC = "equal-metric"  # the same sizes, euclidean in the metric of the hidden states
NAMED = (*METHODS, METRIC, EQUAL, EQUAL_METRIC)  # every method cluster() takes by name
IN_METRIC = (METRIC, EQUAL_METRIC)  # the methods that need state_metric, and so the text's hidden states
CHUNK = 4096


PROJ_DIM = 128  # the principal directions the k-means passes and the balanced assignment work in

def _prep(rows: torch.Tensor, k: int, spherical: bool) -> torch.Tensor:
    n = rows.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    x = rows.detach().float().contiguous()
    return torch.nn.functional.normalize(x, dim=1) if spherical else x


def _nearest(x: torch.Tensor, sq: torch.Tensor, centroids: torch.Tensor, chunk: int = CHUNK):
    """(squared distance, index) of each row's nearest centroid, exact, in row chunks (bounded memory)."""
    c_sq = centroids.pow(2).sum(1)
    dist = torch.empty(x.shape[0])
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    for i in range(0, x.shape[0], chunk):
        d2 = torch.addmm(c_sq, x[i : i + chunk], centroids.T, alpha=-2).add_(sq[i : i + chunk, None])
        dist[i : i + chunk], idx[i : i + chunk] = d2.min(1)
    return dist.clamp_(min=0), idx


def _candidates(xp: torch.Tensor, cp: torch.Tensor, n_cand: int, chunk: int = CHUNK):
    """Squared distances [N, n_cand] (ascending) from each row of ``xp`` to its ``n_cand`` nearest rows of
    ``cp``, and their indices."""
    n_cand = min(n_cand, cp.shape[0])
    xp_sq, cp_sq = xp.pow(2).sum(1), cp.pow(2).sum(1)
    dist = torch.empty(xp.shape[0], n_cand)
    idx = torch.empty(xp.shape[0], n_cand, dtype=torch.int64)
    for i in range(0, xp.shape[0], chunk):
        d2 = torch.addmm(cp_sq, xp[i : i + chunk], cp.T, alpha=-2).add_(xp_sq[i : i + chunk, None])
        d2, cand = d2.topk(n_cand, dim=1, largest=False, sorted=False)
        d2, order = d2.clamp_(min=0).sort(dim=1, stable=True)
        dist[i : i + chunk], idx[i : i + chunk] = d2, torch.gather(cand, 1, order)
    return dist, idx


def _principal_directions(x: torch.Tensor, dim: int, g: torch.Generator, max_rows: int = 16384,
                          power_iters: int = 3) -> torch.Tensor | None:
    """[d, dim] orthonormal top principal directions of the rows (randomized subspace iteration on a row
    subsample), or None when dim >= d."""
    n, d = x.shape
    if dim >= d:
        return None
    sample = x[torch.randperm(n, generator=g)[:max_rows]] if n > max_rows else x
    centred = sample - sample.mean(0)
    q = torch.randn(d, min(d, dim + 16), generator=g)
    for _ in range(power_iters):
        q = torch.linalg.qr(centred.T @ (centred @ q)).Q
    b = centred @ q
    _, vecs = torch.linalg.eigh(b.T @ b)
    return (q @ vecs[:, -dim:].flip(1)).contiguous()


@contextlib.contextmanager
def _one_thread():
    """k-means++ is thousands of small sequential steps: one thread avoids paying a thread barrier for each."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _seed(xp: torch.Tensor, k: int, g: torch.Generator, max_rows: int) -> torch.Tensor:
    """Row indices of k-means++ seeds, chosen on a random subset of at most ``max_rows`` rows of ``xp``."""
    with _one_thread():
        return _seed_rows(xp, k, g, max_rows)


def _seed_rows(xp: torch.Tensor, k: int, g: torch.Generator, max_rows: int) -> torch.Tensor:
    n = xp.shape[0]
    pool = torch.randperm(n, generator=g)[:max_rows] if n > max_rows else torch.arange(n)
    xs = xp[pool].contiguous()
    sqs = xs.pow(2).sum(1)
    first = int(torch.randint(len(pool), (1,), generator=g))
    picks = [first]
    dist = (sqs - 2 * xs @ xs[first] + sqs[first]).clamp(min=0)
    for _ in range(1, k):
        cum = dist.cumsum(0)
        u = float(torch.rand(1, generator=g, dtype=torch.float64)) * float(cum[-1])
        idx = min(int(torch.searchsorted(cum, torch.tensor([u], dtype=cum.dtype), right=True)), len(pool) - 1)
        picks.append(idx)
        dist = torch.minimum(dist, (sqs - 2 * xs @ xs[idx] + sqs[idx]).clamp(min=0))
    return pool[picks]


def _fill_empty(dist: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """Give each empty cluster the farthest row (from its centroid) whose cluster has >= 2 rows. In place."""
    counts = torch.bincount(assign, minlength=k)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        far = dist.argsort(descending=True, stable=True).tolist()
        taken = 0
        for e in empty:
            while counts[assign[far[taken]]] <= 1:
                taken += 1
            p = far[taken]
            counts[assign[p]] -= 1
            assign[p] = e
            counts[e] = 1
            taken += 1
    return counts


def _means(x: torch.Tensor, assign: torch.Tensor, counts: torch.Tensor, k: int, spherical: bool) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1]).index_add_(0, assign, x)
    c = sums / counts.clamp(min=1)[:, None].to(x.dtype)
    return torch.nn.functional.normalize(c, dim=1) if spherical else c


def lloyd(rows: torch.Tensor, k: int, iters: int = 25, seed: int = 0, spherical: bool = False,
          max_seed_rows: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Lloyd's k-means, k-means++ seeded on a row subset. (centroids [k, d], assignment [N] int64)."""
    x = _prep(rows, k, spherical)
    g = torch.Generator().manual_seed(seed)
    sq = x.pow(2).sum(1)
    centroids = x[_seed(x, k, g, max(max_seed_rows, k))].clone()
    assign = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for _ in range(iters):
        dist, new = _nearest(x, sq, centroids)
        centroids = _means(x, new, _fill_empty(dist, new, k), k, spherical)
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


KMEANS_ITERS, KMEANS_EXACT_ITERS = 30, 2


def kmeans(rows: torch.Tensor, k: int, iters: int = KMEANS_ITERS, seed: int = 0, spherical: bool = False,
           max_seed_rows: int = 16384, proj_dim: int = PROJ_DIM, seed_dim: int = 32, tol: float = 1e-3,
           exact_iters: int = KMEANS_EXACT_ITERS,
           stats: dict | None = None, on_pass=None) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of rows [N, d] (module docstring). Returns (centroids [k, d], assignment [N] int64).

    ``stats``, if given, receives the pass counts; ``on_pass()`` is called after each pass (at most ``iters +
    exact_iters``)."""
    x, g, proj, xp = _projected(rows, k, spherical, seed, proj_dim)
    sq = x.pow(2).sum(1)
    xp_sq = xp.pow(2).sum(1)
    dims = proj.shape[1] if proj is not None else x.shape[1]
    centroids = x[_seed(xp[:, :seed_dim] if proj is not None else x, k, g, max(max_seed_rows, k))].clone()
    assign = torch.full((x.shape[0],), -1, dtype=torch.int64)
    approx = exact = 0
    prev = math.inf
    for _ in range(iters if proj is not None else 0):  # passes in the projected space
        dist, new = _nearest(xp, xp_sq, centroids @ proj)
        approx += 1
        if on_pass is not None:
            on_pass()
        inertia = float(dist.mean())
        centroids = _means(x, new, _fill_empty(dist, new, k), k, spherical)
        stable, assign, improved = torch.equal(new, assign), new, prev - inertia
        prev = inertia
        if stable or improved <= tol * inertia:
            break
    prev = math.inf
    for _ in range(exact_iters if proj is not None else iters):  # exact passes
        dist, new = _nearest(x, sq, centroids)
        exact += 1
        if on_pass is not None:
            on_pass()
        inertia = float(dist.mean())
        centroids = _means(x, new, _fill_empty(dist, new, k), k, spherical)
        stable, assign, improved = torch.equal(new, assign), new, prev - inertia
        prev = inertia
        if stable or (proj is None and improved <= tol * inertia):
            break
    if stats is not None:
        stats.update(approx_iters=approx, exact_iters=exact, seeded_rows=min(x.shape[0], max(max_seed_rows, k)),
                     projected_dim=dims)
    return centroids, assign


def _projected(rows: torch.Tensor, k: int, spherical: bool, seed: int, proj_dim: int):
    """(prepared rows x, the seeded generator after use, principal directions or None, x in those directions)."""
    x = _prep(rows, k, spherical)
    g = torch.Generator().manual_seed(seed)
    proj = _principal_directions(x, proj_dim, g)
    return x, g, proj, (x @ proj if proj is not None else x)


EQUAL_PASSES, BALANCED_PASSES = 6, 4  # the most passes of _equal_size and of the balanced methods


def balanced(rows: torch.Tensor, k: int, centroids: torch.Tensor, slack: float = 1.5, iters: int = BALANCED_PASSES, seed: int = 0,
             spherical: bool = False, proj_dim: int = PROJ_DIM, n_cand: int = 16, on_pass=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-balanced clustering starting from ``centroids``: no cluster has more than ``capacity(N, k, slack)``
    rows. Each pass assigns rows by proposals in order of distance (a row tries its nearest centroids first;
    a full centroid keeps its nearest proposers), rows whose ``n_cand`` candidates are all full go to their
    nearest centroid with room, then centroids move to the means of their rows."""
    x, _, proj, xp = _projected(rows, k, spherical, seed, proj_dim)
    cap = capacity(x.shape[0], k, slack)
    centroids = centroids.float().clone()
    assign = torch.full((x.shape[0],), -1, dtype=torch.int64)
    for _ in range(iters):
        cp = centroids @ proj if proj is not None else centroids
        dist, cand = _candidates(xp, cp, n_cand)
        new, row_dist = _capacity_assign(xp, cp, dist, cand, cap)
        counts = _fill_empty(row_dist, new, k)
        centroids = _means(x, new, counts, k, spherical)
        if on_pass is not None:
            on_pass()
        if torch.equal(new, assign):
            break
        assign = new
    return centroids, assign


def capacity(n: int, k: int, slack: float) -> int:
    """The most rows one cluster may hold in ``balanced``: ceil(slack * n / k), at least ceil(n / k)."""
    return max(math.ceil(slack * n / k - 1e-9), math.ceil(n / k))


def _capacity_assign(xp, cp, dist, cand, cap: int):
    """Deferred acceptance over each row's sorted candidates, then the nearest non-full centroid for the rest."""
    n, c = cand.shape
    k = cp.shape[0]
    dist_np, cand_np = dist.numpy(), cand.numpy()
    assign = np.full(n, -1, dtype=np.int64)
    row_dist = np.zeros(n, dtype=np.float32)
    held = np.zeros(k, dtype=np.int64)
    ptr = np.zeros(n, dtype=np.int64)
    rows = np.arange(n)
    while len(rows):
        ks, ds = cand_np[rows, ptr[rows]], dist_np[rows, ptr[rows]]
        order = np.lexsort((rows, ds, ks))  # by centroid, then distance, then row index
        rows, ks, ds = rows[order], ks[order], ds[order]
        first = np.r_[0, np.flatnonzero(np.diff(ks)) + 1]
        rank = np.arange(len(ks)) - np.repeat(first, np.diff(np.r_[first, len(ks)]))
        ok = rank < cap - held[ks]
        assign[rows[ok]], row_dist[rows[ok]] = ks[ok], ds[ok]
        np.add.at(held, ks[ok], 1)
        rows = np.sort(rows[~ok])
        ptr[rows] += 1
        rows = rows[ptr[rows] < c]
    rest = torch.from_numpy(np.flatnonzero(assign < 0))
    if len(rest):
        sq, c_sq = xp.pow(2).sum(1), cp.pow(2).sum(1)
        best, _ = _nearest(xp[rest], sq[rest], cp)
        rest = rest[best.argsort(stable=True)]  # the rows nearest to some centroid choose first
        for i in range(0, len(rest), CHUNK):
            part = rest[i : i + CHUNK]
            d2 = torch.addmm(c_sq, xp[part], cp.T, alpha=-2).add_(sq[part, None]).clamp_(min=0).numpy()
            for r, row in zip(part.tolist(), d2):
                row[held >= cap] = np.inf
                j = int(row.argmin())
                assign[r], row_dist[r] = j, row[j]
                held[j] += 1
    return torch.from_numpy(assign), torch.from_numpy(row_dist)


@torch.no_grad()
def state_metric(states: torch.Tensor, chunk: int = 65536, progress=None) -> torch.Tensor:
    """S [d, d], the symmetric square root of the covariance of the hidden states [N, d] (float64 sums).

    A token's tail logit error at a hidden state h is ``(W[v] - C[M[v]]) · (h - h̄)`` once its bias is set at the
    mean state h̄, so its mean square over the states is ``||(W[v] - C[M[v]]) S||²``: euclidean k-means on the rows
    ``W S`` minimises exactly the tail's mean square logit error, where spherical k-means on ``W`` weighs every
    direction alike, including those the states never take. ``progress(done, total)`` counts states."""
    n, d = states.shape
    if n < 2:
        raise ValueError("state_metric needs at least two hidden states")
    mean = sum(states[i : i + chunk].double().sum(0) for i in range(0, n, chunk)) / n  # no float64 copy of all states
    cov = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, chunk):
        if progress is not None:
            progress(i, n)
        x = states[i : i + chunk].double() - mean
        cov.addmm_(x.T, x)
    if progress is not None:
        progress(n, n)
    vals, vecs = torch.linalg.eigh(cov / n)
    return ((vecs * vals.clamp(min=0).sqrt()) @ vecs.T).float()


def _equal_size(rows: torch.Tensor, k: int, centroids: torch.Tensor, seed: int, spherical: bool, on_pass=None) -> torch.Tensor:
    """No cluster above ceil(N / K), starting from ``centroids``: with N a multiple of K every cluster has exactly N / K
    rows (EQUAL, EQUAL_METRIC)."""
    return balanced(rows, k, centroids, slack=1.0, iters=EQUAL_PASSES, seed=seed, spherical=spherical, on_pass=on_pass)[1]


def cluster(rows: torch.Tensor, k: int, method: str, seed: int = 0, _cache: dict | None = None,
            metric: torch.Tensor | None = None, progress=None) -> torch.Tensor:
    """Assignment [N] int64 of the rows to k codes by ``method`` (one of NAMED). ``_cache`` (a dict shared across
    calls on the same rows and metric) lets the balanced and equal-size variants start from the k-means of their
    geometry. METRIC and EQUAL_METRIC need ``metric`` [d, d] (``state_metric``) and cluster the rows ``W S``.
    ``progress(done, most)``: passes over the rows so far, of the most this method can take (it may stop early,
    when the assignment settles; the last call says done = most)."""
    if method not in NAMED:
        raise ValueError(f"unknown clustering method {method!r}; known: {', '.join(NAMED)}")
    base = "metric" if method in IN_METRIC else "spherical" if method.endswith("spherical") else "euclidean"
    if base == "metric":
        if metric is None or metric.shape != (rows.shape[1], rows.shape[1]):
            raise ValueError(f"{method} needs a [{rows.shape[1]}, {rows.shape[1]}] metric (state_metric)")
        rows = rows.detach().float() @ metric
    spherical = base == "spherical"
    cache = _cache if _cache is not None else {}
    most = {"kmeans": 0 if base in cache else KMEANS_ITERS + KMEANS_EXACT_ITERS,
            "balanced": EQUAL_PASSES if method.startswith("equal-") else BALANCED_PASSES if method.startswith("balanced") else 0}
    done, total = dict.fromkeys(most, 0), max(1, sum(most.values()))

    def report(kind: str | None = None) -> None:
        if kind is not None:
            done[kind] = min(done[kind] + 1, most[kind])
        if progress is not None:
            progress(sum(done.values()), total)

    report()
    if base not in cache:
        cache[base] = kmeans(rows, k, seed=seed, spherical=spherical, on_pass=lambda: report("kmeans"))
    done["kmeans"] = most["kmeans"]  # however early it settled
    if method.startswith("equal-"):
        out = _equal_size(rows, k, cache[base][0], seed, spherical=spherical, on_pass=lambda: report("balanced"))
    elif method.startswith("balanced"):
        out = balanced(rows, k, cache[base][0], seed=seed, spherical=spherical, on_pass=lambda: report("balanced"))[1]
    else:
        out = cache[base][1]
    if progress is not None:
        progress(total, total)
    return out

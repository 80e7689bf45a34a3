"""Turning a dense output layer into a VQ-Logits head: cluster its rows, then fit the bias.

    M        = kmeans(W, K)                 # which codebook row stands in for each token
    C[k]     = mean of W[v] over M[v] = k
    b[v]     = b_dense[v] + (W[v] - C[M[v]]) · h̄    # h̄: mean final hidden state
"""

from __future__ import annotations

import torch


def _nearest(x: torch.Tensor, sq: torch.Tensor, centroids: torch.Tensor, chunk: int = 4096):
    """(squared distance, index) of each row's nearest centroid, computed in row chunks (bounded memory)."""
    c_sq = centroids.pow(2).sum(1)
    dist = torch.empty(x.shape[0])
    idx = torch.empty(x.shape[0], dtype=torch.int64)
    for i in range(0, x.shape[0], chunk):
        d2 = sq[i : i + chunk, None] - 2 * x[i : i + chunk] @ centroids.T + c_sq
        dist[i : i + chunk], idx[i : i + chunk] = d2.min(1)
    return dist.clamp_(min=0), idx


def _seed(x: torch.Tensor, sq: torch.Tensor, k: int, g: torch.Generator, max_rows: int) -> torch.Tensor:
    """k-means++ seeding, on a random subset of at most ``max_rows`` rows when there are more."""
    n = x.shape[0]
    pool = torch.randperm(n, generator=g)[:max_rows] if n > max_rows else torch.arange(n)
    xs, sqs = x[pool], sq[pool]
    first = int(torch.randint(len(pool), (1,), generator=g))
    picks = [first]
    dist = (sqs - 2 * xs @ xs[first] + sqs[first]).clamp(min=0)
    for _ in range(1, k):
        total = float(dist.sum())
        idx = int(torch.multinomial(dist / total, 1, generator=g)) if total > 0 else int(torch.randint(len(pool), (1,), generator=g))
        picks.append(idx)
        dist = torch.minimum(dist, (sqs - 2 * xs @ xs[idx] + sqs[idx]).clamp(min=0))
    return xs[picks].clone()


def kmeans(rows: torch.Tensor, k: int, iters: int = 25, seed: int = 0, max_seed_rows: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows [N, d] (k-means++ seeding). Returns (centroids [k, d], assignment [N] int64).

    Distances are computed in row chunks, so memory stays O(chunk x k) even at V = 152k, K = 4.7k; seeding
    runs on at most ``max_seed_rows`` rows. Empty clusters are re-seeded with the points farthest from their
    centroid, so every code is used whenever N >= k. Deterministic for a seed.
    """
    n = rows.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    g = torch.Generator().manual_seed(seed)
    x = rows.detach().float().contiguous()
    sq = (x * x).sum(1)
    centroids = _seed(x, sq, k, g, max(max_seed_rows, k))
    assign = torch.full((n,), -1, dtype=torch.int64)
    for _ in range(iters):
        dist, new_assign = _nearest(x, sq, centroids)
        counts = torch.bincount(new_assign, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = dist.argsort(descending=True)
            taken = 0
            for e in empty.tolist():
                while counts[new_assign[far[taken]]] <= 1:
                    taken += 1
                p = far[taken]
                counts[new_assign[p]] -= 1
                new_assign[p] = e
                counts[e] = 1
                taken += 1
        sums = torch.zeros_like(centroids).index_add_(0, new_assign, x)
        centroids = sums / counts.clamp(min=1)[:, None].to(x.dtype)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centroids, assign


def head_from_assignment(weight: torch.Tensor, bias: torch.Tensor | None, assign: torch.Tensor, k: int,
                         mean_hidden: torch.Tensor):
    """(codebook [K, d], map [V] int32, bias [V]) for a given token -> code assignment of the dense rows."""
    w = weight.detach().float()
    counts = torch.bincount(assign, minlength=k).clamp(min=1).to(w.dtype)
    codebook = torch.zeros(k, w.shape[1]).index_add_(0, assign, w) / counts[:, None]
    new_bias = (w - codebook[assign]) @ mean_hidden.float()
    if bias is not None:
        new_bias = new_bias + bias.detach().float()
    return codebook, assign.to(torch.int32), new_bias


def vq_head_from_dense(weight: torch.Tensor, bias: torch.Tensor | None, k: int, mean_hidden: torch.Tensor, seed: int = 0):
    """(codebook [K, d], map [V] int32, bias [V]) approximating the dense head ``h @ W.T + b`` (k-means map)."""
    _, assign = kmeans(weight, k, seed=seed)
    return head_from_assignment(weight, bias, assign, k, mean_hidden)

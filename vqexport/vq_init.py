"""Turning a dense output layer into a VQ-Logits head: cluster its rows, then fit the bias.

    M        = kmeans(W, K)                 # which codebook row stands in for each token
    C[k]     = mean of W[v] over M[v] = k
    b[v]     = b_dense[v] + (W[v] - C[M[v]]) · h̄    # h̄: mean final hidden state
"""

from __future__ import annotations

import torch


def kmeans(rows: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on rows [N, d] (k-means++ seeding). Returns (centroids [k, d], assignment [N] int64).

    Empty clusters are re-seeded with the points farthest from their centroid, so every code is used
    whenever N >= k.
    """
    n = rows.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    g = torch.Generator().manual_seed(seed)
    x = rows.detach().float()
    sq = (x * x).sum(1)
    centroids = x[torch.randint(n, (1,), generator=g)].clone()
    dist = (sq - 2 * x @ centroids[0] + centroids[0].pow(2).sum()).clamp(min=0)
    picks = []
    for _ in range(1, k):
        total = float(dist.sum())
        idx = int(torch.multinomial(dist / total, 1, generator=g)) if total > 0 else int(torch.randint(n, (1,), generator=g))
        picks.append(idx)
        c = x[idx]
        dist = torch.minimum(dist, (sq - 2 * x @ c + c.pow(2).sum()).clamp(min=0))
    if picks:
        centroids = torch.cat([centroids, x[picks]], 0)
    assign = torch.zeros(n, dtype=torch.int64)
    for _ in range(iters):
        d2 = sq[:, None] - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        new_assign = d2.argmin(1)
        counts = torch.bincount(new_assign, minlength=k)
        empty = torch.nonzero(counts == 0).flatten()
        if len(empty):
            far = d2.gather(1, new_assign[:, None]).squeeze(1).argsort(descending=True)
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

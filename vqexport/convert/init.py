"""Turning a dense output layer into a VQ-Logits head: cluster its rows, then fit the bias.

    M        = kmeans(W, K)                 # which codebook row stands in for each token (vqexport.convert.clustering)
    C[k]     = mean of W[v] over M[v] = k
    b[v]     = b_dense[v] + (W[v] - C[M[v]]) · h̄    # h̄: mean final hidden state
"""

from __future__ import annotations

import torch

from .clustering import kmeans


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

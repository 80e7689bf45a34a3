"""Turning a dense output layer into a VQ-Logits head: cluster its rows, then fit the bias.

    M        = kmeans(W, K)                 # which codebook row stands in for each token (vqexport.convert.clustering)
    C[k]     = mean of W[v] over M[v] = k
    b[v]     = b_dense[v] + (W[v] - C[M[v]]) · h̄    # h̄: mean final hidden state
"""

from __future__ import annotations

import torch


def tail_bias(weight: torch.Tensor, codebook: torch.Tensor, mapping: torch.Tensor, dense_bias: torch.Tensor | None,
              mean_hidden: torch.Tensor) -> torch.Tensor:
    """b[v] = b_dense[v] + (W[v] - C[M[v]]) · h̄: each token's VQ logit equals its dense logit at the mean state h̄."""
    bias = (weight - codebook[mapping]) @ mean_hidden.float()
    return bias if dense_bias is None else bias + dense_bias.detach().float()


def head_from_assignment(weight: torch.Tensor, bias: torch.Tensor | None, assign: torch.Tensor, k: int,
                         mean_hidden: torch.Tensor):
    """(codebook [K, d], map [V] int32, bias [V]) for a given token -> code assignment of the dense rows."""
    w = weight.detach().float()
    counts = torch.bincount(assign, minlength=k).clamp(min=1).to(w.dtype)
    codebook = torch.zeros(k, w.shape[1]).index_add_(0, assign, w) / counts[:, None]
    return codebook, assign.to(torch.int32), tail_bias(w, codebook, assign, bias, mean_hidden)

"""Fitting a two-stage head's router: the codebook and a per-cluster bias, so that the probed clusters hold the
dense model's probability mass.

A freshly clustered codebook ranks clusters by ``z = h · Cᵀ``, the score of their mean row: a cluster with one
likely token among unlikely ones ranks low, and its token is missed. The router is fitted to the dense model's
cluster marginals on the distillation text, with the trunk and the model's rows untouched:

    p_k(h)  = Σ_{v in cluster k} softmax(h · Wᵀ + b_dense)_v           # the dense mass of cluster k
    loss    = - Σ_k p_k(h) · log_softmax(h · Cᵀ + B)_k                 # cross-entropy to the router's scores

C starts from the cluster means; B [K] (the ``route_bias`` of the head) from zero. The tail's bias is fitted to
the new codebook afterwards (``refit_tail_bias``); a tail with a rank-r correction is then distilled on the KL from
the dense model to the two-stage distribution (``distill_tail``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..head.module import DenseHead, VQLogitsHead, head_logits
from ..memory import available_memory
from .init import tail_bias

LR = 1e-2
POOL_BYTES = 256 << 20  # the hidden states kept for the router, the tail and the metric: at most this many bytes (float32)
LOGIT_BUDGET = 1 << 27  # positions per step x V: bounds the dense logits held at once (about 0.5 GB)
# The pool's dense cluster masses, float16, are computed once when they fit in this many bytes: at most
# POOL_BYTES / (4 d) positions x K x 2 bytes, 3.2 GiB at the Gemma-3-270M shape (d = 640, K = V/16 = 16,384).
MASS_BYTES = 4 << 30


def _noop(label: str, done: int, total: int) -> None:
    pass


def positions_within_budget(vocab: int, most: int) -> int:
    """Positions whose [positions, V] logits stay within LOGIT_BUDGET: at most ``most``, and never fewer than 64."""
    return int(max(64, min(most, LOGIT_BUDGET // vocab)))


@torch.no_grad()
def hidden_pool(hidden, windows: torch.Tensor, seq: int, budget: int = POOL_BYTES, progress=_noop) -> torch.Tensor:
    """The trunk's final hidden states [N, d] of the training text's windows of ``seq`` tokens: all of them when they
    fit in ``budget`` bytes, else as many as fit, spread evenly over the text (taking the first ones would fit the
    router to the opening files only: on the embedded model's text, 400 windows from the start miss the dense argmax
    at P = 32 in 0.58% of held-out positions, 400 spread evenly in 0.50%, the first 2,400 in 0.32%)."""
    total = (len(windows) - 1) // seq
    n = max(1, min(total, budget // (seq * hidden.geo.hidden_size * 4)))
    x = windows[: total * seq].view(total, seq)
    if n < total:
        x = x[torch.linspace(0, total - 1, n, dtype=torch.float64).round().long()]
    out = []
    for i in range(0, n, 8):
        out.append(hidden(x[i : i + 8]).reshape(-1, hidden.geo.hidden_size))
        progress("hidden states of the training text", min(i + 8, n), n)
    return torch.cat(out)


@torch.no_grad()
def cluster_mass(dense: DenseHead, h: torch.Tensor, assign: torch.Tensor, K: int) -> torch.Tensor:
    """The dense model's probability mass per cluster [N, K] at the hidden states ``h`` [N, d]."""
    return torch.zeros(len(h), K).index_add_(1, assign, F.softmax(dense.cap(dense(h)), -1))


@torch.no_grad()
def pool_mass(dense: DenseHead, pool: torch.Tensor, assign: torch.Tensor, K: int, batch: int, progress=_noop) -> torch.Tensor:
    """``cluster_mass`` of every pool position, float16 [N, K]: one V-wide product per position instead of one per
    time the router's steps draw it (300 steps of 883 positions draw a 74,880-position pool 3.5 times over)."""
    out = torch.empty(len(pool), K, dtype=torch.float16)
    for i in range(0, len(pool), batch):
        out[i : i + batch] = cluster_mass(dense, pool[i : i + batch], assign, K)
        progress("dense cluster mass of the router's positions", min(i + batch, len(pool)), len(pool))
    return out


def mass_budget() -> int:
    """The bytes the pool's cached masses may take: MASS_BYTES, or half the memory available when that is less (a
    smaller machine computes them at every step, as a larger pool would, rather than run out of memory)."""
    free = available_memory()
    return MASS_BYTES if free is None else min(MASS_BYTES, free // 2)


def fit_router(head: VQLogitsHead, dense: DenseHead, pool: torch.Tensor, steps: int, seed: int, progress=_noop,
               mass_bytes: int | None = None) -> torch.Tensor:
    """Train ``head.codebook`` in place and return the route bias B [K] (see the module's docstring). The targets
    are computed once for the whole pool when the steps draw more positions than it holds and its masses fit in
    ``mass_bytes`` (float16; default ``mass_budget()``), else at every step."""
    K = head.config.codebook_size
    V = dense.weight.shape[0]
    batch = positions_within_budget(V, 4096)
    codebook = head.codebook.detach().clone().requires_grad_(True)
    route = torch.zeros(K, requires_grad=True)
    opt = torch.optim.Adam([codebook, route], lr=LR)
    gen = torch.Generator().manual_seed(seed)
    assign = head.map
    once = steps * batch > len(pool) and len(pool) * K * 2 <= (mass_budget() if mass_bytes is None else mass_bytes)
    cached = pool_mass(dense, pool, assign, K, batch, progress) if once else None
    for step in range(steps):
        pick = torch.randint(len(pool), (batch,), generator=gen)
        h = pool[pick]
        mass = cached[pick].float() if cached is not None else cluster_mass(dense, h, assign, K)
        loss = -(mass * F.log_softmax(h @ codebook.t() + route, -1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(f"fitting the router (cross-entropy {loss.item():.3f})", step + 1, steps)
    with torch.no_grad():
        head.codebook.copy_(codebook)
    return route.detach()


@torch.no_grad()
def refit_tail_bias(head: VQLogitsHead, weight: torch.Tensor, dense_bias: torch.Tensor | None, mean_h: torch.Tensor) -> None:
    """b[v] = b_dense[v] + (W[v] - C[M[v]]) · h̄ for the head's current codebook (the tail equals the dense head at h̄)."""
    if head.bias is not None:
        head.bias.copy_(tail_bias(weight, head.codebook, head.map, dense_bias, mean_h))


def distill_tail(head, dense: DenseHead, pool: torch.Tensor, steps: int, seed: int, progress=_noop) -> None:
    """Train a two-stage head's tail (bias and rank-r factors; the router and the rows fixed) on the KL from the dense
    model to the two-stage distribution: only the tokens outside the probed clusters use the tail."""
    params = [p for p in (head.bias, head.lowrank_p, head.lowrank_u) if p is not None]
    frozen = [p for p in (head.codebook, head.route_bias) if p is not None]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    V = dense.weight.shape[0]
    batch = positions_within_budget(V, 1024)
    opt = torch.optim.Adam(params, lr=LR)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        loss = kl_step(head, dense, pool[torch.randint(len(pool), (batch,), generator=gen)], opt)
        progress(f"distilling the tail (KL {loss:.3f})", step + 1, steps)
    for p in params:
        p.requires_grad_(False)


class KLDiv(torch.autograd.Function):
    """``F.kl_div(F.log_softmax(student, -1), target, log_target=True, reduction="batchmean")`` from the student's
    logits and the teacher's log-probabilities [..., V], with fewer V-wide passes: the gradient, softmax(student) −
    exp(target) over the batch size, is computed in the forward pass into the student logits' own memory (nothing
    reads them afterwards; a fresh V-wide tensor costs most of a second at V = 152k, most of it mapping pages)."""

    @staticmethod
    def forward(ctx, student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        n, V = student.shape[0], student.shape[-1]
        s, t = student.detach().reshape(-1, V), target.reshape(-1, V)
        p = t.exp()
        lse = torch.logsumexp(s, -1, keepdim=True)
        cross = torch.bmm(p.unsqueeze(1), t.unsqueeze(2)).flatten() - torch.bmm(p.unsqueeze(1), s.unsqueeze(2)).flatten()
        loss = (cross.double().sum() + lse.double().sum()) / n  # sum of p (t - s + lse) per position
        grad = s.sub_(lse).exp_().sub_(p).div_(n)
        ctx.save_for_backward(grad)
        ctx.shape = student.shape
        return loss.to(student.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        if grad_output.item() != 1.0:  # a scaled loss (the training loop's own is not): scale a copy, keep the saved one
            grad = grad * grad_output
        return grad.view(ctx.shape), None


def kl_step(student, dense: DenseHead, h: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    """One optimizer step on KL(dense || student) over the hidden states ``h``; returns the KL per position (the loss
    itself is per row of ``h``: per window when ``h`` is [windows, positions, d])."""
    with torch.no_grad():
        logits = dense(h)
        target = F.log_softmax(dense.cap(logits), -1)
    loss = KLDiv.apply(dense.cap(head_logits(student, h, dense, logits)), target)  # the cap's last op keeps no output
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item() * h.shape[0] / h[..., 0].numel()

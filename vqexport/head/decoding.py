"""Exact full-vocabulary decoding from K codebook logits (numpy only; no torch, no V-sized work per step).

Logits factor as ``logits[v] = z[M[v]] + b[v]`` (cluster score + token bias), so with per-cluster tables

    maxb[k] = max_{v: M[v]=k} b[v]         B[k] = logsumexp_{v: M[v]=k} b[v]
    members[k, :] = tokens of cluster k sorted by bias (descending)

* the softmax normaliser over all V tokens is ``logsumexp_k(z[k] + B[k])``;
* the top-k tokens come from the k clusters with the largest ``z[k] + maxb[k]`` (a cluster's best token
  bounds all its others), and from at most the first k members of each: top-k over k*k candidates;
* sampling at temperature T is a cluster draw from ``softmax(z/T + B_T)`` (``B_T = logsumexp(b/T)``),
  then a member draw from ``softmax(b/T)`` inside that cluster — tables built once per temperature.

Ties are broken towards the smaller token id, the same rule as :func:`reference_topk`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import VQExportError


def _logsumexp(x: np.ndarray, axis=-1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return (np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m).squeeze(axis)


@dataclass(frozen=True)
class ClusterTables:
    """Per-cluster tables of a VQ-Logits head at one temperature (bias already divided by T)."""

    codebook_size: int
    vocab_size: int
    temperature: float
    max_bias: np.ndarray  # [K] float64, -inf for empty clusters
    lse_bias: np.ndarray  # [K] float64, -inf for empty clusters
    members: np.ndarray  # [K, width] int64, sorted by bias desc then id asc; -1 = padding
    member_bias: np.ndarray  # [K, width] float64; -inf = padding
    order: np.ndarray  # [V] tokens grouped by cluster (same order as members), CSR layout
    offsets: np.ndarray  # [K + 1] start of each cluster in ``order``
    member_cdf: np.ndarray  # [V] cumulative member probabilities inside each cluster, aligned with ``order``


MIN_TEMPERATURE = 1e-6  # below it logits / T overflow float64 where they are large; greedy decoding is that limit


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not np.isfinite(t) or t < MIN_TEMPERATURE:
        raise VQExportError(f"temperature must be a finite number >= {MIN_TEMPERATURE:g} (greedy decoding is the limit "
                            f"of a small one), got {temperature!r}")
    return t


def cluster_tables(mapping: np.ndarray, bias: np.ndarray | None, codebook_size: int, width: int | None = None,
                   temperature: float = 1.0) -> ClusterTables:
    """Build the tables once (O(V log V)); every decode step afterwards is O(K + k^2)."""
    t = check_temperature(temperature)
    mapping = np.asarray(mapping, dtype=np.int64)
    V, K = mapping.shape[0], int(codebook_size)
    b = np.zeros(V) if bias is None else np.asarray(bias, dtype=np.float64) / t
    # group by cluster, inside a cluster by bias descending, then token id ascending
    order = np.lexsort((np.arange(V), -b, mapping))
    counts = np.bincount(mapping, minlength=K)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    width = int(counts.max()) if width is None else max(1, min(int(width), int(counts.max())))
    rank = np.arange(V) - offsets[mapping[order]]
    members = np.full((K, width), -1, dtype=np.int64)
    member_bias = np.full((K, width), -np.inf)
    keep = rank < width
    members[mapping[order][keep], rank[keep]] = order[keep]
    member_bias[mapping[order][keep], rank[keep]] = b[order][keep]
    max_bias = np.full(K, -np.inf)
    np.maximum.at(max_bias, mapping, b)
    shifted = np.exp(b - max_bias[mapping])
    sums = np.bincount(mapping, weights=shifted, minlength=K)
    with np.errstate(divide="ignore"):
        lse_bias = np.where(counts > 0, np.log(np.where(counts > 0, sums, 1.0)) + np.where(counts > 0, max_bias, 0.0), -np.inf)
    cdf = np.cumsum(shifted[order])
    start = np.repeat(np.concatenate([[0.0], cdf])[offsets[:-1]], counts)
    total = np.repeat(sums, counts)
    member_cdf = (cdf - start) / total
    return ClusterTables(K, V, t, max_bias, lse_bias, members, member_bias, order, offsets, member_cdf)


def log_normalizer(z: np.ndarray, tables: ClusterTables) -> np.ndarray:
    """logsumexp over all V logits (at the tables' temperature) from the K codebook logits z [..., K]."""
    return _logsumexp(np.asarray(z, dtype=np.float64) / tables.temperature + tables.lse_bias)


def cluster_logprobs(z: np.ndarray, tables: ClusterTables) -> np.ndarray:
    """log P(token in cluster k) [..., K]."""
    zt = np.asarray(z, dtype=np.float64) / tables.temperature
    return zt + tables.lse_bias - log_normalizer(z, tables)[..., None]


def codebook_logits_from_cluster_logprobs(cluster_lp: np.ndarray, tables_t1: ClusterTables) -> np.ndarray:
    """``z - logsumexp`` from a graph's ``cluster_logprobs`` (= z + B - lse at T = 1): the codebook logits up to
    a per-position constant, which sampling ignores. ``tables_t1`` must be built at temperature 1."""
    if tables_t1.temperature != 1.0:
        raise ValueError("cluster log-probabilities are at temperature 1; pass tables built at temperature 1")
    with np.errstate(invalid="ignore"):
        z = np.asarray(cluster_lp, dtype=np.float64) - tables_t1.lse_bias
    return np.where(np.isfinite(tables_t1.lse_bias), z, -np.inf)  # empty clusters never get drawn


def topk(z: np.ndarray, tables: ClusterTables, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k token ids [..., k] (descending) and their full-vocabulary log-probabilities."""
    if not 1 <= k <= tables.vocab_size:
        raise VQExportError(f"k must be in [1, vocab size {tables.vocab_size}], got {k}")
    if tables.members.shape[1] < min(k, int(np.diff(tables.offsets).max())):
        raise ValueError(f"tables were built for top-{tables.members.shape[1]}, not top-{k}")
    z = np.asarray(z, dtype=np.float64)
    zt = z / tables.temperature
    lead = zt.shape[:-1]
    flat = zt.reshape(-1, tables.codebook_size)
    kc = min(k, tables.codebook_size)
    width = min(k, tables.members.shape[1])
    score = flat + tables.max_bias  # [N, K] best logit per cluster
    # The kc clusters whose best tokens ("heads") come first in the global order (logit desc, id asc):
    # any token in the top-k is preceded by its cluster's head, so only those clusters can contribute.
    head = np.where(tables.members[:, 0] < 0, np.iinfo(np.int64).max, tables.members[:, 0])
    cl = np.lexsort((np.broadcast_to(head, score.shape), -score), axis=-1)[:, :kc]
    cand_logit = np.take_along_axis(flat, cl, 1)[:, :, None] + tables.member_bias[cl, :width]  # [N, kc, width]
    cand_id = tables.members[cl, :width]
    cand_logit = cand_logit.reshape(len(flat), -1)
    cand_id = cand_id.reshape(len(flat), -1)
    # sort by logit desc, then id asc (padding has -inf logit and sorts last)
    sortkey = np.where(cand_id < 0, np.iinfo(np.int64).max, cand_id)
    idx = np.lexsort((sortkey, -cand_logit), axis=-1)[:, :k]
    ids = np.take_along_axis(cand_id, idx, 1)
    logp = np.take_along_axis(cand_logit, idx, 1) - log_normalizer(z, tables).reshape(-1, 1)
    return ids.reshape(*lead, k), logp.reshape(*lead, k)


def full_logits(z: np.ndarray, mapping: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """The V-wide logits ``z[..., M] + b`` (the O(V) reference)."""
    out = np.asarray(z, dtype=np.float64)[..., np.asarray(mapping, dtype=np.int64)]
    return out if bias is None else out + np.asarray(bias, dtype=np.float64)


def reference_topk(logits: np.ndarray, k: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of full V-wide logits (ties -> smaller id) and log_softmax values: the O(V) reference."""
    x = np.asarray(logits, dtype=np.float64) / temperature
    lse = _logsumexp(x)
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    ids = np.stack([np.lexsort((np.arange(row.size), -row))[:k] for row in flat])
    logp = np.take_along_axis(flat, ids, 1) - lse.reshape(-1, 1)
    return ids.reshape(*lead, k), logp.reshape(*lead, k)


def softmax_draw(rng: np.random.Generator, scores: np.ndarray) -> int:
    """An index drawn with probability softmax(scores)."""
    p = np.exp(scores - scores.max())
    return int(rng.choice(len(p), p=p / p.sum()))


class Sampler:
    """Exact sampling from softmax(logits / T) over all V tokens (optionally restricted to the top-k)."""

    def __init__(self, mapping, bias, codebook_size: int, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None):
        V = int(np.asarray(mapping).shape[0])
        if top_k is not None and not 1 <= int(top_k) <= V:
            raise VQExportError(f"--top-k must be in [1, vocab size {V}], got {top_k}")
        self.top_k = None if top_k is None else int(top_k)
        self.tables = cluster_tables(mapping, bias, codebook_size, width=self.top_k, temperature=temperature)
        self.rng = np.random.default_rng(seed)

    def sample(self, z: np.ndarray) -> int:
        """One token from the codebook logits z [K] of one position."""
        t = self.tables
        if self.top_k is not None:
            ids, logp = topk(z, t, self.top_k)
            return int(ids[softmax_draw(self.rng, logp)])
        return _member_draw(self.rng, t, softmax_draw(self.rng, np.asarray(z, dtype=np.float64) / t.temperature + t.lse_bias))


# --- heads with a rank-r correction: logits[v] = z[M[v]] + b[v] + U[v] . q, with q = h . P^T (r values) -----------
#
# The correction depends on q, so per-cluster tables of b alone no longer bound a cluster. Two exact methods:
#
# * top-k ids (greedy): a per-cluster box bound. With umax[k, j] / umin[k, j] the largest / smallest U[v, j] in
#   cluster k, every member satisfies U[v] . q <= sum_j max(umax[k, j] q_j, umin[k, j] q_j), so
#   ub[k] = z[k] + maxb[k] + that sum bounds the whole cluster in O(K r). Clusters are visited in ub order and
#   their members scored exactly until the k-th best exact logit beats the next cluster's bound.
# * the normaliser (log-probabilities, sampling over all V): no per-cluster shortcut is exact, so the rank-r
#   term is computed for all V tokens, O(V r) (r / d of a dense head's work), plus the O(V) gather and sum.


@dataclass(frozen=True)
class LowRankTables:
    """Per-cluster bounds of a rank-r correction, on top of the ClusterTables of the same head."""

    u: np.ndarray  # [V, r] float64 (U as given; temperature applies to q)
    u_max: np.ndarray  # [K, r] per-cluster maxima of U's columns (0 for empty clusters, whose bound is -inf anyway)
    u_min: np.ndarray  # [K, r]
    mapping: np.ndarray  # [V] int64
    bias: np.ndarray  # [V] float64, already divided by the temperature


def lowrank_tables(mapping: np.ndarray, bias: np.ndarray | None, lowrank_u: np.ndarray, tables: ClusterTables) -> LowRankTables:
    u = np.asarray(lowrank_u, dtype=np.float64)
    mapping = np.asarray(mapping, dtype=np.int64)
    if u.ndim != 2 or u.shape[0] != tables.vocab_size:
        raise ValueError(f"U must be [V={tables.vocab_size}, r], got {list(u.shape)}")
    K, r = tables.codebook_size, u.shape[1]
    u_max, u_min = np.zeros((K, r)), np.zeros((K, r))
    counts = np.diff(tables.offsets)
    nonempty = counts > 0
    if r and nonempty.any():
        grouped = u[tables.order]
        starts = tables.offsets[:-1][nonempty]
        u_max[nonempty] = np.maximum.reduceat(grouped, starts, axis=0)
        u_min[nonempty] = np.minimum.reduceat(grouped, starts, axis=0)
    b = np.zeros(tables.vocab_size) if bias is None else np.asarray(bias, dtype=np.float64) / tables.temperature
    return LowRankTables(u, u_max, u_min, mapping, b)


def lowrank_logits(z: np.ndarray, proj: np.ndarray, tables: ClusterTables, lr: LowRankTables) -> np.ndarray:
    """All V logits / T of one position (z [K], proj = h . P^T [r]): the O(V r) path."""
    t = tables.temperature
    return np.asarray(z, np.float64)[lr.mapping] / t + lr.bias + lr.u @ (np.asarray(proj, np.float64) / t)


def lowrank_topk(z: np.ndarray, proj: np.ndarray, tables: ClusterTables, lr: LowRankTables, k: int,
                 logprobs: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Exact top-k token ids of one position (descending logit, ties -> smaller id) by cluster bounds, their
    log-probabilities when ``logprobs`` (the O(V r) normaliser), and {"clusters_visited", "tokens_scored",
    "logits": the ids' logits / T}."""
    V, K = tables.vocab_size, tables.codebook_size
    if not 1 <= k <= V:
        raise VQExportError(f"k must be in [1, vocab size {V}], got {k}")
    zt = np.asarray(z, np.float64) / tables.temperature
    qt = np.asarray(proj, np.float64) / tables.temperature
    if not (np.isfinite(zt).all() and np.isfinite(qt).all()):
        raise ValueError("codebook logits and the projection h·Pᵀ must be finite (after dividing by the temperature)")
    ub = zt + tables.max_bias + np.maximum(lr.u_max * qt, lr.u_min * qt).sum(1)
    with np.errstate(invalid="ignore"):  # the bound is exact in real numbers; keep it above float64 rounding
        ub = np.where(np.isfinite(ub), ub + 1e-9 * (1.0 + np.abs(ub)), ub)
    corder = np.argsort(-ub, kind="stable")
    best_ids = np.empty(0, np.int64)
    best_val = np.empty(0)
    pos, chunk, scored = 0, max(1, min(k, K)), 0
    while pos < K and np.isfinite(ub[corder[pos]]):
        if len(best_ids) >= k and best_val[k - 1] > ub[corder[pos]]:
            break
        take = corder[pos : pos + chunk]
        pos += len(take)
        chunk *= 2
        ids = tables.order[_csr_positions(tables.offsets, take)]
        vals = zt[lr.mapping[ids]] + lr.bias[ids] + lr.u[ids] @ qt
        scored += len(ids)
        all_ids = np.concatenate([best_ids, ids])
        all_val = np.concatenate([best_val, vals])
        keep = np.lexsort((all_ids, -all_val))[:k]
        best_ids, best_val = all_ids[keep], all_val[keep]
    if len(best_ids) < min(k, V):  # cannot happen with finite inputs and bounds; kept as a guard: score everything
        all_val = lowrank_logits(z, proj, tables, lr)
        keep = np.lexsort((np.arange(V), -all_val))[:k]
        best_ids, best_val, pos, scored = keep.astype(np.int64), all_val[keep], K, V
    stats = {"clusters_visited": int(pos), "tokens_scored": int(scored), "logits": best_val}
    if not logprobs:
        return best_ids, None, stats
    lse = float(_logsumexp(lowrank_logits(z, proj, tables, lr)))
    return best_ids, best_val - lse, stats


def _csr_positions(offsets: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """Positions in ``order`` of every member of ``clusters`` (CSR rows), in cluster order, vectorised."""
    starts, lengths = offsets[clusters], offsets[clusters + 1] - offsets[clusters]
    total = int(lengths.sum())
    if not total:
        return np.empty(0, np.int64)
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(starts - first, lengths) + np.arange(total)


class LowRankSampler:
    """Exact sampling from softmax(logits / T) over all V tokens of a head with a rank-r correction: the
    normaliser needs every token's correction, so each draw is O(V r) (optionally restricted to the top-k)."""

    def __init__(self, mapping, bias, codebook_size: int, lowrank_u, temperature: float = 1.0, top_k: int | None = None,
                 seed: int | None = None):
        V = int(np.asarray(mapping).shape[0])
        if top_k is not None and not 1 <= int(top_k) <= V:
            raise VQExportError(f"--top-k must be in [1, vocab size {V}], got {top_k}")
        self.top_k = None if top_k is None else int(top_k)
        self.tables = cluster_tables(mapping, bias, codebook_size, width=1, temperature=temperature)
        self.lr = lowrank_tables(mapping, bias, lowrank_u, self.tables)
        self.rng = np.random.default_rng(seed)

    def sample(self, z: np.ndarray, proj: np.ndarray) -> int:
        if self.top_k is not None:  # the top-k's own softmax: no normaliser over all V needed
            ids, _, stats = lowrank_topk(z, proj, self.tables, self.lr, self.top_k, logprobs=False)
            return int(ids[softmax_draw(self.rng, stats["logits"])])
        return softmax_draw(self.rng, lowrank_logits(z, proj, self.tables, self.lr))


# --- two-stage heads: the probed clusters' tokens carry exact logits, every other token z[M[v]] + b[v] ------------
#
# With per-cluster tables of b (ClusterTables) and the exact logits of the probed tokens, the distribution over all
# V tokens needs no V-wide work: the normaliser is logsumexp over the probed tokens' exact logits and the other
# clusters' z[k] + B[k]; the top-k are the best of the exact logits and the non-probed clusters' top-k (their heads
# bound them); a draw picks a probed token or a non-probed cluster, then a member by bias. O(K + P cap + k^2).
#
# A tail with a rank-r correction (``lr``, LowRankTables, and ``proj`` = h . P^T) gives every tail token its own
# term U[v] . q, so no per-cluster table holds: the tail's logits are computed for all V tokens, O(V r), as for a
# plain head with that correction (lowrank_logits), and the probed tokens' exact logits replace theirs.


def _unique_exact(ids: np.ndarray, exact: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The probed tokens once each (padding may repeat one) and their exact logits / T."""
    ids, uniq = np.unique(np.asarray(ids, dtype=np.int64).ravel(), return_index=True)
    return ids, np.asarray(exact, dtype=np.float64).ravel()[uniq] / temperature


def _two_stage_logits(z, proj, ids: np.ndarray, exact_t: np.ndarray, tables: ClusterTables,
                      lr: LowRankTables) -> np.ndarray:
    """All V logits / T of one position of a two-stage head whose tail has a rank-r correction: O(V r)."""
    if proj is None:
        raise ValueError("a two-stage head with a rank-r tail needs proj = h . P^T")
    out = lowrank_logits(z, proj, tables, lr)
    out[ids] = exact_t
    return out


def two_stage_normalizer(z: np.ndarray, probed: np.ndarray, ids: np.ndarray, exact: np.ndarray, tables: ClusterTables,
                         lr: LowRankTables | None = None, proj: np.ndarray | None = None) -> float:
    """logsumexp over all V logits / T of one position: ``probed`` [P] cluster ids, ``ids`` / ``exact`` their tokens
    and exact logits (padding may repeat a token); ``lr`` / ``proj`` for a tail with a rank-r correction."""
    ids, exact_t = _unique_exact(ids, exact, tables.temperature)
    if lr is not None:
        return float(_logsumexp(_two_stage_logits(z, proj, ids, exact_t, tables, lr)))
    return _two_stage_lse(np.asarray(z, dtype=np.float64) / tables.temperature, probed, exact_t, tables)


def two_stage_topk(z: np.ndarray, probed: np.ndarray, ids: np.ndarray, exact: np.ndarray, tables: ClusterTables,
                   k: int, lr: LowRankTables | None = None, proj: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k token ids (descending, ties to the smaller id) and log-probabilities over all V of one position.
    ``ids`` / ``exact``: the probed clusters' tokens and their exact logits (padding may repeat a token); ``lr`` /
    ``proj`` for a tail with a rank-r correction."""
    if not 1 <= k <= tables.vocab_size:
        raise VQExportError(f"k must be in [1, vocab size {tables.vocab_size}], got {k}")
    ids, exact = _unique_exact(ids, exact, tables.temperature)
    if lr is not None:
        full = _two_stage_logits(z, proj, ids, exact, tables, lr)
        top = np.lexsort((np.arange(len(full)), -full))[:k]
        return top, full[top] - float(_logsumexp(full))
    if tables.members.shape[1] < min(k, int(np.diff(tables.offsets).max())):
        raise ValueError(f"tables were built for top-{tables.members.shape[1]}, not top-{k}")
    zt = np.asarray(z, dtype=np.float64) / tables.temperature
    rest = np.setdiff1d(np.arange(tables.codebook_size), np.asarray(probed))
    score = zt[rest] + tables.max_bias[rest]
    head = np.where(tables.members[rest, 0] < 0, np.iinfo(np.int64).max, tables.members[rest, 0])
    cl = rest[np.lexsort((head, -score))[: min(k, len(rest))]]
    width = min(k, tables.members.shape[1])
    cand_id = np.concatenate([ids, tables.members[cl, :width].ravel()])
    cand = np.concatenate([exact, (zt[cl, None] + tables.member_bias[cl, :width]).ravel()])
    key = np.where(cand_id < 0, np.iinfo(np.int64).max, cand_id)
    top = np.lexsort((key, -cand))[:k]
    return cand_id[top], cand[top] - _two_stage_lse(zt, probed, exact, tables)


def _two_stage_lse(zt: np.ndarray, probed: np.ndarray, exact_t: np.ndarray, tables: ClusterTables) -> float:
    rest = np.ones(tables.codebook_size, bool)
    rest[np.asarray(probed)] = False
    return float(_logsumexp(np.concatenate([exact_t, (zt + tables.lse_bias)[rest]])))


class TwoStageSampler:
    """Exact sampling from softmax(logits / T) of a two-stage head, from z, the probed clusters and their exact logits
    (and, for a tail with a rank-r correction ``lowrank_u``, the projection h . P^T: each draw is then O(V r))."""

    def __init__(self, mapping, bias, codebook_size: int, temperature: float = 1.0, seed: int | None = None,
                 lowrank_u=None):
        self.tables = cluster_tables(mapping, bias, codebook_size, width=1, temperature=temperature)
        self.lr = None if lowrank_u is None else lowrank_tables(mapping, bias, lowrank_u, self.tables)
        self.rng = np.random.default_rng(seed)

    def sample(self, z: np.ndarray, probed: np.ndarray, ids: np.ndarray, exact: np.ndarray,
               proj: np.ndarray | None = None) -> int:
        t = self.tables
        ids, exact = _unique_exact(ids, exact, t.temperature)
        if self.lr is not None:
            return softmax_draw(self.rng, _two_stage_logits(z, proj, ids, exact, t, self.lr))
        rest = np.setdiff1d(np.arange(t.codebook_size), np.asarray(probed))
        zt = np.asarray(z, dtype=np.float64) / t.temperature
        pick = softmax_draw(self.rng, np.concatenate([exact, zt[rest] + t.lse_bias[rest]]))
        if pick < len(ids):
            return int(ids[pick])
        return _member_draw(self.rng, t, int(rest[pick - len(ids)]))


def _member_draw(rng: np.random.Generator, t: ClusterTables, k: int) -> int:
    """A member of cluster k drawn with probability softmax(b / T) inside it."""
    lo, hi = t.offsets[k], t.offsets[k + 1]
    j = int(np.searchsorted(t.member_cdf[lo:hi], rng.random() * t.member_cdf[hi - 1], side="right"))
    return int(t.order[lo + min(j, hi - lo - 1)])

"""Exact O(K) decoding against the full-vocabulary reference: top-k, log-probabilities, sampling."""

import math

import numpy as np
import pytest

from vqexport.head.decoding import (Sampler, cluster_logprobs, cluster_tables, full_logits, log_normalizer,
                               reference_topk, topk)
from vqexport.errors import VQExportError


def random_head(V, K, seed, bias="normal", ties=False):
    rng = np.random.default_rng(seed)
    m = np.concatenate([np.arange(min(K, V)), rng.integers(0, K, size=max(V - K, 0))])
    mapping = rng.permutation(m)
    if bias is None:
        b = None
    elif bias == "huge":
        b = rng.choice([-1e4, 0.0, 1e4, 3e4], size=V)
    elif ties:
        b = rng.integers(-2, 3, size=V).astype(np.float64)  # many equal biases
    else:
        b = rng.standard_normal(V) * 3
    z = rng.standard_normal((4, K)) * 5
    if ties:
        z = np.round(z)  # equal cluster scores
        z[:, : K // 2] = z[:, :1]
    return mapping, b, z


CASES = [
    dict(V=97, K=11, bias="normal"),
    dict(V=97, K=11, bias="normal", ties=True),
    dict(V=50, K=1, bias="normal"),
    dict(V=40, K=40, bias="normal"),  # every cluster holds one token
    dict(V=64, K=8, bias=None),
    dict(V=64, K=8, bias=None, ties=True),
    dict(V=200, K=13, bias="huge"),
    dict(V=30, K=30, bias="normal", ties=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("k", [1, 5, 17, 30])
def test_topk_equals_full_softmax_reference(case, k):
    V, K = case["V"], case["K"]
    mapping, b, z = random_head(V, K, seed=V * 31 + K, bias=case["bias"], ties=case.get("ties", False))
    k = min(k, V)
    tables = cluster_tables(mapping, b, K, width=k)
    ids, logp = topk(z, tables, k)
    ref_ids, ref_logp = reference_topk(full_logits(z, mapping, b), k)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(logp, ref_logp, rtol=0, atol=1e-9)


@pytest.mark.parametrize("case", CASES[:4] + CASES[6:7], ids=str)
def test_normaliser_and_cluster_logprobs(case):
    V, K = case["V"], case["K"]
    mapping, b, z = random_head(V, K, seed=7, bias=case["bias"])
    tables = cluster_tables(mapping, b, K)
    full = full_logits(z, mapping, b)
    m = full.max(-1, keepdims=True)
    lse = (np.log(np.exp(full - m).sum(-1, keepdims=True)) + m)[..., 0]
    np.testing.assert_allclose(log_normalizer(z, tables), lse, rtol=1e-12, atol=1e-9)
    cl = cluster_logprobs(z, tables)
    logp = full - lse[..., None]
    for c in range(K):
        members = mapping == c
        expected = np.log(np.exp(logp[:, members]).sum(-1)) if members.any() else np.full(len(z), -np.inf)
        np.testing.assert_allclose(cl[:, c], expected, rtol=1e-9, atol=1e-9)


def test_topk_with_temperature():
    mapping, b, z = random_head(120, 9, seed=3)
    T = 0.7
    tables = cluster_tables(mapping, b, 9, width=10, temperature=T)
    ids, logp = topk(z, tables, 10)
    ref_ids, ref_logp = reference_topk(full_logits(z, mapping, b), 10, temperature=T)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-9)


def test_tables_for_a_smaller_k_are_refused():
    mapping, b, z = random_head(97, 5, seed=1)
    with pytest.raises(ValueError):
        topk(z, cluster_tables(mapping, b, 5, width=2), 10)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(bad):
    mapping, b, _ = random_head(20, 4, seed=0)
    with pytest.raises(VQExportError, match="temperature"):
        Sampler(mapping, b, 4, temperature=bad)


@pytest.mark.parametrize("bad", [0, 21])
def test_bad_top_k(bad):
    mapping, b, z = random_head(20, 4, seed=0)
    with pytest.raises(VQExportError, match="top-k"):
        Sampler(mapping, b, 4, top_k=bad)
    with pytest.raises(VQExportError, match="k must be"):
        topk(z, cluster_tables(mapping, b, 4), bad)


def _chi_square_z(counts, probs):
    """Wilson-Hilferty normal approximation of the chi-square statistic (z > 3.5: reject)."""
    n = counts.sum()
    keep = probs * n >= 5
    exp = np.append(probs[keep] * n, probs[~keep].sum() * n)
    obs = np.append(counts[keep], counts[~keep].sum())
    if exp[-1] == 0:
        exp, obs = exp[:-1], obs[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def _full_probs(z0, mapping, b, T):
    full = full_logits(z0, mapping, b) / T
    probs = np.exp(full - full.max())
    return probs / probs.sum()


def _counts(sampler, z0, V, n=20000):
    return np.bincount([sampler.sample(z0) for _ in range(n)], minlength=V)


@pytest.mark.parametrize("T", [1.0, 0.6, 2.0])
def test_sampler_matches_full_vocabulary_distribution(T):
    V, K = 60, 7
    mapping, b, z = random_head(V, K, seed=11)
    z0 = z[0] * 0.3
    probs = _full_probs(z0, mapping, b, T)
    assert _chi_square_z(_counts(Sampler(mapping, b, K, temperature=T, seed=123), z0, V), probs) < 3.5
    # the same test rejects a sampler that ignores the bias (it can fail)
    assert _chi_square_z(_counts(Sampler(mapping, None, K, temperature=T, seed=123), z0, V), probs) > 3.5


def test_top_k_sampler_stays_inside_the_exact_top_k():
    V, K = 80, 9
    mapping, b, z = random_head(V, K, seed=5)
    ref_ids, ref_logp = reference_topk(full_logits(z[0], mapping, b), 5)
    sampler = Sampler(mapping, b, K, top_k=5, seed=0)
    draws = np.array([sampler.sample(z[0]) for _ in range(5000)])
    assert set(draws.tolist()) <= set(ref_ids.tolist())
    p = np.exp(ref_logp - ref_logp.max())
    p /= p.sum()
    counts = np.array([(draws == i).sum() for i in ref_ids])
    assert _chi_square_z(counts, p) < 3.5


@pytest.mark.parametrize("T", [1.0, 0.5, 3.0])
def test_sampling_from_graph_cluster_logprobs_is_exact_at_any_temperature(T):
    """generate's O(K) path: recover z (up to a constant) from cluster log-probs at T=1, then sample at T."""
    from vqexport.head.decoding import codebook_logits_from_cluster_logprobs

    V, K = 60, 7
    mapping, b, z = random_head(V, K, seed=13)
    z0 = z[0] * 0.3
    graph_cluster_lp = cluster_logprobs(z0, cluster_tables(mapping, b, K))  # what the top-k graph outputs
    recovered = codebook_logits_from_cluster_logprobs(graph_cluster_lp, cluster_tables(mapping, b, K, width=1))
    np.testing.assert_allclose(recovered - recovered.max(), z0 - z0.max(), atol=1e-9)
    sampler = Sampler(mapping, b, K, temperature=T, seed=5)
    assert _chi_square_z(_counts(sampler, recovered, V), _full_probs(z0, mapping, b, T)) < 3.5

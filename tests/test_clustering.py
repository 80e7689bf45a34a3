"""The map's clustering (vqexport.convert.clustering): every code used, capacity bound, determinism, quality vs Lloyd."""

import pytest
import torch

from vqexport.convert.clustering import (EQUAL, EQUAL_METRIC, METHODS, METRIC, NAMED, balanced, capacity, cluster, kmeans,
                                        lloyd, state_metric)

D = 136  # above the default projection (128 dims): the projected passes run


def blobs(n=3000, d=D, k=30, seed=0, noise=0.2, skew=0.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** skew
    labels = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    return centres[labels] + noise * torch.randn(n, d, generator=g), labels


def inertia(x, assign, k):
    counts = torch.bincount(assign, minlength=k).clamp(min=1)
    means = torch.zeros(k, x.shape[1]).index_add_(0, assign, x) / counts[:, None]
    return float((x - means[assign]).pow(2).sum(1).mean())


def adversarial():
    g = torch.Generator().manual_seed(5)
    few = torch.randn(12, D, generator=g)
    return {
        "duplicates": (few.repeat(20, 1), 40),  # 12 distinct rows, 40 codes
        "all_equal": (torch.ones(50, D), 7),
        "k_near_n": (torch.randn(64, D, generator=g), 61),
        "k_equals_n": (torch.randn(64, D, generator=g), 64),
        "k_is_one": (torch.randn(64, D, generator=g), 1),
        "zero_rows": (torch.cat([torch.zeros(30, D), torch.randn(30, D, generator=g)]), 20),  # spherical: normalising zeros
    }


def some_metric(d, seed=3):
    """A state_metric of anisotropic states, as the ``*metric`` methods take."""
    g = torch.Generator().manual_seed(seed)
    return state_metric(torch.randn(4 * d, d, generator=g) * torch.linspace(0.1, 3.0, d))


@pytest.mark.parametrize("method", NAMED)
@pytest.mark.parametrize("case", list(adversarial()))
def test_every_code_used_and_valid(method, case):
    x, k = adversarial()[case]
    a = cluster(x, k, method, seed=1, metric=some_metric(D))
    assert a.shape == (x.shape[0],) and a.dtype == torch.int64
    assert a.min() >= 0 and a.max() < k
    assert len(torch.unique(a)) == k  # no empty cluster
    if method.startswith("balanced"):
        assert int(torch.bincount(a, minlength=k).max()) <= capacity(x.shape[0], k, 1.5)
    if method.startswith("equal"):
        assert int(torch.bincount(a, minlength=k).max()) <= capacity(x.shape[0], k, 1.0)


@pytest.mark.parametrize("spherical", [False, True])
def test_balanced_respects_its_capacity(spherical):
    x, _ = blobs(n=2000, k=25, skew=1.2)  # very uneven blob sizes: plain k-means' largest cluster is far over the cap
    k = 40
    c, plain = kmeans(x, k, seed=0, spherical=spherical)
    cap = capacity(len(x), k, 1.5)
    assert int(torch.bincount(plain, minlength=k).max()) > cap
    for slack in (1.0, 1.5, 3.0):
        _, a = balanced(x, k, c, slack=slack, spherical=spherical)
        sizes = torch.bincount(a, minlength=k)
        assert int(sizes.max()) <= capacity(len(x), k, slack) and int(sizes.min()) >= 1
    assert capacity(2000, 40, 1.0) == 50 and capacity(10, 3, 1.0) == 4 and capacity(10, 10, 1.5) == 2


@pytest.mark.parametrize("method", NAMED)
def test_deterministic_for_a_seed(method):
    x, _ = blobs(n=1500, k=20, skew=0.5)
    a = cluster(x, 24, method, seed=7, metric=some_metric(D))
    b = cluster(x.clone(), 24, method, seed=7, metric=some_metric(D))
    assert a.numpy().tobytes() == b.numpy().tobytes()


def test_projected_kmeans_is_as_good_as_lloyd():
    x, labels = blobs(n=6000, k=40, noise=0.5, skew=0.6)  # more rows than one distance chunk
    planted = inertia(x, labels, 40)
    stats = {}
    _, fast = kmeans(x, 40, seed=3, proj_dim=16, stats=stats)  # assignments in 16 of 136 dims, then exact passes
    _, ref = lloyd(x, 40, seed=3)
    assert stats["approx_iters"] >= 1 and stats["exact_iters"] >= 1 and stats["projected_dim"] == 16
    assert inertia(x, fast, 40) <= 1.05 * inertia(x, ref, 40)
    assert inertia(x, fast, 40) <= 3 * planted  # nearly the planted blobs (merging two costs ~30 on top of ~34)
    random_codes = x[torch.randperm(6000, generator=torch.Generator().manual_seed(0))[:40]]
    assert inertia(x, fast, 40) < 0.5 * float(torch.cdist(x, random_codes).pow(2).min(1).values.mean())


def test_k_equals_n_gives_one_row_per_code_and_bad_k_is_refused():
    x, _ = blobs(n=300, k=10)
    _, every = kmeans(x, 300, iters=2)
    assert sorted(every.tolist()) == list(range(300))
    for bad in (0, 301):
        with pytest.raises(ValueError, match="k must be in"):
            kmeans(x, bad)
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster(x, 4, "random")


def test_state_metric_is_the_square_root_of_the_states_covariance():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(5000, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    s = state_metric(states, chunk=777)  # chunks that do not divide N
    cov = torch.cov(states.double().T, correction=0)
    assert torch.allclose(s, s.T) and torch.allclose((s @ s).double(), cov, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least two"):
        state_metric(states[:1])


def test_clusters_in_the_metric_cut_the_tail_error_where_the_states_are_anisotropic():
    """Rows close along directions the hidden states never take, far along the ones they do: spherical and euclidean
    clusters group them by the silent directions, the metric by the ones that move the logits. Equal-size or not."""
    g = torch.Generator().manual_seed(1)
    n, d, k = 1024, 32, 64
    rows = torch.randn(n, d, generator=g)
    rows[:, :4] *= 0.2  # the states' directions: small spread across rows, but all that matters for the logits
    rows[:, 4:] *= 3.0
    states = torch.zeros(4000, d)
    states[:, :4] = torch.randn(4000, 4, generator=g) * 5.0
    metric = state_metric(states)

    def tail_error(assign):  # mean square of (W[v] - C[M[v]]) . (h - h_mean) over the states and rows
        cents = torch.zeros(k, d).index_add_(0, assign, rows) / torch.bincount(assign, minlength=k)[:, None]
        resid = rows - cents[assign]
        centred = states - states.mean(0)
        return float((centred @ resid.T).pow(2).mean())

    by_metric, spherical = cluster(rows, k, EQUAL_METRIC, metric=metric), cluster(rows, k, EQUAL)
    assert torch.bincount(by_metric, minlength=k).tolist() == [n // k] * k
    assert torch.equal(by_metric, cluster(rows, k, EQUAL_METRIC, metric=metric))  # deterministic
    assert tail_error(by_metric) < 0.25 * tail_error(spherical)
    plain = cluster(rows, k, METRIC, metric=metric)  # the plain head's clusters, unequal sizes, against the rows alone's
    assert tail_error(plain) < 0.25 * min(tail_error(cluster(rows, k, m)) for m in METHODS)
    for method in (METRIC, EQUAL_METRIC):
        for bad in (None, torch.eye(d + 1)):
            with pytest.raises(ValueError, match=f"{method} needs a"):
                cluster(rows, k, method, metric=bad)

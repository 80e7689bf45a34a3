"""The GPU kernels of the VQ-Logits heads (ops/vqlogits/gpu, Triton) against their definitions.

On a CUDA GPU they run compiled; elsewhere under Triton's interpreter on CPU tensors, which checks their indexing,
masks and arithmetic (not their speed, nor the GPU's rounding). Without Triton they skip.
"""

import os

import numpy as np
import pytest

from vqexport.ops.gpu import load_kernel, source_path

from .models import random_head


@pytest.fixture(scope="module")
def kernel():
    """(the kernel module, its device): compiled on a CUDA GPU, else interpreted on the CPU (tests/conftest.py turns
    Triton's interpreter on where there is no GPU)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton", reason="Triton is not installed")
    if torch.cuda.is_available():
        return load_kernel(), "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(f"no CUDA GPU, and Triton's interpreter is off (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})")
    return load_kernel(), "cpu"


def _on(device):
    import torch

    return lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _formula(h, ct, m, b, p=None, u=None):
    h64 = h.astype(np.float64)
    out = (h64 @ ct.astype(np.float64))[..., m.astype(np.int64)] + b
    if p is not None:
        out = out + (h64 @ p) @ u
    return out


def test_kernel_source_is_shipped():
    assert source_path().is_file()
    text = source_path().read_text()
    assert "@triton.jit" in text and "def vq_logits(" in text


@pytest.mark.parametrize("lowrank", [False, True], ids=["4-inputs", "6-inputs"])
@pytest.mark.parametrize("shape_h", [(1, 1, 64), (3, 7, 64), (5, 64), (2, 0, 64), (1, 1, 896)])
def test_kernel_matches_formula(kernel, shape_h, lowrank):
    import torch

    kernel, device = kernel
    d = shape_h[-1]
    K, V, r = 37, 3001, 8  # V not a multiple of any block size
    rng = np.random.default_rng(sum(shape_h) + lowrank)
    h = rng.standard_normal(shape_h).astype(np.float32)
    ct = (rng.standard_normal((d, K)) / np.sqrt(d)).astype(np.float32)
    m = rng.integers(0, K, V).astype(np.int32)
    b = rng.standard_normal(V).astype(np.float32)
    p = (rng.standard_normal((d, r)) / np.sqrt(d)).astype(np.float32) if lowrank else None
    u = rng.standard_normal((r, V)).astype(np.float32) if lowrank else None
    on = _on(device)
    got = kernel.vq_logits(on(h), on(ct), on(m), on(b), on(p), on(u))
    assert got.shape == (*shape_h[:-1], V) and got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), _formula(h, ct, m, b, p, u), atol=2e-4, rtol=1e-5)


def test_kernel_without_a_bias(kernel):
    kernel, device = kernel
    rng = np.random.default_rng(3)
    h, ct = rng.standard_normal((3, 7, 64)).astype(np.float32), rng.standard_normal((64, 37)).astype(np.float32)
    m = rng.integers(0, 37, 3001).astype(np.int32)
    on = _on(device)
    got = kernel.vq_logits(on(h), on(ct), on(m), None).cpu().numpy()
    np.testing.assert_allclose(got, _formula(h, ct, m, 0.0), atol=2e-4, rtol=1e-5)


def test_kernel_refuses_half_a_lowrank_term(kernel):
    import torch

    kernel, device = kernel
    x = torch.zeros((1, 8), device=device)
    with pytest.raises(ValueError, match="both"):
        kernel.vq_logits(x, torch.zeros((8, 4), device=device), torch.zeros(5, dtype=torch.int32, device=device),
                         torch.zeros(5, device=device), lowrank_p_t=torch.zeros((8, 2), device=device))


def _two_stage(V, d, K, probes, rank=0, route=False, seed=0):
    from vqexport.head.spec import make_head

    h = random_head(V, d, K, rank=rank, seed=seed)  # clusters of unequal sizes: the member table is padded
    extra = {"route_bias": (np.random.default_rng(seed + 7).standard_normal(K) * 3).astype(np.float32)} if route else {}
    return make_head({**h.tensors, **extra}, probes=probes)


@pytest.mark.parametrize("shape_h, probes, rank, route, rows_dtype, rows_bias", [
    ((1, 1, 64), 5, 0, False, "float32", False),       # decode
    ((3, 7, 64), 5, 8, True, "float32", True),         # prefill, router, rank-8 tail, the rows' bias
    ((5, 64), 1, 0, True, "float16", False),           # one probe, rows in half precision (read as they are)
    ((4, 64), 5, 0, True, "bfloat16", True),           # rows in bfloat16, a GPU model's own table
    ((2, 37), 37, 0, False, "float32", True),          # every cluster probed: the dense layer; d not a block multiple
    ((1, 1, 896), 12, 8, False, "float32", False),     # the hidden size of Qwen2.5-0.5B
    ((2, 0, 64), 5, 0, False, "float32", False),       # no positions
], ids=["decode", "prefill-router-rank8-rowbias", "one-probe-fp16-rows", "bf16-rows", "all-clusters", "d896", "empty"])
def test_two_stage_kernel_matches_the_heads_definition(kernel, shape_h, probes, rank, route, rows_dtype, rows_bias):
    import torch

    kernel, device = kernel
    d = shape_h[-1]
    K = 37
    V = 1001  # not a multiple of any cluster size or block
    head = _two_stage(V, d, K, probes, rank=rank, route=route)
    rng = np.random.default_rng(sum(shape_h) + probes)
    W = torch.from_numpy((rng.standard_normal((V, d)) * d**-0.5 * 3).astype(np.float32)).to(getattr(torch, rows_dtype))
    wb = rng.standard_normal(V).astype(np.float32) if rows_bias else None
    h = rng.standard_normal(shape_h).astype(np.float32)
    assert (head.members < 0).any()  # padded: the kernel must skip those slots
    want = head.logits(h, rows=W.double().numpy(), rows_bias=wb)  # the rows as stored
    on = _on(device)
    lowrank = (head.lowrank[0].T, head.lowrank[1].T) if rank else (None, None)
    got = kernel.two_stage_logits(on(h), on(head.codebook.T), on(head.map), on(head.bias), on(head.members), W.to(device),
                                  probes, rows_bias=on(wb), route_bias=on(head.route_bias), lowrank_p_t=on(lowrank[0]),
                                  lowrank_u_t=on(lowrank[1]))
    assert got.shape == (*shape_h[:-1], V) and got.dtype == torch.float32
    got = got.cpu().numpy()
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-5)
    if got.size:  # the probed tokens took exact logits, which differ from their VQ logits
        assert np.abs(got - head.tail_logits(h)).max() > 0.1


def test_two_stage_kernel_reads_views_wide_clusters_and_fills_out(kernel):
    """A table read through a strided view (and a transposed one), strided vectors, a cluster wider than the
    kernel's tile of member slots, members padded with repeats, clusters given as int32, d not a block multiple,
    and ``out`` given as a slice of a wider buffer."""
    import torch

    from vqexport.head.spec import make_head, padded_members

    kernel, device = kernel
    V, d, K, P = 700, 160, 12, 3
    rng = np.random.default_rng(11)
    mapping = np.concatenate([np.zeros(100), rng.integers(1, K, V - 100)]).astype(np.int32)  # cluster 0: 100 wide
    head = make_head({"codebook": rng.standard_normal((K, d)).astype(np.float32) * d**-0.5 * 4, "map": mapping,
                      "bias": rng.standard_normal(V).astype(np.float32)}, probes=P)
    assert head.members.shape[1] >= 100
    W = rng.standard_normal((V, d)).astype(np.float32) * d**-0.5 * 3
    wb = rng.standard_normal(V).astype(np.float32)
    h = rng.standard_normal((4, d)).astype(np.float32)
    top = np.stack([np.argsort(-head.route_scores(h[i]))[:P] for i in range(4)])
    top[:, 0] = 0  # the wide cluster probed everywhere
    want = head.tail_logits(h)  # the definition, with these clusters probed
    for n in range(4):
        probed = np.isin(head.map, top[n])
        want[n, probed] = h[n].astype(np.float64) @ W[probed].T.astype(np.float64) + wb[probed]
    on = _on(device)
    wide = torch.zeros((V, d + 7)).to(device)
    wide[:, :d] = on(W)
    strided = lambda a: torch.from_numpy(np.repeat(a, 2)).to(device)[::2]  # noqa: E731  a view, stride 2
    for rows in (wide[:, :d], on(W.T.copy()).t()):  # rows of stride d + 7; a transposed view (copied)
        buf = torch.full((4, V + 5), -7.0).to(device)
        got = kernel.two_stage_logits(on(h), on(head.codebook.T), strided(mapping), strided(head.bias),
                                      on(padded_members(head)), rows, P, rows_bias=strided(wb),
                                      top=on(top.astype(np.int32)), out=buf[:, :V])
        assert got.data_ptr() == buf.data_ptr()
        np.testing.assert_allclose(buf[:, :V].cpu().numpy(), want, atol=2e-4, rtol=1e-5)
        assert (buf[:, V:] == -7.0).all()


@pytest.mark.parametrize("change, match", [
    ({"out": "wrong shape"}, r"out must be float32 \[2, 500\]"),
    ({"out": "3-d view"}, "out must be contiguous"),
    ({"top": [[0, 1, 20]]}, r"top must hold cluster indices in \[0, 20\)"),
    ({"top": [[0, 1]]}, r"top must be \[2, 3\]"),
    ({"bias": 499}, r"bias must be \[500\]"),
    ({"route_bias": 19}, r"route_bias must be \[20\]"),
    ({"rows_bias": 501}, r"rows_bias must be \[500\]"),
])
def test_two_stage_kernel_refuses_what_it_would_misread(kernel, change, match):
    import torch

    kernel, device = kernel
    V, d, K, P = 500, 32, 20, 3
    head = _two_stage(V, d, K, P)
    on = _on(device)
    kw = {}
    for name, value in change.items():
        if name == "out":
            kw["out"] = (torch.zeros((2, V + 1)) if value == "wrong shape" else torch.zeros((2, 1, 2 * V))[..., ::2]).to(device)
        elif name == "top":
            kw["top"] = torch.tensor(value * 2).to(device)
        else:
            kw[name] = torch.zeros(value).to(device)
    bias = kw.pop("bias", on(head.bias))
    shape = (2, 1, d) if change.get("out") == "3-d view" else (2, d)
    with pytest.raises(ValueError, match=match):
        kernel.two_stage_logits(torch.zeros(shape).to(device), on(head.codebook.T), on(head.map), bias, on(head.members),
                                torch.zeros((V, d)).to(device), P, **kw)


def test_two_stage_kernel_probes_the_clusters_it_is_given(kernel):
    kernel, device = kernel
    V, d, K, P = 500, 32, 20, 3
    head = _two_stage(V, d, K, P)
    rng = np.random.default_rng(5)
    W = rng.standard_normal((V, d)).astype(np.float32)
    h = rng.standard_normal((2, d)).astype(np.float32)
    top = np.argsort(head.route_scores(h), axis=-1)[:, :P]  # the worst clusters: not the router's choice
    on = _on(device)
    got = kernel.two_stage_logits(on(h), on(head.codebook.T), on(head.map), on(head.bias), on(head.members), on(W),
                                  P, top=on(top)).cpu().numpy()
    tail = head.tail_logits(h)
    for n in range(2):
        probed = np.isin(head.map, top[n])
        np.testing.assert_allclose(got[n, probed], h[n].astype(np.float64) @ W[probed].T.astype(np.float64), atol=2e-4)
        np.testing.assert_allclose(got[n, ~probed], tail[n, ~probed], atol=2e-4)


@pytest.mark.parametrize("probes, members_shape, rows_shape, match", [
    (0, None, None, r"probes must be in \[1, 20\]"),
    (21, None, None, r"probes must be in \[1, 20\]"),
    (3, (19, 40), None, r"members must be \[20, cap\] and rows \[500, 32\]"),
    (3, None, (500, 31), r"members must be \[20, cap\] and rows \[500, 32\]"),
])
def test_two_stage_kernel_refuses_inconsistent_shapes(kernel, probes, members_shape, rows_shape, match):
    import torch

    kernel, device = kernel
    V, d, K = 500, 32, 20
    head = _two_stage(V, d, K, 3)
    on = _on(device)
    members = torch.zeros(members_shape, dtype=torch.int32) if members_shape else on(head.members)
    rows = torch.zeros(rows_shape) if rows_shape else torch.zeros((V, d))
    with pytest.raises(ValueError, match=match):
        kernel.two_stage_logits(torch.zeros((1, d)), on(head.codebook.T), on(head.map), on(head.bias), members,
                                rows, probes)


def test_the_two_stage_benchmarks_problem_and_parity_figure(kernel):
    """ops/vqlogits/gpu/bench.py --head two-stage, its parts that are not timing, at a small shape: the kernel and
    the torch form on its problem agree with its float64 figure, and the figure sees a wrong probe."""
    import importlib.util

    import torch

    kernel, device = kernel
    spec = importlib.util.spec_from_file_location("vqlogits_gpu_bench", source_path().with_name("bench.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    t = bench.two_stage_problem(torch.Generator().manual_seed(0), 320, 32, 20, device)
    assert sorted(t["members"].flatten().tolist()) == list(range(320))
    assert all((t["mapping"][t["members"][c].long()] == c).all() for c in range(20))
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(device)
    args = (t["codebook_t"], t["mapping"], t["bias"], t["members"], t["rows"], 4)
    top = bench.route_top(h, t, 4)
    assert bench.two_stage_error(h, t, top, kernel.two_stage_logits(h, *args, route_bias=t["route_bias"])) < 1e-4
    assert bench.two_stage_error(h, t, top, kernel.two_stage_reference(h, *args, route_bias=t["route_bias"])) < 1e-4
    worst = torch.topk(-(h @ t["codebook_t"] + t["route_bias"]), 4, dim=-1).indices
    assert bench.two_stage_error(h, t, top, kernel.two_stage_logits(h, *args, route_bias=t["route_bias"], top=worst)) > 0.1

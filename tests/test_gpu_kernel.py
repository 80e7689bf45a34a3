"""The fused op's GPU kernel (ops/vqlogits/gpu, Triton) against the op's formula; runs where a CUDA GPU and Triton exist."""

import numpy as np
import pytest

from vqexport.ops.gpu import load_kernel, source_path


def _cuda_or_skip():
    import torch
    pytest.importorskip("triton", reason="Triton is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    return torch


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
def test_kernel_matches_formula(shape_h, lowrank):
    torch = _cuda_or_skip()
    kernel = load_kernel()
    d = shape_h[-1]
    K, V, r = 37, 3001, 8  # V not a multiple of any block size
    rng = np.random.default_rng(sum(shape_h) + lowrank)
    h = rng.standard_normal(shape_h).astype(np.float32)
    ct = (rng.standard_normal((d, K)) / np.sqrt(d)).astype(np.float32)
    m = rng.integers(0, K, V).astype(np.int32)
    b = rng.standard_normal(V).astype(np.float32)
    p = (rng.standard_normal((d, r)) / np.sqrt(d)).astype(np.float32) if lowrank else None
    u = rng.standard_normal((r, V)).astype(np.float32) if lowrank else None
    cuda = lambda a: None if a is None else torch.from_numpy(a).cuda()  # noqa: E731
    got = kernel.vq_logits(cuda(h), cuda(ct), cuda(m), cuda(b), cuda(p), cuda(u))
    torch.cuda.synchronize()
    assert got.shape == (*shape_h[:-1], V) and got.dtype == torch.float32
    np.testing.assert_allclose(got.cpu().numpy(), _formula(h, ct, m, b, p, u), atol=2e-4, rtol=1e-5)


def test_kernel_refuses_half_a_lowrank_term():
    torch = _cuda_or_skip()
    kernel = load_kernel()
    x = torch.zeros((1, 8), device="cuda")
    with pytest.raises(ValueError, match="both"):
        kernel.vq_logits(x, torch.zeros((8, 4), device="cuda"), torch.zeros(5, dtype=torch.int32, device="cuda"),
                         torch.zeros(5, device="cuda"), lowrank_p_t=torch.zeros((8, 2), device="cuda"))

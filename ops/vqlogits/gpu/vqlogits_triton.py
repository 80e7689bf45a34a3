"""The fused VQLogits op on a GPU, in Triton: the kernel the TensorRT plugin runs.

    logits = (hidden @ codebook_t)[..., map] + bias  [+ (hidden @ lowrank_p_t) @ lowrank_u_t]

Two launches:

1. ``_matmul``: z = hidden @ codebook_t, [N, K] (and t = hidden @ lowrank_p_t, [N, r], with the low-rank term),
   fp32 with IEEE products (no TF32), so results match the fp32 reference to rounding.
2. ``_select``: each program owns a [BLOCK_N, BLOCK_V] tile of the output: it loads BLOCK_V map entries and
   biases once, gathers z at those codes for BLOCK_N rows (z is N x K floats: cache resident), adds the bias and,
   with the low-rank term, sum_r t[n, r] * u_t[r, v]. The V-wide output is written once; nothing else is V-sized.

Inputs are torch CUDA tensors (the plugin wraps TensorRT's buffers as torch tensors without copying).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _matmul(a_ptr, b_ptr, c_ptr, N, D, M, stride_a, stride_b, stride_c,
            BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        ks = k0 + tl.arange(0, BLOCK_D)
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < D), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_b + cols[None, :], mask=(ks[:, None] < D) & (cols[None, :] < M), other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    tl.store(c_ptr + rows[:, None] * stride_c + cols[None, :], acc, mask=(rows[:, None] < N) & (cols[None, :] < M))


@triton.jit
def _select(z_ptr, map_ptr, bias_ptr, t_ptr, u_ptr, out_ptr, N, V, R, stride_z, stride_t, stride_u, stride_out,
            HAS_LOWRANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    codes = tl.load(map_ptr + cols, mask=cmask, other=0)
    bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0)
    both = rmask[:, None] & cmask[None, :]
    acc = tl.load(z_ptr + rows[:, None] * stride_z + codes[None, :], mask=both, other=0.0) + bias[None, :]
    if HAS_LOWRANK:
        for r in range(0, R):
            tr = tl.load(t_ptr + rows * stride_t + r, mask=rmask, other=0.0)
            ur = tl.load(u_ptr + r * stride_u + cols, mask=cmask, other=0.0)
            acc += tr[:, None] * ur[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc, mask=both)


def _matmul_into(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    N, D = a.shape
    M = b.shape[1]
    # Few rows (decode): narrow column tiles so the K codebook columns spread over more SMs.
    BLOCK_N, BLOCK_M, BLOCK_D = (16, 16, 64) if N <= 16 else (32, 64, 32)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    _matmul[grid](a, b, c, N, D, M, a.stride(0), b.stride(0), c.stride(0), BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)


def vq_logits(hidden: torch.Tensor, codebook_t: torch.Tensor, mapping: torch.Tensor, bias: torch.Tensor,
              lowrank_p_t: torch.Tensor | None = None, lowrank_u_t: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """VQLogits on CUDA tensors: hidden [..., d] f32, codebook_t [d, K] f32, map [V] int32, bias [V] f32,
    optionally lowrank_p_t [d, r] and lowrank_u_t [r, V] f32 (both or neither). Returns (or fills) [..., V] f32."""
    if (lowrank_p_t is None) != (lowrank_u_t is None):
        raise ValueError("the low-rank term needs both lowrank_p_t and lowrank_u_t")
    d, K = codebook_t.shape
    V = mapping.shape[0]
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, d).contiguous()
    N = h.shape[0]
    if out is None:
        out = torch.empty((*lead, V), dtype=torch.float32, device=hidden.device)
    if N == 0:
        return out
    out2 = out.view(N, V)
    z = torch.empty((N, K), dtype=torch.float32, device=hidden.device)
    _matmul_into(h, codebook_t.contiguous(), z)
    has_lowrank = lowrank_p_t is not None
    if has_lowrank:
        R = lowrank_p_t.shape[1]
        t = torch.empty((N, R), dtype=torch.float32, device=hidden.device)
        _matmul_into(h, lowrank_p_t.contiguous(), t)
        u = lowrank_u_t.contiguous()
    else:
        R, t, u = 0, z, z  # unused pointers
    BLOCK_N = 1 if N == 1 else min(16, triton.next_power_of_2(N))
    BLOCK_V = 1024 if BLOCK_N <= 2 else 256
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(V, BLOCK_V))
    _select[grid](z, mapping, bias, t, u, out2, N, V, R, z.stride(0), t.stride(0), u.stride(0), out2.stride(0),
                  HAS_LOWRANK=has_lowrank, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)
    return out


def torch_reference(hidden, codebook_t, mapping, bias, lowrank_p_t=None, lowrank_u_t=None):
    """The same op in plain torch (what the kernel is timed against)."""
    z = hidden @ codebook_t
    logits = z.index_select(-1, mapping.long()) + bias
    if lowrank_p_t is not None:
        logits = logits + (hidden @ lowrank_p_t) @ lowrank_u_t
    return logits

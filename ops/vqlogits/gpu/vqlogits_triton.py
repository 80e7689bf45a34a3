"""The VQ-Logits heads on a GPU, in Triton: the fused VQLogits op (the kernel the TensorRT plugin runs) and the
two-stage head.

    logits = (hidden @ codebook_t)[..., map] + bias  [+ (hidden @ lowrank_p_t) @ lowrank_u_t]

Two launches:

1. ``_matmul``: z = hidden @ codebook_t, [N, K] (and t = hidden @ lowrank_p_t, [N, r], with the low-rank term),
   fp32 with IEEE products (no TF32), so results match the fp32 reference to rounding.
2. ``_select``: each program owns a [BLOCK_N, BLOCK_V] tile of the output: it loads BLOCK_V map entries and
   biases once, gathers z at those codes for BLOCK_N rows (z is N x K floats: cache resident), adds the bias and,
   with the low-rank term, sum_r t[n, r] * u_t[r, v]. The V-wide output is written once; nothing else is V-sized.

The two-stage head (``two_stage_logits``; vqexport.head.module.TwoStageHead is its definition) adds two steps:
the P best clusters by z (+ the router's bias) (``torch.topk``), then ``_rescore``: one program per position and
probed cluster reads the cluster's member ids and their rows of the model's own output layer (the shared table, in
its own dtype, in place: nothing is gathered into a buffer first), takes their dot products with h in fp32, adds
the rows' bias and writes the exact logits over the VQ logits ``_select`` wrote. Per position it reads K codebook
columns and P * cap rows instead of the V rows of a dense head.

Inputs are torch CUDA tensors (the plugin wraps TensorRT's buffers as torch tensors without copying). Under Triton's
interpreter (TRITON_INTERPRET=1 before this module is imported) they may be CPU tensors: how the tests check the
kernels' indexing on machines without a GPU.
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
            HAS_BIAS: tl.constexpr, HAS_LOWRANK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # N * V can pass 2**31 in a prefill
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask = rows < N
    cmask = cols < V
    codes = tl.load(map_ptr + cols, mask=cmask, other=0)
    both = rmask[:, None] & cmask[None, :]
    acc = tl.load(z_ptr + rows[:, None] * stride_z + codes[None, :], mask=both, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    if HAS_LOWRANK:
        for r in range(0, R):
            tr = tl.load(t_ptr + rows * stride_t + r, mask=rmask, other=0.0)
            ur = tl.load(u_ptr + r * stride_u + cols, mask=cmask, other=0.0)
            acc += tr[:, None] * ur[None, :]
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc, mask=both)


@triton.jit
def _rescore(h_ptr, top_ptr, members_ptr, rows_ptr, rows_bias_ptr, out_ptr, D, CAP, stride_h, stride_top,
             stride_members, stride_rows, stride_out, HAS_ROWS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    cluster = tl.load(top_ptr + n * stride_top + p).to(tl.int64)
    for c0 in range(0, CAP, BLOCK_C):  # the member table's slots, BLOCK_C at a time (clusters may be unequal)
        slots = c0 + tl.arange(0, BLOCK_C)
        ids = tl.load(members_ptr + cluster * stride_members + slots, mask=slots < CAP, other=-1).to(tl.int64)
        smask = ids >= 0  # -1: padding of a short cluster
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_D):
            ks = k0 + tl.arange(0, BLOCK_D)
            kmask = ks < D
            hv = tl.load(h_ptr + n * stride_h + ks, mask=kmask, other=0.0)
            w = tl.load(rows_ptr + ids[:, None] * stride_rows + ks[None, :], mask=smask[:, None] & kmask[None, :],
                        other=0.0).to(tl.float32)
            acc += tl.sum(w * hv[None, :], axis=1)
        if HAS_ROWS_BIAS:
            acc += tl.load(rows_bias_ptr + ids, mask=smask, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * stride_out + ids, acc, mask=smask)


def _matmul_into(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> None:
    N, D = a.shape
    M = b.shape[1]
    # Few rows (decode): narrow column tiles so the K codebook columns spread over more SMs.
    BLOCK_N, BLOCK_M, BLOCK_D = (16, 16, 64) if N <= 16 else (32, 64, 32)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(M, BLOCK_M))
    _matmul[grid](a, b, c, N, D, M, a.stride(0), b.stride(0), c.stride(0), BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)


def _check_lowrank(lowrank_p_t, lowrank_u_t) -> None:
    if (lowrank_p_t is None) != (lowrank_u_t is None):
        raise ValueError("the low-rank term needs both lowrank_p_t and lowrank_u_t")


def _vq_into(h: torch.Tensor, codebook_t, mapping, bias, lowrank_p_t, lowrank_u_t, out2: torch.Tensor) -> torch.Tensor:
    """Fill out2 [N, V] with the VQ logits of h [N, d] (N > 0); returns z = h @ codebook_t [N, K]."""
    N = h.shape[0]
    V = mapping.shape[0]
    mapping = mapping.contiguous()  # the kernels index vectors by position: a strided view would be misread
    has_bias = bias is not None
    bias = bias.contiguous() if has_bias else mapping  # an unused pointer without one
    z = torch.empty((N, codebook_t.shape[1]), dtype=torch.float32, device=h.device)
    _matmul_into(h, codebook_t.contiguous(), z)
    has_lowrank = lowrank_p_t is not None
    if has_lowrank:
        R = lowrank_p_t.shape[1]
        t = torch.empty((N, R), dtype=torch.float32, device=h.device)
        _matmul_into(h, lowrank_p_t.contiguous(), t)
        u = lowrank_u_t.contiguous()
    else:
        R, t, u = 0, z, z  # unused pointers
    BLOCK_N = 1 if N == 1 else min(16, triton.next_power_of_2(N))
    BLOCK_V = 1024 if BLOCK_N <= 2 else 256
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(V, BLOCK_V))
    _select[grid](z, mapping, bias, t, u, out2, N, V, R, z.stride(0), t.stride(0), u.stride(0), out2.stride(0),
                  HAS_BIAS=has_bias, HAS_LOWRANK=has_lowrank, BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V)
    return z


def _check_vectors(**vectors) -> None:
    for name, (v, n) in vectors.items():
        if v is not None and tuple(v.shape) != (n,):
            raise ValueError(f"{name} must be [{n}], got {list(v.shape)}")


def _output(out: torch.Tensor | None, lead: tuple, V: int, device) -> torch.Tensor:
    if out is None:
        return torch.empty((*lead, V), dtype=torch.float32, device=device)
    if tuple(out.shape) != (*lead, V) or out.dtype != torch.float32:
        raise ValueError(f"out must be float32 {[*lead, V]}, got {out.dtype} {list(out.shape)}")
    if out.stride(-1) != 1 or (out.dim() > 2 and not out.is_contiguous()):
        raise ValueError("out must be contiguous (or [N, V] with contiguous rows)")
    return out


def vq_logits(hidden: torch.Tensor, codebook_t: torch.Tensor, mapping: torch.Tensor, bias: torch.Tensor,
              lowrank_p_t: torch.Tensor | None = None, lowrank_u_t: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """VQLogits on CUDA tensors: hidden [..., d] f32, codebook_t [d, K] f32, map [V] int32, bias [V] f32 (or None),
    optionally lowrank_p_t [d, r] and lowrank_u_t [r, V] f32 (both or neither). Returns (or fills) [..., V] f32."""
    _check_lowrank(lowrank_p_t, lowrank_u_t)
    d = codebook_t.shape[0]
    V = mapping.shape[0]
    h = hidden.reshape(-1, d).contiguous()
    out = _output(out, hidden.shape[:-1], V, hidden.device)
    if h.shape[0]:
        _vq_into(h, codebook_t, mapping, bias, lowrank_p_t, lowrank_u_t, out.view(-1, V))
    return out


def two_stage_logits(hidden: torch.Tensor, codebook_t: torch.Tensor, mapping: torch.Tensor, bias: torch.Tensor,
                     members: torch.Tensor, rows: torch.Tensor, probes: int, rows_bias: torch.Tensor | None = None,
                     route_bias: torch.Tensor | None = None, lowrank_p_t: torch.Tensor | None = None,
                     lowrank_u_t: torch.Tensor | None = None, top: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The two-stage head on CUDA tensors: the VQ logits (as ``vq_logits``; ``bias`` may be None), with the tokens of
    the ``probes`` best clusters by ``z + route_bias`` rescored exactly, ``h @ rows[v] (+ rows_bias[v])``.

    members [K, cap] int32 or int64: a partition of [0, V), a short cluster padded with -1 or with repeats of one of
    its members. rows [V, d]: the model's output layer in any float dtype, read in place when its rows are
    contiguous (a transposed view is copied first). rows_bias [V] and route_bias [K] optional. ``top`` [..., P]
    int: probe these clusters (each in [0, K)) instead of the router's choice. Returns (or fills ``out``, float32
    [..., V]) the logits."""
    _check_lowrank(lowrank_p_t, lowrank_u_t)
    d, K = codebook_t.shape
    V = mapping.shape[0]
    if not 1 <= probes <= K:
        raise ValueError(f"probes must be in [1, {K}], got {probes}")
    if members.dim() != 2 or members.shape[0] != K or rows.shape != (V, d):
        raise ValueError(f"members must be [{K}, cap] and rows [{V}, {d}], got {list(members.shape)} and {list(rows.shape)}")
    _check_vectors(bias=(bias, V), rows_bias=(rows_bias, V), route_bias=(route_bias, K))
    lead = hidden.shape[:-1]
    if top is not None:
        if tuple(top.shape) != (*lead, probes):
            raise ValueError(f"top must be {[*lead, probes]}, got {list(top.shape)}")
        if top.numel() and not (0 <= int(top.min()) and int(top.max()) < K):
            raise ValueError(f"top must hold cluster indices in [0, {K})")
    h = hidden.reshape(-1, d).contiguous()
    N = h.shape[0]
    out = _output(out, lead, V, hidden.device)
    if N == 0:
        return out
    out2 = out.view(N, V)
    z = _vq_into(h, codebook_t, mapping, bias, lowrank_p_t, lowrank_u_t, out2)
    if top is None:
        top = torch.topk(z if route_bias is None else z + route_bias, probes, dim=-1).indices
    top = top.reshape(N, probes).contiguous()
    members = members.contiguous()
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    has_rows_bias = rows_bias is not None
    cap = members.shape[1]
    _rescore[(N, probes)](h, top, members, rows, rows_bias.contiguous() if has_rows_bias else h, out2, d, cap,
                          h.stride(0), top.stride(0), members.stride(0), rows.stride(0), out2.stride(0),
                          HAS_ROWS_BIAS=has_rows_bias, BLOCK_C=min(32, triton.next_power_of_2(cap)), BLOCK_D=128)
    return out


def torch_reference(hidden, codebook_t, mapping, bias, lowrank_p_t=None, lowrank_u_t=None, z=None):
    """The same op in plain torch (what the kernel is timed against); ``z``: hidden @ codebook_t, if known."""
    z = hidden @ codebook_t if z is None else z
    logits = z.index_select(-1, mapping.long())
    if bias is not None:
        logits = logits + bias
    if lowrank_p_t is not None:
        logits = logits + (hidden @ lowrank_p_t) @ lowrank_u_t
    return logits


def two_stage_reference(hidden, codebook_t, mapping, bias, members, rows, probes, rows_bias=None, route_bias=None,
                        lowrank_p_t=None, lowrank_u_t=None):
    """The two-stage head in plain torch ops, probed rows gathered then multiplied (what the kernel is timed
    against; it reads the same bytes, through a [N, P * cap, d] copy)."""
    z = hidden @ codebook_t
    logits = torch_reference(hidden, codebook_t, mapping, bias, lowrank_p_t, lowrank_u_t, z=z)
    top = torch.topk(z if route_bias is None else z + route_bias, probes, dim=-1).indices
    members = members.long()
    members = torch.where(members >= 0, members, members[:, :1])  # -1 padding: a repeat of the first member
    ids = members[top].flatten(-2)  # [..., P * cap]
    exact = (rows[ids].float() @ hidden.unsqueeze(-1)).squeeze(-1)
    if rows_bias is not None:
        exact = exact + rows_bias[ids].float()
    return logits.scatter_(-1, ids, exact)

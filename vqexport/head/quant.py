"""Symmetric per-row int8 quantization (zero point 0, float32 scales). numpy only."""

from __future__ import annotations

import numpy as np

from ..errors import VQExportError


def quantize_rows(w: np.ndarray, name: str = "codebook", bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """w [R, C] float -> (q [R, C] int8, scale [R] float32) with ``w ≈ q * scale[:, None]``.

    ``bits`` = 8 uses codes in [-127, 127]; 7 uses [-63, 63] ("reduce range": what x86 CPUs without VNNI need for
    int8 x int8 products, whose pairwise int16 sums otherwise saturate); 4 uses [-7, 7]. An all-zero row gets scale 1.0 (its codes
    are all 0, so it dequantizes to exact zeros). Non-finite values cannot be quantized and are a user error.
    """
    if bits not in (4, 7, 8):
        raise ValueError(f"bits must be 4, 7 or 8, got {bits}")
    qmax = float(2 ** (bits - 1) - 1)
    w = np.asarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        bad = np.unravel_index(int(np.flatnonzero(~np.isfinite(w))[0]), w.shape)
        raise VQExportError(f"cannot quantize {name}: non-finite value at index {list(map(int, bad))}")
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -qmax, qmax).astype(np.int8)
    return q, scale


def dequantize_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]

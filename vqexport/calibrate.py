"""Calibration of the head's int8 activations: the largest |value| entering each head MatMul on the verify prompts.

    hidden    max |h|        (the codebook MatMul and the rank-r projection read it)
    lowrank   max |h · Pᵀ|   (the rank-r correction's second MatMul reads it)

Scales are amax / 127 (symmetric, zero point 0). The hidden states come from the PyTorch reference, so calibration
needs no runtime.
"""

from __future__ import annotations

import numpy as np


def activation_scales(reference, source) -> dict[str, float]:
    from .verify import left_pad, prompt_ids

    geo = source.geometry
    ids, mask = left_pad(prompt_ids(source.tokenizer_path, geo.vocab_size))
    h, _ = reference.hidden(ids, mask, reference.empty_past(ids.shape[0]))
    h = h.numpy()[mask.astype(bool)].astype(np.float64)
    amax = {"hidden": float(np.abs(h).max())}
    if source.head.lowrank is not None:
        amax["lowrank"] = float(np.abs(h @ source.head.lowrank[0].astype(np.float64).T).max())
    return {k: max(v, 1e-8) / 127.0 for k, v in amax.items()}

"""The two optimization profiles of a TensorRT decoder engine, from the profile's [trt.prefill] / [trt.decode].

Profile 0 (prefill): ``input_ids`` [B, S], ``attention_mask`` [B, S], empty past [B, Hkv, 0, hd].
Profile 1 (decode):  ``input_ids`` [B, 1], ``attention_mask`` [B, P + 1], past [B, Hkv, P, hd].
Used by the engine builder and, on CPU, by the readiness check (tensor sizes at the max shapes).
"""

from __future__ import annotations

from ...errors import VQExportError
from ...graph_io import BATCH, PAST, SEQ, TOTAL, cache_dims, cache_names
from ...source import Geometry
from ...target_options import TrtOptions

PROFILES = ("prefill", "decode")


def dim_values(trt: TrtOptions, which: str, point: str) -> dict[str, int]:
    """Symbolic axis name -> size for one profile at ``point`` ("min" | "opt" | "max")."""
    if which == "prefill":
        b, s = getattr(trt.prefill_batch, point), getattr(trt.prefill_sequence, point)
        return {BATCH: b, SEQ: s, PAST: 0, TOTAL: s}
    b, p = getattr(trt.decode_batch, point), getattr(trt.decode_past, point)
    return {BATCH: b, SEQ: 1, PAST: p, TOTAL: p + 1}


def input_shapes(trt: TrtOptions, cfg: Geometry) -> list[dict[str, tuple[tuple[int, ...], ...]]]:
    """Per profile: input name -> (min, opt, max) shapes, for IOptimizationProfile.set_shape."""
    past, _ = cache_names(cfg.kv_layers)
    out = []
    for which in PROFILES:
        points = [dim_values(trt, which, p) for p in ("min", "opt", "max")]
        shapes = {"input_ids": tuple((d[BATCH], d[SEQ]) for d in points),
                  "attention_mask": tuple((d[BATCH], d[TOTAL]) for d in points)}
        for j, name in enumerate(past):
            heads, *sizes = cache_dims(cfg.kv_shapes[j // 2])
            shapes[name] = tuple((d[BATCH], heads, d[PAST], sizes[j % 2]) for d in points)
        out.append(shapes)
    return out


def profile_for(past_len: int) -> int:
    """Which optimization profile serves a step: 0 for a prompt (no past), 1 for decode."""
    return 0 if past_len == 0 else 1


def check_fits_model(trt: TrtOptions, cfg: Geometry, where: str) -> None:
    if trt.prefill_sequence.max > cfg.max_position:
        raise VQExportError(f"{where}: trt.prefill.sequence max {trt.prefill_sequence.max} exceeds the model's "
                            f"max_position {cfg.max_position}")
    if trt.decode_past.max + 1 > cfg.max_position:
        raise VQExportError(f"{where}: trt.decode.past max {trt.decode_past.max} + 1 exceeds the model's "
                            f"max_position {cfg.max_position}")


def check_fits_run(trt: TrtOptions, batch: int, prompt_len: int, steps: int, where: str, built: bool = False) -> None:
    """Refuse a run (parity prompts, bench) the engine's profiles cannot serve, naming the range to widen (``built``:
    the engine exists, so the run must fit it instead)."""
    def need(rng, v, name):
        if not rng.min <= v <= rng.max:
            fix = (f"keep the run within it, or rebuild with a wider [trt] {name}" if built
                   else f"widen [trt] {name} in the profile")
            raise VQExportError(f"{where}: {name} = {v} is outside the engine's range [{rng.min}, {rng.max}]; {fix}")

    need(trt.prefill_batch, batch, "prefill.batch")
    need(trt.prefill_sequence, prompt_len, "prefill.sequence")
    if steps:
        need(trt.decode_batch, batch, "decode.batch")
        need(trt.decode_past, prompt_len, "decode.past")
        need(trt.decode_past, prompt_len + steps - 1, "decode.past")

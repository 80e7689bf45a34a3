"""Profile tables of the TensorRT backend (``[trt]``) and the Triton serving layout (``[triton]``).

Parsed here so profiles.py stays about what every target shares. Shapes are ``[min, opt, max]`` triples:

    [trt.prefill]            # optimization profile 0: the prompt (no past)
    batch = [1, 1, 8]
    sequence = [1, 64, 512]
    [trt.decode]             # optimization profile 1: one new token on top of a KV cache
    batch = [1, 1, 8]
    past = [1, 128, 1023]
"""

from __future__ import annotations

from dataclasses import dataclass

HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")


@dataclass(frozen=True)
class ShapeRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TrtOptions:
    prefill_batch: ShapeRange = ShapeRange(1, 1, 8)
    prefill_sequence: ShapeRange = ShapeRange(1, 64, 512)
    decode_batch: ShapeRange = ShapeRange(1, 1, 8)
    decode_past: ShapeRange = ShapeRange(1, 128, 1023)
    version_compatible: bool = False  # engine runs on later TensorRT versions (lean runtime); no host code
    hardware_compatibility: str = "none"  # "none" | "ampere_plus" | "same_compute_capability"
    builder_optimization_level: int = 3
    workspace_mib: int = 0  # 0: TensorRT's default (all device memory)
    timing_cache: bool = True  # keep timing.cache in the artifact and reuse it on rebuilds


@dataclass(frozen=True)
class TritonOptions:
    enabled: bool = False  # lay the artifact out as a Triton Inference Server model repository
    model_name: str = "vqlogits"
    max_batch_size: int = 8
    preferred_batch_sizes: tuple[int, ...] = (4, 8)
    max_queue_delay_microseconds: int = 100
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"


def _shape(t: dict, key: str, where: str, default: ShapeRange, fail, least: int = 1) -> ShapeRange:
    if key not in t:
        return default
    v = t[key]
    if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, int) and not isinstance(x, bool) for x in v)):
        fail(f"{where}.{key} must be [min, opt, max] integers, got {v!r}")
    lo, opt, hi = v
    if lo < least:
        fail(f"{where}.{key}: min {lo} must be >= {least}")
    if not lo <= opt <= hi:
        fail(f"{where}.{key} = {v}: inconsistent shapes, need min <= opt <= max")
    return ShapeRange(lo, opt, hi)


def _table(raw: dict, key: str, allowed, fail, prefix: str = "") -> dict:
    t = raw.get(key, {})
    if not isinstance(t, dict):
        fail(f"[{prefix}{key}] must be a table")
    unknown = set(t) - set(allowed)
    if unknown:
        fail(f"unknown key(s) in [{prefix}{key}]: {', '.join(sorted(unknown))}")
    return t


def _value(t: dict, key: str, kind, default, where: str, fail, check=None, desc: str = ""):
    if key not in t:
        return default
    v = t[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)) or (check is not None and not check(v)):
        fail(f"{where}.{key} must be {desc or kind.__name__}, got {v!r}")
    return v


def parse_trt(raw: dict, fail) -> TrtOptions:
    keys = {"prefill", "decode", "version_compatible", "hardware_compatibility", "builder_optimization_level",
            "workspace_mib", "timing_cache"}
    t = _table(raw, "trt", keys, fail)
    pre = _table(t, "prefill", {"batch", "sequence"}, fail, "trt.")
    dec = _table(t, "decode", {"batch", "past"}, fail, "trt.")
    d = TrtOptions()
    return TrtOptions(
        prefill_batch=_shape(pre, "batch", "trt.prefill", d.prefill_batch, fail),
        prefill_sequence=_shape(pre, "sequence", "trt.prefill", d.prefill_sequence, fail),
        decode_batch=_shape(dec, "batch", "trt.decode", d.decode_batch, fail),
        decode_past=_shape(dec, "past", "trt.decode", d.decode_past, fail),
        version_compatible=_value(t, "version_compatible", bool, False, "trt", fail, None, "true or false"),
        hardware_compatibility=_value(t, "hardware_compatibility", str, "none", "trt", fail, lambda v: v in HARDWARE_COMPAT,
                                      " or ".join(map(repr, HARDWARE_COMPAT))),
        builder_optimization_level=_value(t, "builder_optimization_level", int, 3, "trt", fail, lambda v: 0 <= v <= 5,
                                          "an integer in [0, 5]"),
        workspace_mib=_value(t, "workspace_mib", int, 0, "trt", fail, lambda v: v >= 0, "an integer >= 0"),
        timing_cache=_value(t, "timing_cache", bool, True, "trt", fail, None, "true or false"),
    )


def parse_triton(raw: dict, fail) -> TritonOptions:
    import re

    if "triton" not in raw:
        return TritonOptions()
    keys = set(TritonOptions.__dataclass_fields__) - {"enabled"}
    t = _table(raw, "triton", keys, fail)
    name = _value(t, "model_name", str, "vqlogits", "triton", fail,
                  lambda v: bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v)) and v not in (".", ".."),
                  "a name of letters, digits, '.', '_' or '-' (it names the model directory)")
    mbs = _value(t, "max_batch_size", int, 8, "triton", fail, lambda v: v >= 1, "an integer >= 1")
    pref = _value(t, "preferred_batch_sizes", list, [4, 8], "triton", fail,
                  lambda v: all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x for x in v),
                  "a list of positive integers")
    if any(x > mbs for x in pref):
        fail(f"triton.preferred_batch_sizes {pref} exceed max_batch_size {mbs}")
    return TritonOptions(
        enabled=True, model_name=name, max_batch_size=mbs, preferred_batch_sizes=tuple(sorted(set(pref))),
        max_queue_delay_microseconds=_value(t, "max_queue_delay_microseconds", int, 100, "triton", fail, lambda v: v >= 0,
                                            "an integer >= 0"),
        instance_count=_value(t, "instance_count", int, 1, "triton", fail, lambda v: v >= 1, "an integer >= 1"),
        instance_kind=_value(t, "instance_kind", str, "KIND_CPU", "triton", fail, lambda v: v in INSTANCE_KINDS,
                             " or ".join(map(repr, INSTANCE_KINDS))),
    )

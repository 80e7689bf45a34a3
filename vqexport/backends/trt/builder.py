"""Build a TensorRT engine from the exported graph: parse, two optimization profiles, precision, timing cache.

Writes ``model.onnx`` (the portable graph, as for every target), ``model.plan`` (the serialized engine) and
``timing.cache``; returns the manifest's ``runtime`` section with the engine's metadata (TensorRT version,
GPU and compute capability, compatibility level, profiles).

Precision: fp16 keeps the head (codebook logits, selection, bias) and the ``logits`` output in fp32 through
per-layer precision constraints (TensorRT 10's weakly typed builder flags). int8 needs no flag: the graph's
explicit Q/DQ pairs say where int8 runs, and the network is built strongly typed.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ...checkpoint import Checkpoint
from ...errors import VQExportError
from ...graph import find_head
from ...profiles import Profile
from .env import probe, require
from .prepare import prepare_for_trt
from .shapes import PROFILES, input_shapes

MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"


def head_node_names(proto: onnx.ModelProto) -> set[str]:
    """ONNX node names of the head (the layers that stay fp32 under an fp16 build)."""
    head = find_head(proto)
    names = {n.name for n in (head.matmul, head.gather, head.add) if n is not None}
    names |= {n.name for n in proto.graph.node if n.name.startswith("head/")}
    return {n for n in names if n}


def _is_head_layer(layer_name: str, heads: set[str]) -> bool:
    return layer_name in heads or any(layer_name.startswith(h + "_") or layer_name.startswith(h + "/") for h in heads)


def pin_head_fp32(network, heads: set[str], trt) -> int:
    """Constrain the head's layers and the logits output to fp32; returns how many layers were pinned."""
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if _is_head_layer(layer.name, heads):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output_type(j) in (trt.float32, trt.float16):
                    layer.set_output_type(j, trt.float32)
            pinned += 1
    for i in range(network.num_outputs):
        t = network.get_output(i)
        if t.name == "logits":
            t.dtype = trt.float32
    return pinned


def build_trt(proto: onnx.ModelProto, profile: Profile, ckpt: Checkpoint, out: Path, timing_cache: bytes | None = None) -> dict:
    here = probe()
    trt = require(f"target {profile.name}", here)
    (out / MODEL_FILE).write_bytes(proto.SerializeToString())
    graph = prepare_for_trt(proto)
    fused = profile.head == "fused"
    if fused:
        from .plugin import register

        register()
    weak_fp16 = profile.precision == "fp16"
    if weak_fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise VQExportError(f"target {profile.name}: TensorRT {trt.__version__} builds strongly typed networks only, and "
                            "precision = 'fp16' relies on TensorRT 10's fp16 builder flag; use TensorRT 10.x, or precision = 'fp32'")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = not weak_fp16 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)).strip().replace("\n", " ")[:300] for i in range(parser.num_errors))
        raise VQExportError(f"target {profile.name}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    pinned = 0
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = pin_head_fp32(network, head_node_names(proto), trt)
    shapes = input_shapes(profile.trt, ckpt.config)
    for per_input in shapes:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in per_input.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    opts = profile.trt
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if opts.hardware_compatibility != "none":
        config.hardware_compatibility_level = {
            "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
            "same_compute_capability": trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY,
        }[opts.hardware_compatibility]
    config.builder_optimization_level = opts.builder_optimization_level
    if opts.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, opts.workspace_mib << 20)
    if opts.timing_cache:
        cache = config.create_timing_cache(timing_cache or b"")
        config.set_timing_cache(cache, ignore_mismatch=True)  # a cache from another GPU/version is ignored, not fatal
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise VQExportError(f"target {profile.name}: TensorRT could not build the engine (its log above says why)")
    (out / PLAN_FILE).write_bytes(bytes(plan))
    if opts.timing_cache:
        (out / TIMING_CACHE_FILE).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "backend": "trt",
        "model_file": PLAN_FILE,
        "onnx_file": MODEL_FILE,
        "timing_cache": TIMING_CACHE_FILE if opts.timing_cache else None,
        "plugins": ["vqexport::VQLogits", "vqexport::VQLogitsLowRank"] if fused else [],
        "engine": {
            "tensorrt": trt.__version__,
            "gpu": here["gpu"]["name"],
            "compute_capability": here["gpu"]["compute_capability"],
            "hardware_compatibility": opts.hardware_compatibility,
            "version_compatible": opts.version_compatible,
            "strongly_typed": strongly_typed,
            "precision": profile.precision,
            "fp32_head_layers": pinned,
            "profiles": {name: {k: [list(s) for s in v] for k, v in per.items()} for name, per in zip(PROFILES, shapes)},
        },
    }

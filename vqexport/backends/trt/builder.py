"""Build a TensorRT engine from the exported graph: parse, two optimization profiles, precision, timing cache.

Beside ``model.onnx`` + ``model.onnx.data`` (the portable graph, as for every target) it writes ``model.plan`` (the
serialized engine), ``timing.cache`` and the head's definition; returns the manifest's ``runtime`` section with the engine's metadata (TensorRT version,
GPU and compute capability, compatibility level, profiles).

Precision lives in the graph and the network is built strongly typed (TensorRT 10's STRONGLY_TYPED flag; the
only mode TensorRT 11 has): fp16 is the fp16_trunk pass (trunk fp16, head and ``logits`` fp32, verified against
PyTorch like any graph), int8 is the graph's explicit Q/DQ pairs. No precision builder flags are set.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from ...head.spec import write_artifact_head
from ...source import Source
from ...errors import VQExportError
from ...profiles import Profile
from .env import probe, require
from .plugin import plugin_ids
from .prepare import prepare_for_trt
from .shapes import PROFILES, input_shapes

MODEL_FILE = "model.onnx"
PLAN_FILE = "model.plan"
TIMING_CACHE_FILE = "timing.cache"


def build_trt(out: Path, profile: Profile, source: Source, timing_cache: bytes | None = None,
              graph: onnx.ModelProto | None = None) -> dict:
    """Build from ``out``/model.onnx; ``graph`` is its prepare_for_trt form, loaded without its external weights
    (made here when not given); the parser reads the weights from beside model.onnx."""
    here = probe()
    trt = require(f"target {profile.name}", here)
    if graph is None:
        from ...graph_io import load_graph

        graph = prepare_for_trt(load_graph(out / MODEL_FILE))
    fused = profile.head == "fused"
    if fused:
        from .plugin import register

        register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")  # accepted and implied on 11.x
    if strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(graph.SerializeToString(), str(out / MODEL_FILE)):
        errors = "; ".join(str(parser.get_error(i)).strip().replace("\n", " ")[:300] for i in range(parser.num_errors))
        raise VQExportError(f"target {profile.name}: TensorRT's ONNX parser refused the graph: {errors}")
    config = builder.create_builder_config()
    shapes = input_shapes(profile.trt, source.geometry)
    for per_input in shapes:
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in per_input.items():
            p.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(p)
    opts = profile.trt
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if opts.hardware_compatibility != "none":
        level = getattr(trt.HardwareCompatibilityLevel, opts.hardware_compatibility.upper(), None)
        if level is None:
            raise VQExportError(f"target {profile.name}: TensorRT {trt.__version__} has no hardware compatibility level "
                                f"{opts.hardware_compatibility!r}")
        config.hardware_compatibility_level = level
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
    write_artifact_head(out, source.head)
    source.copy_tokenizer(out)
    if opts.timing_cache:
        (out / TIMING_CACHE_FILE).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "backend": "trt",
        "model_file": PLAN_FILE,
        "onnx_file": MODEL_FILE,
        "timing_cache": TIMING_CACHE_FILE if opts.timing_cache else None,
        "plugins": list(plugin_ids()) if fused else [],
        "engine": {
            "tensorrt": trt.__version__,
            "gpu": here["gpu"]["name"],
            "compute_capability": here["gpu"]["compute_capability"],
            "hardware_compatibility": opts.hardware_compatibility,
            "version_compatible": opts.version_compatible,
            "strongly_typed": strongly_typed,
            "precision": profile.precision,
            "profiles": {name: {k: [list(s) for s in v] for k, v in per.items()} for name, per in zip(PROFILES, shapes)},
        },
    }

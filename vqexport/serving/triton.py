"""Lay an artifact out as a Triton Inference Server model repository, and check its config with Triton's schema.

    <artifact>/                       the repository root (--model-repository); Triton reads subdirectories only
      manifest.json, ...              vqexport's own files (a TensorRT artifact keeps model.onnx here)
      <model_name>/config.pbtxt
      <model_name>/1/model.onnx       onnxruntime backend  (platform "onnxruntime_onnx")
      <model_name>/1/model.plan       TensorRT backend     (platform "tensorrt_plan")

The config declares every graph input and output with the batch axis left to Triton (``max_batch_size``):
``input_ids`` / ``attention_mask`` [-1], the KV cache ``past_key_values.{i}.key|value`` [Hkv, -1, hd] in and
``present.{i}.key|value`` out, ``logits`` [-1, V]; dynamic batching with the profile's preferred sizes. The cache
is the client's state (stateless model): each request carries its own past. ``config.pbtxt`` is parsed back with
Triton's own ``ModelConfig`` protobuf (tritonclient) and compared with the graph before the artifact is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx
from onnx import TensorProto

from ..errors import VQExportError
from ..profiles import Profile

CONFIG_FILE = "config.pbtxt"
PLATFORMS = {"ort": ("onnxruntime_onnx", "model.onnx"), "trt": ("tensorrt_plan", "model.plan")}
TRITON_TYPES = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.BFLOAT16: "TYPE_BF16",
                TensorProto.INT64: "TYPE_INT64", TensorProto.INT32: "TYPE_INT32", TensorProto.INT8: "TYPE_INT8",
                TensorProto.UINT8: "TYPE_UINT8", TensorProto.BOOL: "TYPE_BOOL"}
INSTALL_HINT = "pip install 'vqexport[triton]'"


def model_config_schema():
    """Triton's ModelConfig protobuf message class (from tritonclient), or a clear error."""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise VQExportError(f"checking a Triton model config needs tritonclient with its model-config schema ({INSTALL_HINT})") from None
    return model_config_pb2.ModelConfig


def tensor_specs(proto: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Graph inputs and outputs as Triton sees them: name, TYPE_*, dims without the batch axis (-1 = dynamic)."""
    def spec(vi):
        tt = vi.type.tensor_type
        if tt.elem_type not in TRITON_TYPES:
            raise VQExportError(f"graph tensor {vi.name!r} has a type Triton's config cannot declare ({TensorProto.DataType.Name(tt.elem_type)})")
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim][1:]
        return {"name": vi.name, "data_type": TRITON_TYPES[tt.elem_type], "dims": dims}

    inits = {t.name for t in proto.graph.initializer}
    return [spec(vi) for vi in proto.graph.input if vi.name not in inits], [spec(vi) for vi in proto.graph.output]


def config_text(proto: onnx.ModelProto, profile: Profile) -> str:
    platform, _ = PLATFORMS[profile.backend]
    t = profile.triton
    inputs, outputs = tensor_specs(proto)

    def block(specs):
        rows = [f'  {{ name: "{s["name"]}" data_type: {s["data_type"]} dims: [ {", ".join(map(str, s["dims"]))} ] }}' for s in specs]
        return ",\n".join(rows)

    group = f"  {{ count: {t.instance_count} kind: {t.instance_kind}"
    if profile.backend == "trt":  # both optimization profiles (prefill, decode) on every instance
        group += ' profile: [ "0", "1" ]'
    group += " }"
    return (
        f"# Written by vqexport for target {profile.name}. KV cache in/out per request (stateless model).\n"
        f'name: "{t.model_name}"\n'
        f'platform: "{platform}"\n'
        f"max_batch_size: {t.max_batch_size}\n"
        f"input [\n{block(inputs)}\n]\n"
        f"output [\n{block(outputs)}\n]\n"
        "dynamic_batching {\n"
        f"  preferred_batch_size: [ {', '.join(map(str, t.preferred_batch_sizes))} ]\n"
        f"  max_queue_delay_microseconds: {t.max_queue_delay_microseconds}\n"
        "}\n"
        f"instance_group [\n{group}\n]\n"
    )


def validate_config(text: str, proto: onnx.ModelProto, profile: Profile, where: str = CONFIG_FILE):
    """Parse ``text`` with Triton's ModelConfig schema and check it declares exactly the graph's I/O."""
    from google.protobuf import text_format

    schema = model_config_schema()
    cfg = schema()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise VQExportError(f"{where}: not a valid Triton model config ({e})") from None
    platform, _ = PLATFORMS[profile.backend]
    problems = []
    if cfg.name != profile.triton.model_name:
        problems.append(f"name {cfg.name!r} is not the model directory {profile.triton.model_name!r}")
    if cfg.platform != platform:
        problems.append(f"platform {cfg.platform!r}, expected {platform!r}")
    if cfg.max_batch_size < 1:
        problems.append("max_batch_size must be >= 1 (the graph's first axis is the batch)")
    inputs, outputs = tensor_specs(proto)
    for kind, declared, wanted in (("input", cfg.input, inputs), ("output", cfg.output, outputs)):
        got = {x.name: x for x in declared}
        for s in wanted:
            x = got.pop(s["name"], None)
            if x is None:
                problems.append(f"{kind} {s['name']!r} is not declared")
                continue
            dtype = schema.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type.values_by_number[x.data_type].name
            if dtype != s["data_type"] or list(x.dims) != s["dims"]:
                problems.append(f"{kind} {s['name']!r} is {dtype} {list(x.dims)}, the graph has {s['data_type']} {s['dims']}")
        problems += [f"{kind} {n!r} is not in the graph" for n in got]
    if cfg.HasField("dynamic_batching"):
        too_big = [b for b in cfg.dynamic_batching.preferred_batch_size if b > cfg.max_batch_size]
        if too_big:
            problems.append(f"preferred batch sizes {too_big} exceed max_batch_size {cfg.max_batch_size}")
    if problems:
        raise VQExportError(f"{where}: " + "; ".join(problems))
    return cfg


def layout(out: Path, runtime: dict, profile: Profile) -> dict:
    """Move the runtime's model file (and its external data) into ``<model_name>/1/`` beside a checked
    config.pbtxt; returns the new runtime section."""
    from ..artifact import graph_file
    from ..graph_io import load_graph

    _, filename = PLATFORMS[profile.backend]
    name = profile.triton.model_name
    proto = load_graph(out / graph_file(runtime))
    text = config_text(proto, profile)
    validate_config(text, proto, profile, f"{name}/{CONFIG_FILE}")
    version_dir = out / name / "1"
    version_dir.mkdir(parents=True)
    (out / name / CONFIG_FILE).write_text(text, encoding="utf-8")
    src = out / runtime["model_file"]
    shutil.move(str(src), version_dir / filename)
    if profile.backend == "ort":
        data = out / (runtime["model_file"] + ".data")
        if data.exists():  # the graph names its external data relative to itself: they move together
            shutil.move(str(data), version_dir / (filename + ".data"))
        for extra in (runtime.get("optimized_file"), "genai_config.json"):
            for f in ((out / extra), (out / f"{extra}.data")) if extra else ():
                if f.exists():
                    f.unlink()  # Triton's onnxruntime backend optimizes at load; genai does not read a repository
        runtime = {**runtime, "optimized_file": None}
    return {**runtime, "model_file": f"{name}/1/{filename}", "triton": {"model_name": name, "config": f"{name}/{CONFIG_FILE}",
                                                                        "platform": PLATFORMS[profile.backend][0]}}

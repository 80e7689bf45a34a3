"""``inspect``: what is inside a model directory, an artifact directory or an .onnx file. External weights are never
loaded (sizes come from tensor headers and dims). Artifacts and .onnx files need onnx alone, except an OpenVINO
artifact that ships its IR alone (read through OpenVINO); a model directory is read through transformers' config
(which imports torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import VQExportError
from .graph_io import all_nodes, check_external_data, dims_of, load_graph, op_histogram
from .sizes import onnx_sizes, summary

_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def inspect_path(path) -> dict:
    """A model directory ('demo': the embedded model), an artifact directory or an .onnx file."""
    from .source import model_dir

    path = model_dir(path)
    if not path.exists():
        raise VQExportError(f"{path}: does not exist")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            from .artifact import check_files, graph_file, read_manifest

            manifest = read_manifest(path)
            rt = manifest["runtime"]
            graph = path / graph_file(rt)
            if not graph.is_file():
                raise VQExportError(f"{graph}: missing from the artifact; rebuild it")
            check_files(path, manifest)  # sizes only: a truncated or replaced file says so here, not when it is run
            if graph.suffix == ".xml":  # an OpenVINO IR shipped without the ONNX graph it was made from
                info = inspect_ir(graph, manifest)
            else:
                info = inspect_onnx(graph)
            info.update(kind="artifact", path=str(path), target=manifest["target"], parity=manifest.get("parity"),
                        config=manifest["config"])
            if graph.name != rt["model_file"]:  # an OpenVINO IR or a TensorRT engine made from the graph inspected
                info["deployed"] = _deployed(path, rt, f"the sizes are those of {graph.name}, the graph the "
                                                       f"{rt.get('backend')} model was made from")
            elif graph.suffix == ".xml":
                info["deployed"] = _deployed(path, rt, "the sizes are those of the ONNX graph the IR was made from, "
                                                       "recorded when it was built (the artifact does not keep it)")
            return info
        if (path / "config.json").is_file():
            return inspect_model(path)
        raise VQExportError(f"{path}: neither a model directory (config.json) nor an artifact (manifest.json)")
    if path.suffix == ".onnx":
        return inspect_onnx(path)
    raise VQExportError(f"{path}: expected a model directory, an artifact directory or an .onnx file")


def _deployed(path: Path, runtime: dict, note: str) -> dict:
    """What the runtime loads when the sizes do not describe it: its files and bytes (an OpenVINO IR with compressed
    weights, a TensorRT engine); ``note`` says which graph the sizes are those of."""
    from .artifact import weights_beside

    names = [runtime["model_file"], weights_beside(runtime["model_file"])]
    files = {n: (path / n).stat().st_size for n in names if n is not None and (path / n).is_file()}
    return {"files": files, "bytes": sum(files.values()), "backend": runtime.get("backend", "ort"), "note": note}


def inspect_model(path: Path) -> dict:
    from .safetensors_io import read_header
    from .source import load_source

    source = load_source(path, need_head=False)
    trunk = {}
    for f in source.weight_files:
        for name, info in read_header(f).items():
            n = int(np.prod(info["shape"])) if info["shape"] else 1
            trunk[name] = (n, n * _BYTES.get(info["dtype"], 4))
    from .head.spec import expected_tensors

    stored = expected_tensors(source.head.config) if source.head else {}  # a two-stage head's map is derived, not stored
    head = {f"head.{k}": (int(v.size), int(v.nbytes)) for k, v in (source.head.tensors.items() if source.head else ()) if k in stored}
    geo = source.geometry
    return {
        "kind": "model",
        "path": str(path),
        "config": {**geo.to_dict(), "head": source.head.config.to_dict() if source.head else None},
        "tokenizer": source.tokenizer_path is not None,
        "head_tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                         for k, v in sorted((source.head.tensors if source.head else {}).items()) if k in stored},
        "sizes": summary(head, trunk, geo.vocab_size, geo.hidden_size, bool(source.head and source.head.config.bias),
                         source.head.config if source.head else None),
    }


def inspect_ir(path: Path, manifest: dict) -> dict:
    """An OpenVINO IR as OpenVINO reads it (its weights mapped, not loaded): inputs, outputs and operations; the sizes
    and opset of the ONNX graph it was made from, as the build recorded them."""
    from .backends.openvino.env import error_line, require_openvino

    ov = require_openvino(f"{path.parent}: inspecting its OpenVINO IR")
    try:
        model = ov.Core().read_model(str(path))
    except Exception as e:  # OpenVINO's own errors: a file it cannot parse
        raise VQExportError(f"{path}: OpenVINO cannot read it ({error_line(e)})") from None

    def io(ports):
        return [{"name": p.any_name, "dtype": p.get_element_type().to_dtype().name,
                 "shape": [d.get_length() if d.is_static else "?" for d in p.get_partial_shape()]} for p in ports]

    ops: dict[str, int] = {}
    for op in model.get_ordered_ops():
        ops[op.get_type_name()] = ops.get(op.get_type_name(), 0) + 1
    return {
        "kind": "openvino-ir",
        "path": str(path),
        "opset": {"ai.onnx": manifest["opset"]},  # that of the ONNX graph the IR was made from
        "inputs": io(model.inputs),
        "outputs": io(model.outputs),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "nodes": sum(ops.values()),
        "sizes": manifest["sizes"],
    }


def inspect_onnx(path: Path) -> dict:
    import onnx

    proto = load_graph(path)
    check_external_data(proto, path)

    def io(vis):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": dims_of(v)} for v in vis]

    try:
        sizes = onnx_sizes(proto)
    except ValueError:
        raise VQExportError(f"{path}: not a vqexport graph (no head metadata)") from None
    return {
        "kind": "onnx",
        "path": str(path),
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "inputs": io(proto.graph.input),
        "outputs": io(proto.graph.output),
        "ops": op_histogram(proto),
        "nodes": sum(1 for _ in all_nodes(proto.graph)),
        "sizes": sizes,
    }

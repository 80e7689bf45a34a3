"""``inspect``: what is inside a checkpoint directory, an artifact directory or an .onnx file. No torch."""

from __future__ import annotations

from pathlib import Path

from .errors import VQExportError
from .graph import dims_of, op_histogram
from .sizes import checkpoint_sizes, onnx_sizes


def inspect_path(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise VQExportError(f"{path}: does not exist")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            from .artifact import read_manifest

            manifest = read_manifest(path)
            info = inspect_onnx(path / manifest["runtime"].get("onnx_file", manifest["runtime"]["model_file"]))
            info.update(kind="artifact", path=str(path), target=manifest["target"], parity=manifest.get("parity"))
            return info
        if (path / "config.json").is_file():
            return inspect_checkpoint(path)
        raise VQExportError(f"{path}: neither a checkpoint (config.json) nor an artifact (manifest.json)")
    if path.suffix == ".onnx":
        return inspect_onnx(path)
    raise VQExportError(f"{path}: expected a checkpoint directory, an artifact directory or an .onnx file")


def inspect_checkpoint(path: Path) -> dict:
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    return {
        "kind": "checkpoint",
        "path": str(path),
        "config": ckpt.config.to_dict(),
        "tokenizer": ckpt.tokenizer_path is not None,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(ckpt.tensors.items())},
        "sizes": checkpoint_sizes(ckpt),
    }


def inspect_onnx(path: Path) -> dict:
    import onnx

    try:
        proto = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError / OSError variants
        raise VQExportError(f"{path}: cannot read ONNX model ({str(e).splitlines()[0][:200]})") from None

    def io(vis):
        return [{"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                 "shape": dims_of(v)} for v in vis]

    return {
        "kind": "onnx",
        "path": str(path),
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "inputs": io(proto.graph.input),
        "outputs": io(proto.graph.output),
        "ops": op_histogram(proto),
        "nodes": len(proto.graph.node),
        "sizes": onnx_sizes(proto),
    }

"""Reading safetensors files with every problem a one-line error (numpy + safetensors; torch only for bfloat16)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import VQExportError


def read_header(file: Path, data: bytes | None = None) -> dict:
    """The checked header of a safetensors file (name -> {dtype, shape, data_offsets}), without its metadata.

    ``data``: the file's bytes, when already read; else only the header is read from disk."""
    file = Path(file)
    try:
        if data is None:
            with open(file, "rb") as f:
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                blob = f.read(n) if 0 < n < (1 << 30) else b""
                size = file.stat().st_size
        else:
            n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
            blob, size = data[8 : 8 + n] if n > 0 else b"", len(data)
    except OSError as e:
        raise VQExportError(f"{file}: cannot read ({e.strerror})") from None
    if size < 8 or n < 0:
        raise VQExportError(f"{file}: truncated safetensors file ({size} bytes)")
    if n <= 0 or 8 + n > size or len(blob) != n:
        raise VQExportError(f"{file}: truncated or corrupt safetensors header (header says {n} bytes, file has {size})")
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VQExportError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise VQExportError(f"{file}: corrupt safetensors header")
    header.pop("__metadata__", None)
    body = size - 8 - n
    for name, info in header.items():
        try:
            start, end = info["data_offsets"]
            ok = (isinstance(info["shape"], list) and all(isinstance(x, int) and x >= 0 for x in info["shape"])
                  and isinstance(info["dtype"], str) and isinstance(start, int) and isinstance(end, int) and 0 <= start <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise VQExportError(f"{file}: corrupt safetensors header entry for {name!r}")
        if end > body:
            raise VQExportError(f"{file}: truncated safetensors file (tensor {name} ends at byte {end} of a {body}-byte body)")
    return header


def read_arrays(file: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(name -> numpy array, header) of one safetensors file; bfloat16 becomes float32."""
    file = Path(file)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise VQExportError(f"{file}: cannot read ({e.strerror})") from None
    header = read_header(file, data)
    from safetensors import SafetensorError

    try:
        if not any(info["dtype"] == "BF16" for info in header.values()):
            from safetensors.numpy import load

            return load(data), header
        import torch
        from safetensors.torch import load

        return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in load(data).items()}, header
    except (SafetensorError, ValueError) as e:
        raise VQExportError(f"{file}: corrupt safetensors data ({e})") from None


def save_arrays(file: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors in name order (same tensors -> same bytes)."""
    import os

    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)}, str(file), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)  # safetensors creates its files owner-only; give them the usual permissions

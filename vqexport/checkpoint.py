"""The checkpoint directory: config.json + model.safetensors (+ tokenizer.json), validated before any work.

Tensor names (all float tensors float32, float16 or bfloat16; the map int32 or int64):

    embed.weight                          [V, d]
    layers.{i}.attn_norm.weight           [d]
    layers.{i}.attn.{q,k,v}_proj.weight   [H*hd, d] / [Hkv*hd, d] / [Hkv*hd, d]
    layers.{i}.attn.{q,k,v}_proj.bias     (only with qkv_bias)
    layers.{i}.attn.o_proj.weight         [d, H*hd]
    layers.{i}.mlp_norm.weight            [d]
    layers.{i}.mlp.{gate,up}_proj.weight  [d_ff, d]
    layers.{i}.mlp.down_proj.weight       [d, d_ff]
    norm.weight                           [d]
    GPT-2 style configs add: pos_embed.weight [max_position, d] (position = "learned"); *.bias of every norm
    (norm = "layernorm"); mlp.fc / mlp.proj instead of gate/up/down (mlp = "gelu_tanh"); o_proj and MLP
    biases (linear_bias).
    head.codebook                         [K, d]   (vq head)
    head.map                              [V]      (vq head; integers in [0, K))
    head.weight                           [V, d]   (dense head)
    head.bias                             [V]      (when head.bias is true)
    head.lowrank_p                        [r, d]   (vq head with rank r > 0: P of the correction (h·Pᵀ)·Uᵀ)
    head.lowrank_u                        [V, r]   (vq head with rank r > 0: U)

This module needs numpy and safetensors only (no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import VQExportError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"

FLOAT_DTYPES = ("F32", "F16", "BF16")
INT_DTYPES = ("I32", "I64")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """name -> (shape, allowed safetensors dtypes) for every tensor the config implies."""
    d, hd, V = cfg.d_model, cfg.head_dim, cfg.vocab_size
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    f = FLOAT_DTYPES
    out = {"embed.weight": ((V, d), f)}
    if cfg.position == "learned":
        out["pos_embed.weight"] = ((cfg.max_position, d), f)

    def linear(name, rows, cols, bias):
        out[name + ".weight"] = ((rows, cols), f)
        if bias:
            out[name + ".bias"] = ((rows,), f)

    def norm(name):
        out[name + ".weight"] = ((d,), f)
        if cfg.norm == "layernorm":
            out[name + ".bias"] = ((d,), f)

    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        norm(p + "attn_norm")
        linear(p + "attn.q_proj", q, d, cfg.qkv_bias)
        linear(p + "attn.k_proj", kv, d, cfg.qkv_bias)
        linear(p + "attn.v_proj", kv, d, cfg.qkv_bias)
        linear(p + "attn.o_proj", d, q, cfg.linear_bias)
        norm(p + "mlp_norm")
        if cfg.mlp == "swiglu":
            linear(p + "mlp.gate_proj", cfg.d_ff, d, cfg.linear_bias)
            linear(p + "mlp.up_proj", cfg.d_ff, d, cfg.linear_bias)
            linear(p + "mlp.down_proj", d, cfg.d_ff, cfg.linear_bias)
        else:
            linear(p + "mlp.fc", cfg.d_ff, d, cfg.linear_bias)
            linear(p + "mlp.proj", d, cfg.d_ff, cfg.linear_bias)
    norm("norm")
    if cfg.head.type == "vq":
        out["head.codebook"] = ((cfg.head.codebook_size, d), f)
        out["head.map"] = ((V,), INT_DTYPES)
        if cfg.head.rank:
            out["head.lowrank_p"] = ((cfg.head.rank, d), f)
            out["head.lowrank_u"] = ((V, cfg.head.rank), f)
    else:
        out["head.weight"] = ((V, d), f)
    if cfg.head.bias:
        out["head.bias"] = ((V,), f)
    return out


@dataclass
class Checkpoint:
    """A validated checkpoint: config, float32/int32 numpy tensors, and the tokenizer file if present."""

    path: Path
    config: ModelConfig
    tensors: dict[str, np.ndarray]
    tokenizer_path: Path | None

    @property
    def name(self) -> str:
        return self.path.name


def load_checkpoint(path) -> Checkpoint:
    """Read and validate a checkpoint directory; every problem is a one-line VQExportError."""
    path = Path(path)
    if not path.exists():
        raise VQExportError(f"{path}: checkpoint directory does not exist")
    if not path.is_dir():
        raise VQExportError(f"{path}: not a directory; --model takes a checkpoint directory (config.json, model.safetensors)")
    cfg = ModelConfig.from_file(path / CONFIG_FILE)
    tensors = _read_weights(path / WEIGHTS_FILE, cfg)
    tok = path / TOKENIZER_FILE
    tokenizer_path = tok if tok.exists() else None
    if tokenizer_path is not None:
        check_tokenizer(tokenizer_path, cfg.vocab_size)
    return Checkpoint(path=path, config=cfg, tensors=tensors, tokenizer_path=tokenizer_path)


def _read_weights(file: Path, cfg: ModelConfig) -> dict[str, np.ndarray]:

    if not file.exists():
        raise VQExportError(f"{file}: weights file not found (expected {WEIGHTS_FILE} beside {CONFIG_FILE})")
    try:
        data = file.read_bytes()
    except OSError as e:
        raise VQExportError(f"{file}: cannot read weights ({e.strerror})") from None
    header = _read_header(file, data)
    expected = expected_tensors(cfg)
    missing = sorted(set(expected) - set(header))
    if missing:
        raise VQExportError(f"{file}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} required by {CONFIG_FILE}")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise VQExportError(f"{file}: unexpected tensor(s) {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} not described by {CONFIG_FILE}")
    for name, (shape, dtypes) in expected.items():
        got_shape, got_dtype = tuple(header[name]["shape"]), header[name]["dtype"]
        if got_dtype not in dtypes:
            kind = "integer" if dtypes == INT_DTYPES else "floating-point"
            raise VQExportError(f"{file}: tensor {name} has dtype {got_dtype}, expected {kind} ({', '.join(dtypes)})")
        if got_shape != shape:
            raise VQExportError(f"{file}: tensor {name} has shape {list(got_shape)}, config.json implies {list(shape)}")
    raw = load_arrays(file, data, header)
    tensors: dict[str, np.ndarray] = {}
    for name in expected:
        arr = raw[name]
        if name == "head.map":
            arr = arr.astype(np.int64)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= cfg.head.codebook_size:
                bad = int(np.flatnonzero((arr < 0) | (arr >= cfg.head.codebook_size))[0])
                raise VQExportError(
                    f"{file}: head.map[{bad}] = {int(arr[bad])} is outside [0, codebook_size={cfg.head.codebook_size})"
                )
            tensors[name] = arr.astype(np.int32)
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            bad = np.unravel_index(int(np.flatnonzero(~np.isfinite(arr))[0]), arr.shape)
            raise VQExportError(f"{file}: tensor {name} has a non-finite value at index {list(map(int, bad))}")
        tensors[name] = arr
    return tensors


def _read_header(file: Path, data: bytes) -> dict:
    if len(data) < 8:
        raise VQExportError(f"{file}: truncated safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise VQExportError(f"{file}: truncated or corrupt safetensors header (header says {n} bytes, file has {len(data)})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VQExportError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise VQExportError(f"{file}: corrupt safetensors header")
    header.pop("__metadata__", None)
    body = len(data) - 8 - n
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


def load_arrays(file: Path, data: bytes, header: dict) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (its bytes and checked header) as numpy; bfloat16 becomes float32."""
    from safetensors import SafetensorError

    try:
        if not any(info["dtype"] == "BF16" for info in header.values()):
            from safetensors.numpy import load

            return load(data)
        import torch
        from safetensors.torch import load

        return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in load(data).items()}
    except (SafetensorError, ValueError) as e:
        raise VQExportError(f"{file}: corrupt safetensors data ({e})") from None


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Read, check the header of, and load one safetensors file; every problem is a one-line VQExportError."""
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        raise VQExportError(f"{file}: cannot read weights ({e.strerror})") from None
    return load_arrays(file, data, _read_header(file, data))


def check_tokenizer(path: Path, vocab_size: int) -> None:
    """The tokenizer must parse and every id it can produce must be a row of the model's vocabulary."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise VQExportError(f"{path}: cannot load tokenizer ({str(e).splitlines()[0][:200]})") from None
    n = tok.get_vocab_size(with_added_tokens=True)
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    if max(n, top) > vocab_size:
        raise VQExportError(
            f"{path}: tokenizer has {max(n, top)} tokens but the model's vocab_size is {vocab_size}; "
            "use the tokenizer the model was trained with"
        )


def save_checkpoint(out: Path, cfg: ModelConfig, tensors: dict[str, np.ndarray], tokenizer_path: Path | None = None, extra_files: dict[str, str] | None = None) -> None:
    """Write a checkpoint directory (config.json, model.safetensors, tokenizer.json, extra text files)."""
    from safetensors.numpy import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(cfg.to_json(), encoding="utf-8")
    ordered = {k: np.ascontiguousarray(tensors[k]) for k in sorted(tensors)}
    save_file(ordered, str(out / WEIGHTS_FILE), metadata={"format": "vqexport-lm"})
    if tokenizer_path is not None:
        (out / TOKENIZER_FILE).write_bytes(Path(tokenizer_path).read_bytes())
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text, encoding="utf-8")


DEMO_NAME = "demo"


def demo_dir() -> Path:
    """The embedded default model shipped inside the package."""
    from importlib import resources

    return Path(str(resources.files("vqexport") / "data" / DEMO_NAME))


def resolve_checkpoint(model: str | Path | None) -> Checkpoint:
    """``None`` or ``"demo"`` -> the embedded default model; anything else -> a checkpoint directory."""
    if model is None or str(model) == DEMO_NAME:
        return load_checkpoint(demo_dir())
    return load_checkpoint(Path(model))

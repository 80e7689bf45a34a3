"""Model configuration: the architecture and every size, as stored in config.json."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import VQExportError

HEAD_TYPES = ("vq", "dense")
ARCH_CHOICES = {"norm": ("rmsnorm", "layernorm"), "position": ("rope", "learned"), "mlp": ("swiglu", "gelu_tanh")}


@dataclass(frozen=True)
class HeadConfig:
    """The output layer. ``vq``: codebook [K, d] + map [V] (+ bias [V]); ``dense``: weight [V, d] (+ bias [V])."""

    type: str = "vq"
    codebook_size: int = 0  # K; only for type == "vq"
    bias: bool = True
    rank: int = 0  # r: low-rank per-token correction (h·Pᵀ)·Uᵀ, P [r, d], U [V, r]; 0 = none (vq heads only)


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only pre-norm transformer: Llama/Qwen2 style (RMSNorm, RoPE, SwiGLU, grouped-query attention)
    by default, GPT-2 style with norm="layernorm", position="learned", mlp="gelu_tanh", qkv_bias, linear_bias."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    max_position: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm" (with bias)
    position: str = "rope"  # "rope" | "learned" (absolute position embeddings, max_position rows)
    mlp: str = "swiglu"  # "swiglu" (gate/up/down) | "gelu_tanh" (fc/proj, GPT-2's)
    linear_bias: bool = False  # biases on o_proj and the MLP projections (GPT-2)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.head.rank:  # rank 0 is the plain head: config.json stays exactly as before the key existed
            del d["head"]["rank"]
        d["format"] = FORMAT_NAME
        d["format_version"] = FORMAT_VERSION
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: dict, where: str = "config.json") -> "ModelConfig":
        return _parse(raw, where)

    @classmethod
    def from_file(cls, path: Path) -> "ModelConfig":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VQExportError(f"{path}: config.json not found; a checkpoint directory needs config.json, model.safetensors") from None
        except (OSError, UnicodeDecodeError) as e:
            raise VQExportError(f"{path}: cannot read config ({e})") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise VQExportError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(raw, dict):
            raise VQExportError(f"{path}: expected a JSON object at the top level")
        return _parse(raw, str(path))


FORMAT_NAME = "vqexport-lm"
FORMAT_VERSION = 1

_INT_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_position")
_OPTIONAL_TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse(raw: dict, where: str) -> ModelConfig:
    def fail(msg: str):
        raise VQExportError(f"{where}: {msg}")

    fmt = raw.get("format", FORMAT_NAME)
    if fmt != FORMAT_NAME:
        fail(f"format is {fmt!r}, expected {FORMAT_NAME!r}")
    version = raw.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        fail(f"format_version {version!r} is not supported (this vqexport reads {FORMAT_VERSION})")

    kw: dict = {}
    for name in _INT_FIELDS:
        if name not in raw:
            if name == "n_kv_heads" and _is_int(raw.get("n_heads")):
                kw[name] = raw["n_heads"]
                continue
            if name == "max_position":
                continue
            fail(f"missing key {name!r}")
        v = raw[name]
        if not _is_int(v):
            fail(f"{name} must be an integer, got {type(v).__name__} {v!r}")
        if v < 1:
            fail(f"{name} must be >= 1, got {v}")
        kw[name] = v
    for name in ("rope_theta", "norm_eps"):
        if name in raw:
            v = raw[name]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                fail(f"{name} must be a positive number, got {v!r}")
            kw[name] = float(v)
    for name in ("qkv_bias", "linear_bias"):
        if name in raw:
            if not isinstance(raw[name], bool):
                fail(f"{name} must be true or false, got {raw[name]!r}")
            kw[name] = raw[name]
    for name, choices in ARCH_CHOICES.items():
        if name in raw:
            if raw[name] not in choices:
                fail(f"{name} must be one of {', '.join(choices)}, got {raw[name]!r}")
            kw[name] = raw[name]
    for name in _OPTIONAL_TOKEN_FIELDS:
        v = raw.get(name)
        if v is None:
            continue
        if not _is_int(v) or not 0 <= v < kw["vocab_size"]:
            fail(f"{name} must be an integer in [0, vocab_size={kw['vocab_size']}), got {v!r}")
        kw[name] = v

    if kw["d_model"] % kw["n_heads"]:
        fail(f"d_model={kw['d_model']} is not divisible by n_heads={kw['n_heads']}")
    if kw["n_heads"] % kw["n_kv_heads"]:
        fail(f"n_heads={kw['n_heads']} is not divisible by n_kv_heads={kw['n_kv_heads']}")
    if kw.get("position", "rope") == "rope" and (kw["d_model"] // kw["n_heads"]) % 2:
        fail(f"head dimension d_model/n_heads={kw['d_model'] // kw['n_heads']} must be even for rotary embeddings")

    head = raw.get("head")
    if not isinstance(head, dict):
        fail("missing key 'head' (an object with type, codebook_size, bias)")
    htype = head.get("type")
    if htype not in HEAD_TYPES:
        fail(f"head.type must be one of {', '.join(HEAD_TYPES)}, got {htype!r}")
    bias = head.get("bias", True)
    if not isinstance(bias, bool):
        fail(f"head.bias must be true or false, got {bias!r}")
    k = head.get("codebook_size", 0)
    if htype == "vq":
        if "codebook_size" not in head:
            fail("missing key 'head.codebook_size'")
        if not _is_int(k):
            fail(f"head.codebook_size must be an integer, got {type(k).__name__} {k!r}")
        if not 1 <= k <= kw["vocab_size"]:
            fail(f"head.codebook_size must be in [1, vocab_size={kw['vocab_size']}], got {k}")
    else:
        k = 0
    rank = head.get("rank", 0)
    if not _is_int(rank):
        fail(f"head.rank must be an integer, got {type(rank).__name__} {rank!r}")
    if rank and htype != "vq":
        fail("head.rank applies to a vq head only (a dense head has no low-rank correction)")
    if not 0 <= rank <= min(kw["vocab_size"], kw["d_model"]):
        fail(f"head.rank must be in [0, min(vocab_size, d_model) = {min(kw['vocab_size'], kw['d_model'])}], got {rank}")
    unknown = set(head) - {"type", "codebook_size", "bias", "rank"}
    if unknown:
        fail(f"unknown key(s) in head: {', '.join(sorted(unknown))}")
    known = (set(_INT_FIELDS) | {"rope_theta", "norm_eps", "qkv_bias", "linear_bias", "head", "format", "format_version"}
             | set(_OPTIONAL_TOKEN_FIELDS) | set(ARCH_CHOICES))
    unknown = set(raw) - known
    if unknown:
        fail(f"unknown key(s): {', '.join(sorted(unknown))}")
    return ModelConfig(head=HeadConfig(type=htype, codebook_size=k, bias=bias, rank=rank), **kw)

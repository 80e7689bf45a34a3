"""Target profiles: deployment targets as data (targets/*.toml).

``--target NAME`` resolves to a bundled profile; ``--target path/to/file.toml`` reads the user's own.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from .errors import VQExportError
from .target_options import TritonOptions, TrtOptions, parse_trt, parse_triton
from .target_options import _table as read_table

BACKENDS = ("ort", "trt", "openvino")
# The trunk's precision: the portable trunk is fp32 or fp16 (trunk/fp16.py; the head stays fp32), or on ONNX Runtime
# int4 / int8 weights (trunk/quantize.py: MatMulNBits, GatherBlockQuantized); the genai trunk takes what
# onnxruntime-genai's builder makes (vqexport.trunk.genai.PRECISIONS).
PRECISIONS = {"ort": ("fp32", "fp16", "int4", "int8"), "trt": ("fp32", "fp16"), "openvino": ("fp32",)}
QUANTIZED = ("int4", "int8")  # weight-only precisions of the portable trunk
QUANT_KEYS = ("block_size", "accuracy_level", "quantize_embedding")  # [trunk] keys of a quantized portable trunk
OV_WEIGHTS = ("fp32", "int8", "int4")  # openvino: the IR's weights as converted, or compressed by NNCF
TRUNK_SOURCES = ("portable", "genai")
ROW_FORMS = ("shared", "fp32", "int8", "int4")  # a two-stage head's exact rows
CODEBOOKS = ("fp32", "int8", "int4")  # int4: MatMulNBits (bits = 4), the native encoding only
INT8_ENCODINGS = ("qdq", "native")
DECODE_MODES = ("logits", "topk")
SELECT_FORMS = ("gather", "gather_elements")
HEAD_FORMS = ("standard", "fused")
KERNELS = ("extensions", "function")
OPT_LEVELS = ("disable", "basic", "extended", "layout", "all")


@dataclass(frozen=True)
class Parity:
    steps: int = 32
    atol: float = 1e-4
    rtol: float = 0.0
    top1_agreement_min: float = 1.0
    top5_overlap_min: float = 1.0
    kl_max: float = 1e-6
    greedy_must_match: bool = True
    # logits may differ by this many times PyTorch's own float32 error (0: never); profiles that quantize or run fp16
    # default to 0
    reference_error_factor: float = 4.0


@dataclass(frozen=True)
class OrtOptions:
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    saved_optimization_level: str = "none"  # "basic": also write model.optimized.onnx (a second copy of the weights)
    session_optimization_level: str = "all"
    intra_op_num_threads: int = 0
    session_config: dict = field(default_factory=dict)
    kernel: str = "extensions"  # fused head: "extensions" (registered kernel) | "function" (inline the body)


@dataclass(frozen=True)
class TrunkOptions:
    source: str = "portable"  # "portable": torch.onnx of transformers' decoder | "genai": onnxruntime-genai's builder
    execution_provider: str = "cpu"  # genai: the builder's -e (cpu | cuda | dml | webgpu | NvTensorRtRtx)
    extra_options: dict = field(default_factory=dict)  # genai: more of the builder's --extra_options (key = value)
    # portable int4 / int8: values per scale (symmetric blocks), MatMulNBits' accuracy level (4: int8 activations),
    # and whether the embedding table is quantized too (GatherBlockQuantized: int4 only; parse_profile decides it by
    # the precision when the profile does not)
    block_size: int = 32
    accuracy_level: int = 4
    quantize_embedding: bool = False


@dataclass(frozen=True)
class OpenVinoOptions:
    device: str = "CPU"  # an OpenVINO device (CPU, GPU, NPU, ...)
    weights: str = "fp32"  # "fp32" | "int8" | "int4": NNCF weight compression of the IR (INT8_ASYM, INT4_ASYM)
    inference_precision: str = "f32"  # OpenVINO's INFERENCE_PRECISION_HINT ("f32" keeps parity with fp32 PyTorch)
    # keep the portable model.onnx (+ data) the IR was made from in the artifact (inspect then reads that graph);
    # false, the default, ships the IR alone: about half the bytes with fp32 weights, a fifth with int4
    keep_onnx: bool = False


@dataclass(frozen=True)
class TwoStageOptions:
    probes: int = 0  # clusters rescored exactly; 0 = the head's own probes (vq_head.json)
    rows: str = "shared"  # "shared": the trunk's embedding table (tied models) | "fp32" | "int8": a copy of the rows


@dataclass(frozen=True)
class Int8Options:
    encoding: str = "qdq"  # "qdq": DequantizeLinear -> MatMul (portable) | "native": ORT's MatMulNBits (bits=8)
    accuracy_level: int = 4  # native only: MatMulNBits accuracy level (4 = int8 activations)
    activations: bool = False  # Q/DQ on the hidden state too (static scale from calibration)
    # 7-bit weight codes: x86 int8 GEMMs without VNNI sum u8 x s8 pairs in int16, which saturates with 8-bit
    # weights. None = decide by backend: on for ONNX Runtime with int8 activations, off elsewhere.
    reduce_range: bool | None = None

    def weight_bits(self, backend: str) -> int:
        reduce = self.reduce_range if self.reduce_range is not None else (backend == "ort" and self.activations)
        return 7 if reduce and self.encoding == "qdq" else 8


@dataclass(frozen=True)
class DecodeOptions:
    mode: str = "logits"  # "logits": V-wide logits | "topk": exact top-k + cluster log-probs, no V-sized tensor
    k: int = 50
    keep_logits: bool = False  # with mode "topk": keep the logits output as well
    # prefill emits outputs for the last position only; None: only for two-stage heads, whose exact rows would cost
    # a prompt's every position P * cap * d (onnxruntime-genai reads the last position's logits either way)
    last_position_only: bool | None = None


@dataclass(frozen=True)
class Profile:
    name: str
    backend: str
    description: str = ""
    opset: int = 18
    precision: str = "fp32"
    codebook: str = "fp32"
    head: str = "standard"
    select: str = "gather_elements"  # how V logits are selected from K: "gather" | "gather_elements"
    int8: Int8Options = field(default_factory=Int8Options)
    trunk: TrunkOptions = field(default_factory=TrunkOptions)
    two_stage: TwoStageOptions = field(default_factory=TwoStageOptions)
    openvino: OpenVinoOptions = field(default_factory=OpenVinoOptions)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    ort: OrtOptions = field(default_factory=OrtOptions)
    parity: Parity = field(default_factory=Parity)
    trt: TrtOptions = field(default_factory=TrtOptions)
    triton: TritonOptions = field(default_factory=TritonOptions)
    source: str = ""

    def to_dict(self) -> dict:
        """The profile as its TOML tables (parse_profile reads it back)."""
        d = asdict(self)
        d.pop("source")
        d["ort"]["providers"] = list(d["ort"]["providers"])
        if d["int8"]["reduce_range"] is None:  # "decide by backend" is the absence of the key
            del d["int8"]["reduce_range"]
        if d["decode"]["last_position_only"] is None:  # "decide by head" likewise
            del d["decode"]["last_position_only"]
        if self.trunk.source != "genai":
            quant = {k: d["trunk"][k] for k in QUANT_KEYS} if self.precision in QUANTIZED else {}
            d["trunk"] = {"source": self.trunk.source, **quant}
        else:
            for k in QUANT_KEYS:
                d["trunk"].pop(k)
        if self.backend != "openvino":
            d.pop("openvino")
        trt, triton = d.pop("trt"), d.pop("triton")
        if self.backend == "trt":
            shapes = {k: trt.pop(k) for k in ("prefill_batch", "prefill_sequence", "decode_batch", "decode_past")}
            trt["prefill"] = {"batch": list(shapes["prefill_batch"].values()), "sequence": list(shapes["prefill_sequence"].values())}
            trt["decode"] = {"batch": list(shapes["decode_batch"].values()), "past": list(shapes["decode_past"].values())}
            d["trt"] = trt
        if self.triton.enabled:
            triton.pop("enabled")
            triton["preferred_batch_sizes"] = list(triton["preferred_batch_sizes"])
            d["triton"] = triton
        return d

    def head_form(self, two_stage: bool = False):
        """How the head is built for this target (vqexport.head.graph.HeadForm), for a two-stage head or not."""
        from .head.graph import HeadForm

        last = self.decode.last_position_only if self.decode.last_position_only is not None else two_stage
        return HeadForm(select=self.select, fused=self.head == "fused", codebook=self.codebook, int8_encoding=self.int8.encoding,
                        accuracy_level=self.int8.accuracy_level, activations=self.int8.activations,
                        weight_bits=self.int8.weight_bits(self.backend), decode=self.decode.mode, k=self.decode.k,
                        keep_logits=self.decode.keep_logits, last_position_only=last,
                        probes=self.two_stage.probes, rows=self.two_stage.rows)


MAX_THREADS = 1024  # ONNX Runtime starts every thread asked for, and with it the memory of each


def _safe_name(v: str) -> bool:
    import re

    return bool(re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v)) and v not in (".", "..")


def bundled_dir():
    """Installed: the package's ``_targets`` (the repo's targets/ mapped in); from a source tree: targets/."""
    installed = resources.files("vqexport") / "_targets"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[1] / "targets"


def bundled_names() -> list[str]:
    return sorted(p.name[:-5] for p in bundled_dir().iterdir() if p.name.endswith(".toml"))


def aliases() -> dict[str, str]:
    """Bundled targets that build exactly what another one does (all but name and description): alias -> target."""
    def body(p):
        d = p.to_dict()
        d.pop("name")
        d.pop("description")
        return json.dumps(d, sort_keys=True)

    names = bundled_names()
    out = {}
    for n in names:
        twin = next((m for m in names if m != n and body(load_profile(m)) == body(load_profile(n))), None)
        if twin is not None and len(twin) < len(n):  # the shorter name is the target, the longer its alias
            out[n] = twin
    return out


def load_profile(target: str | Path) -> Profile:
    """Resolve ``target`` (a bundled name, or a .toml file's path as a string or a Path) to a validated Profile."""
    if isinstance(target, Path) or target.endswith(".toml") or "/" in target or "\\" in target:
        path = Path(target)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise VQExportError(f"target file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise VQExportError(f"target file {path}: cannot read ({e})") from None
        where = str(path)
    else:
        res = bundled_dir() / f"{target}.toml"
        if not res.is_file():
            raise VQExportError(f"unknown target {target!r}; known targets: {', '.join(bundled_names())} (or pass a .toml path)")
        text, where = res.read_text(encoding="utf-8"), f"target {target!r}"
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise VQExportError(f"{where}: malformed TOML ({e})") from None
    return parse_profile(raw, where)


def _trunk(t: dict, backend: str, fail, take) -> TrunkOptions:
    source = take(t, "source", str, "portable", "trunk.", lambda v: v in TRUNK_SOURCES, " or ".join(map(repr, TRUNK_SOURCES)))
    if source == "genai" and backend != "ort":
        fail("trunk.source = 'genai' (onnxruntime-genai's builder) applies to backend = 'ort' only")
    if source != "genai" and set(t) - {"source", *QUANT_KEYS}:
        fail(f"trunk.{sorted(set(t) - {'source', *QUANT_KEYS})[0]} applies to trunk.source = 'genai' only")
    if source == "genai" and set(t) & set(QUANT_KEYS):
        fail(f"trunk.{sorted(set(t) & set(QUANT_KEYS))[0]} applies to the portable trunk; onnxruntime-genai's builder "
             "takes its own in [trunk] extra_options (block_size, accuracy_level)")
    ep = take(t, "execution_provider", str, "cpu", "trunk.", None, "a string")
    extra = take(t, "extra_options", dict, {}, "trunk.", lambda v: all(isinstance(x, (str, int, float, bool)) for x in v.values()),
                 "a table of the builder's options (strings, numbers or booleans)")
    from .trunk.quantize import BLOCK_SIZES

    return TrunkOptions(source=source, execution_provider=ep,
                        extra_options={str(k): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in sorted(extra.items())},
                        block_size=take(t, "block_size", int, 32, "trunk.", lambda v: v in BLOCK_SIZES,
                                        "one of " + ", ".join(map(str, BLOCK_SIZES))),
                        accuracy_level=take(t, "accuracy_level", int, 4, "trunk.", lambda v: 0 <= v <= 4,
                                            "an integer in [0, 4]"),
                        quantize_embedding=take(t, "quantize_embedding", bool, False, "trunk.", None, "true or false"))


def _check_applies(raw: dict, backend: str, codebook: str, trunk_source: str, int8: Int8Options, decode_mode: str,
                   fail) -> None:
    """Refuse keys that are valid but would be ignored by this profile (its backend, trunk, codebook, encoding or
    decode mode):
    a setting that silently does nothing is a misconfiguration. (``[ort] kernel`` is not among them: ``--head fused``
    can make a standard-head profile use it.)"""
    if "ort" in raw and backend != "ort":
        fail(f"[ort] applies to backend = 'ort' only, not {backend!r}")
    if "opset" in raw and trunk_source == "genai":
        fail("opset applies to the portable trunk; onnxruntime-genai's builder gives its graph its own opset")
    given = set(raw.get("int8") or {})
    if given and codebook == "fp32":
        fail("[int8] applies to codebook = 'int8' or 'int4', not 'fp32'")
    if int8.encoding == "qdq" and "accuracy_level" in given:
        fail("int8.accuracy_level applies to encoding = 'native' (MatMulNBits); a QDQ codebook's MatMul takes ONNX "
             "Runtime's session.qdq_matmulnbits_accuracy_level in [ort] session_config")
    qdq_only = sorted({"activations", "reduce_range"} & given)
    if int8.encoding == "native" and codebook == "int8" and qdq_only:
        fail(f"int8.{qdq_only[0]} applies to the QDQ encoding only")
    topk_only = sorted({"k", "keep_logits"} & set(raw.get("decode") or {}))
    if decode_mode != "topk" and topk_only:
        fail(f"decode.{topk_only[0]} applies to decode.mode = 'topk' only")


def parse_profile(raw: dict, where: str, recorded: bool = False) -> Profile:
    """A validated Profile from a target file's table. ``recorded``: ``raw`` is a manifest's record of a profile
    (``Profile.to_dict``: every key with its value), so keys the profile ignores are not refused there."""
    def fail(msg):
        raise VQExportError(f"{where}: {msg}")

    def take(table: dict, key: str, kind, default, tname: str, check=None, desc=""):
        if key not in table:
            return default
        v = table[key]
        ok = isinstance(v, kind) and not (kind in (int, (int, float)) and isinstance(v, bool))
        if ok and isinstance(v, float) and not math.isfinite(v):
            ok = False
        if not ok or (check is not None and not check(v)):
            fail(f"{tname}{key} must be {desc or kind.__name__}, got {v!r}")
        return v

    def table(key: str, allowed) -> dict:
        return read_table(raw, key, allowed, fail)

    known_top = {"name", "description", "backend", "opset", "precision", "codebook", "head", "select", "int8", "trunk", "two_stage", "openvino", "decode", "ort", "parity",
                 "trt", "triton"}
    unknown = set(raw) - known_top
    if unknown:
        fail(f"unknown key(s): {', '.join(sorted(unknown))}")
    if "backend" not in raw:
        fail("missing key 'backend'")
    backend = take(raw, "backend", str, None, "", lambda v: v in BACKENDS, f"one of {', '.join(BACKENDS)}")
    name = take(raw, "name", str, Path(where).stem, "", _safe_name, "a non-empty name of letters, digits, '.', '_' or '-' (it names the output directory)")
    if "name" not in raw and not _safe_name(name):
        fail(f"no name, and the file's own name {name!r} cannot stand for one (letters, digits, '.', '_' or '-'); "
             "add name = \"...\"")
    opset = take(raw, "opset", int, 18, "", lambda v: 18 <= v <= 23, "an integer in [18, 23]")
    trunk = _trunk(table("trunk", TrunkOptions.__dataclass_fields__), backend, fail, take)
    if trunk.source == "genai":
        precision = take(raw, "precision", str, "fp32", "", lambda v: isinstance(v, str), "a string")
        from .trunk.genai import check_options

        check_options(precision, trunk.execution_provider, trunk.extra_options, fail)
    else:
        precision = take(raw, "precision", str, "fp32", "", lambda v: v in PRECISIONS[backend],
                         " or ".join(map(repr, PRECISIONS[backend])) + f" (precisions of the {backend} backend's portable trunk)")
        given = sorted(set(raw.get("trunk") or {}) & set(QUANT_KEYS))
        if given and precision not in QUANTIZED:
            fail(f"trunk.{given[0]} applies to precision 'int4' or 'int8' (a quantized portable trunk), not {precision!r}")
        if precision in QUANTIZED:
            from .trunk.quantize import EMBEDDING_PRECISIONS, MIN_OPSET

            if opset < MIN_OPSET:
                fail(f"precision {precision!r} on the portable trunk needs opset >= {MIN_OPSET} (onnxruntime's quantizer "
                     f"moves an older graph to opset {MIN_OPSET} without converting it), got {opset}")
            embedding = (raw.get("trunk") or {}).get("quantize_embedding")
            if embedding and precision not in EMBEDDING_PRECISIONS:
                fail(f"trunk.quantize_embedding = true needs precision 'int4' (onnxruntime's quantizer gives an embedding "
                     f"table 4 bits only), got {precision!r}")
            trunk = replace(trunk, quantize_embedding=precision in EMBEDDING_PRECISIONS if embedding is None
                            else embedding)
    if "trt" in raw and backend != "trt":
        fail("[trt] applies to backend = 'trt' only")
    codebook = take(raw, "codebook", str, "fp32", "", lambda v: v in CODEBOOKS, " or ".join(map(repr, CODEBOOKS)))
    head = take(raw, "head", str, "standard", "", lambda v: v in HEAD_FORMS, " or ".join(map(repr, HEAD_FORMS)))
    select = take(raw, "select", str, "gather_elements", "", lambda v: v in SELECT_FORMS, " or ".join(map(repr, SELECT_FORMS)))

    o = table("ort", OrtOptions.__dataclass_fields__)
    providers = take(o, "providers", list, ["CPUExecutionProvider"], "ort.", lambda v: v and all(isinstance(p, str) for p in v), "a non-empty list of provider names")
    lvl = lambda v: v in OPT_LEVELS  # noqa: E731
    ort_opts = OrtOptions(
        providers=tuple(providers),
        saved_optimization_level=take(o, "saved_optimization_level", str, "none", "ort.", lambda v: v in ("none", "basic"),
                                      "'none' or 'basic' (higher levels are not portable)"),
        session_optimization_level=take(o, "session_optimization_level", str, "all", "ort.", lvl, f"one of {', '.join(OPT_LEVELS)}"),
        intra_op_num_threads=take(o, "intra_op_num_threads", int, 0, "ort.", lambda v: 0 <= v <= MAX_THREADS,
                                  f"an integer in [0, {MAX_THREADS}] (0: ONNX Runtime's default)"),
        session_config={str(k): str(v) for k, v in take(
            o, "session_config", dict, {}, "ort.", lambda v: all(isinstance(x, (str, int, float)) and not isinstance(x, bool) for x in v.values()),
            "a table of session config entries (strings or numbers)").items()},
        kernel=take(o, "kernel", str, "extensions", "ort.", lambda v: v in KERNELS, " or ".join(map(repr, KERNELS))),
    )

    q = table("int8", Int8Options.__dataclass_fields__)
    int8 = Int8Options(
        encoding=take(q, "encoding", str, "qdq", "int8.", lambda v: v in INT8_ENCODINGS, " or ".join(map(repr, INT8_ENCODINGS))),
        activations=take(q, "activations", bool, False, "int8.", None, "true or false"),
        accuracy_level=take(q, "accuracy_level", int, 4, "int8.", lambda v: 0 <= v <= 4, "an integer in [0, 4]"),
        reduce_range=take(q, "reduce_range", bool, None, "int8.", None, "true or false"),
    )

    if "openvino" in raw and backend != "openvino":
        fail("[openvino] applies to backend = 'openvino' only")
    ovt = table("openvino", OpenVinoOptions.__dataclass_fields__)
    openvino = OpenVinoOptions(
        device=take(ovt, "device", str, "CPU", "openvino.", lambda v: bool(v), "an OpenVINO device name"),
        weights=take(ovt, "weights", str, "fp32", "openvino.", lambda v: v in OV_WEIGHTS, " or ".join(map(repr, OV_WEIGHTS))),
        inference_precision=take(ovt, "inference_precision", str, "f32", "openvino.", lambda v: v in ("f32", "f16", "bf16"),
                                 "'f32', 'f16' or 'bf16'"),
        keep_onnx=take(ovt, "keep_onnx", bool, False, "openvino.", None, "true or false"),
    )

    if codebook == "int4" and (int8.encoding != "native" or head != "standard"):
        fail("codebook = 'int4' is ONNX Runtime's MatMulNBits (bits = 4): set [int8] encoding = 'native' and head = 'standard'")
    if codebook == "int4" and (int8.activations or int8.reduce_range is not None):
        fail("int8.activations and int8.reduce_range apply to the QDQ int8 codebook, not to codebook = 'int4'")
    if "triton" in raw and backend not in ("ort", "trt"):
        fail(f"[triton] lays out ONNX Runtime or TensorRT models; backend {backend!r} has no Triton backend here")

    ts = table("two_stage", TwoStageOptions.__dataclass_fields__)
    two_stage = TwoStageOptions(
        probes=take(ts, "probes", int, 0, "two_stage.", lambda v: v >= 0, "an integer >= 0 (0: the head's own)"),
        rows=take(ts, "rows", str, "shared", "two_stage.", lambda v: v in ROW_FORMS, " or ".join(map(repr, ROW_FORMS))),
    )

    dtab = table("decode", DecodeOptions.__dataclass_fields__)
    decode = DecodeOptions(
        mode=take(dtab, "mode", str, "logits", "decode.", lambda v: v in DECODE_MODES, " or ".join(map(repr, DECODE_MODES))),
        k=take(dtab, "k", int, 50, "decode.", lambda v: v >= 1, "an integer >= 1"),
        keep_logits=take(dtab, "keep_logits", bool, False, "decode.", None, "true or false"),
        last_position_only=take(dtab, "last_position_only", bool, None, "decode.", None, "true or false"),
    )
    if not recorded:
        _check_applies(raw, backend, codebook, trunk.source, int8, decode.mode, fail)

    p = table("parity", Parity.__dataclass_fields__)
    # float32 through and through: PyTorch's own float32 error can set the tolerance; quantization or fp16 sets it otherwise
    exact = precision == "fp32" and codebook == "fp32" and openvino.weights == "fp32"
    num = (int, float)
    parity = Parity(
        steps=take(p, "steps", int, 32, "parity.", lambda v: 0 <= v <= 4096, "an integer in [0, 4096]"),
        atol=float(take(p, "atol", num, 1e-4, "parity.", lambda v: v >= 0, "a number >= 0")),
        rtol=float(take(p, "rtol", num, 0.0, "parity.", lambda v: v >= 0, "a number >= 0")),
        top1_agreement_min=(top1 := float(take(p, "top1_agreement_min", num, 1.0, "parity.", lambda v: 0 <= v <= 1,
                                                "a number in [0, 1]"))),
        top5_overlap_min=float(take(p, "top5_overlap_min", num, top1, "parity.", lambda v: 0 <= v <= 1, "a number in [0, 1]")),
        kl_max=float(take(p, "kl_max", num, 1e-6, "parity.", lambda v: v >= 0, "a number >= 0")),
        greedy_must_match=take(p, "greedy_must_match", bool, True, "parity.", None, "true or false"),
        reference_error_factor=float(take(p, "reference_error_factor", num, 4.0 if exact else 0.0, "parity.", lambda v: v >= 0,
                                          "a number >= 0")),
    )
    if trunk.source == "genai":
        from .trunk.genai import EXECUTION_PROVIDERS

        wanted = EXECUTION_PROVIDERS[trunk.execution_provider]
        if ort_opts.providers[0] != wanted:
            fail(f"the genai trunk for execution provider {trunk.execution_provider!r} runs on {wanted}: set [ort] providers = "
                 f"[\"{wanted}\"] (got {list(ort_opts.providers)})")
    return Profile(name=name, backend=backend, description=take(raw, "description", str, "", "", None, "a string"),
                   opset=opset, precision=precision, codebook=codebook, head=head, select=select, int8=int8, trunk=trunk,
                   two_stage=two_stage, openvino=openvino,
                   decode=decode, ort=ort_opts, parity=parity,
                   trt=parse_trt(raw, fail), triton=parse_triton(raw, fail), source=where)

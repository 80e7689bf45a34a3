"""The ONNX Runtime-tuned trunk: onnxruntime-genai's model builder, run on the model directory without its output
layer (``exclude_lm_head=true``), at fp32 / int8 / int4 (or fp16 / bf16 for GPU execution providers).

    python -m onnxruntime_genai.models.builder -i DIR -o OUT -p PRECISION -e EP -c CACHE \\
        --extra_options exclude_lm_head=true [key=value ...]

What comes back is the builder's own graph — GroupQueryAttention with rotary inside, SkipSimplifiedLayerNormalization,
packed QKV, MatMulNBits, an int4 embedding table shared as is for tied models — with the final hidden state as the
output ``hidden_states``; vqexport attaches its head there. Its KV cache is one preallocated buffer per layer written
in place (``past_present_share_buffer``), and its attention takes no left-padded batches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from ..errors import VQExportError
from ..source import Source
from .builder_main import BUILDER, gemma3_rope_unsupported

INSTALL_HINT = "pip install 'vqexport[genai]' (onnxruntime-genai, whose wheel carries the model builder)"
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
# the builder's execution providers -> the onnxruntime provider that runs the graph
EXECUTION_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider",
                       "webgpu": "WebGpuExecutionProvider", "NvTensorRtRtx": "NvTensorRTRTXExecutionProvider"}
# the precision + execution-provider pairs the builder makes (its own list)
COMBINATIONS = {("fp32", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("fp16", "dml"), ("fp16", "NvTensorRtRtx"),
                ("bf16", "cuda"), ("bf16", "NvTensorRtRtx"), ("int8", "cpu"), ("int8", "cuda"), ("int8", "webgpu"),
                ("int4", "cpu"), ("int4", "cuda"), ("int4", "dml"), ("int4", "webgpu")}
BUILDER_FRAME = re.compile(r'File ".*onnxruntime_genai/models/(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\w+)')
# where a model the builder cannot serve goes instead
PORTABLE = 'a target with [trunk] source = "portable" (ort; ort-int4-portable for int4 weights)'
RESERVED_OPTIONS = ("exclude_lm_head", "include_hidden_states", "exclude_embeds", "filename", "config_only")


def weight_quantization(execution_provider: str, extra_options: dict) -> tuple[int, int]:
    """The MatMulNBits block size and accuracy level the builder (0.18) gives an int4 / int8 model with these
    options: ``block_size`` (default 32) and ``accuracy_level`` (default 4 on the CPU and WebGPU, else 0)."""
    level = 4 if execution_provider in ("cpu", "webgpu") else 0
    return int(extra_options.get("block_size", 32)), int(extra_options.get("accuracy_level", level))


def weight_options(block_size: int, accuracy_level: int, execution_provider: str = "cpu") -> dict:
    """The builder's options that give its MatMulNBits this block size and accuracy level (none for its defaults)."""
    if weight_quantization(execution_provider, {}) == (block_size, accuracy_level):
        return {}
    return {"block_size": str(block_size), "accuracy_level": str(accuracy_level)}


def check_options(precision: str, execution_provider: str, extra_options: dict, fail) -> None:
    """Profile-level rules (no builder needed): a pair the builder makes, options vqexport does not own."""
    if execution_provider not in EXECUTION_PROVIDERS:
        fail(f"trunk.execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, got {execution_provider!r}")
    if precision not in PRECISIONS:
        fail(f"precision {precision!r} is not one onnxruntime-genai's builder makes ({', '.join(PRECISIONS)})")
    if (precision, execution_provider) not in COMBINATIONS:
        pairs = ", ".join(f"{p} {e}" for p, e in sorted(COMBINATIONS) if e == execution_provider)
        fail(f"onnxruntime-genai's builder has no {precision} graph for execution provider {execution_provider!r} "
             f"(it makes: {pairs})")
    taken = sorted(set(extra_options) & set(RESERVED_OPTIONS))
    if taken:
        fail(f"trunk.extra_options may not set {', '.join(taken)}: vqexport attaches the head to the hidden state itself")


def require_builder() -> None:
    """onnxruntime-genai's builder and what it imports must be installed: one line with the install hint if not."""
    for module, hint in (("onnxruntime_genai", INSTALL_HINT), ("transformers", "pip install transformers"),
                         ("torch", "pip install torch")):
        if importlib.util.find_spec(module) is None:
            raise VQExportError(f"the genai trunk runs onnxruntime-genai's model builder, which needs {module} ({hint})")
    if importlib.util.find_spec(BUILDER) is None:
        raise VQExportError(f"this onnxruntime-genai has no model builder ({BUILDER}); {INSTALL_HINT}")


GQA_HEAD_MULTIPLE = 16  # onnxruntime's GroupQueryAttention (the builder's attention) on CPU runs head sizes of 16k only
GQA_ROTARY_MULTIPLE = 8  # ... and cos/sin caches of 8k columns (half the rotated dimensions)


# model types whose builder graph computes something else than transformers' model (parity failed on every one)
BUILDER_DIFFERS = {"olmo": "it normalises with RMSNorm (SimplifiedLayerNormalization) where OLMo uses LayerNorm"}


def builder_differs(text) -> str | None:
    """Why the builder's graph of this decoder config (``text``) would differ from transformers' model, or None."""
    if text.model_type in BUILDER_DIFFERS:
        return BUILDER_DIFFERS[text.model_type]
    if text.model_type == "granitemoehybrid" and getattr(text, "position_embedding_type", None) != "rope":
        return ("it rotates every attention layer with rope, and this model has position_embedding_type = "
                f"{getattr(text, 'position_embedding_type', None)!r}: no rope")
    return None


def check_fits(source: Source, target: str) -> None:
    """What the builder's graph cannot run, refused before any work."""
    head_dim = source.geometry.head_dim
    if head_dim % GQA_HEAD_MULTIPLE:
        raise VQExportError(f"target {target}: onnxruntime-genai's builder makes attention with onnxruntime's "
                            f"GroupQueryAttention, which needs a head size that is a multiple of {GQA_HEAD_MULTIPLE}, and "
                            f"{source.path} has {head_dim}; use " + PORTABLE)
    from ..source import hf_config

    config = hf_config(source.path)
    text = config.get_text_config(decoder=True)  # a multimodal model's decoder (Gemma 3 4B and up)
    rope = getattr(text, "rope_parameters", None)
    partial = getattr(text, "partial_rotary_factor", None) or (rope or {}).get("partial_rotary_factor") or 1.0
    rotary = int(head_dim * partial)
    if (rotary // 2) % GQA_ROTARY_MULTIPLE:
        raise VQExportError(f"target {target}: onnxruntime-genai's builder makes attention with onnxruntime's "
                            f"GroupQueryAttention, whose rotary cache needs half the rotated size to be a multiple of "
                            f"{GQA_ROTARY_MULTIPLE}, and {source.path} rotates {rotary} of its {head_dim} head dimensions "
                            "(partial_rotary_factor); use " + PORTABLE)
    differs = builder_differs(text)
    if differs:
        raise VQExportError(f"target {target}: onnxruntime-genai's builder does not reproduce {source.path}'s "
                            f"{text.model_type} model ({differs}); use " + PORTABLE)
    why = gemma3_rope_unsupported(config)
    if why:
        raise VQExportError(f"target {target}: onnxruntime-genai's builder does not reproduce {source.path}'s rope ({why}): "
                            "its graph would rotate differently from the model; use " + PORTABLE)
    if source.tokenizer_path is not None and not has_eos(source.path, config):  # no tokenizer: build_trunk says so
        raise VQExportError(f"target {target}: onnxruntime-genai's builder writes the model's end-of-sequence token into "
                            f"genai_config.json, and {source.path} gives none (neither config.json's eos_token_id nor the "
                            "tokenizer's eos_token); set eos_token_id in config.json or use " + PORTABLE)


def has_eos(path: Path, config) -> bool:
    """Does the model give an end-of-sequence token where the builder looks for one: the config's eos_token_id, its
    decoder config's, or that of the tokenizer transformers loads for it (whose class may supply a default, as
    Qwen2's and GPT-2's do)."""
    text = getattr(config, "text_config", None)
    if any(getattr(c, "eos_token_id", None) is not None for c in (config, text) if c is not None):
        return True
    from transformers import AutoTokenizer

    from ..quiet import quiet

    try:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception:  # the builder goes on without the tokenizer then, and so does this check
        return False
    return getattr(tokenizer, "eos_token_id", None) is not None


def active_sliding_window(config) -> int | None:
    """The window of transformers' sliding-window attention in this config, or None when no layer uses one (no
    window, one as long as the positions, Qwen2's use_sliding_window = false, layer_types all full attention)."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0 or window >= getattr(config, "max_position_embeddings", window + 1):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return window


def check_window(source: Source, trunk) -> None:
    """The builder leaves a sliding window out of its attention when it does not know which layers use it (Mistral
    in this version): its graph (``trunk``, onnx_ir) would then attend to every position where transformers' model
    sees the last ``sliding_window`` (different logits past the window). Refused, since parity on short prompts
    cannot see it. So is a window longer than the positions (Gemma 3's default 4,096 with fewer positions), which
    onnxruntime stops at on the first run."""
    from ..source import hf_config

    sizes = {n.attributes["local_window_size"].value for n in trunk.graph
             if n.op_type == "GroupQueryAttention" and "local_window_size" in n.attributes}
    positions = source.geometry.max_position
    if max(sizes, default=-1) > positions:  # onnxruntime refuses a KV cache shorter than the window, at the first run
        raise VQExportError(f"{source.path}: onnxruntime-genai's builder gives this {source.model_type} model's attention a "
                            f"sliding window of {max(sizes)} positions, longer than its {positions} "
                            "(max_position_embeddings), and onnxruntime does not run a window longer than the KV cache; "
                            "set sliding_window to at most max_position_embeddings or use " + PORTABLE)
    config = hf_config(source.path).get_text_config(decoder=True)
    window = active_sliding_window(config)
    if window is None:
        return
    if sizes == {-1}:  # GroupQueryAttention everywhere, none of it windowed
        raise VQExportError(f"{source.path}: onnxruntime-genai's builder ignores this {source.model_type} model's sliding "
                            f"window ({window} positions): its attention would see every position; use " + PORTABLE)
    types = getattr(config, "layer_types", None)
    built = _windows_by_layer(trunk)
    if not types or built is None or sorted(built) != list(range(len(types))):
        return  # no per-layer record on one side: the check above is all there is
    expected = [window if t == "sliding_attention" else -1 for t in types]
    wrong = [i for i, w in enumerate(expected) if built[i] != w]
    if wrong:
        said = ", ".join(f"layer {i}: {_window_words(built[i])} where transformers' model has {_window_words(expected[i])}"
                         for i in wrong[:3])
        raise VQExportError(f"{source.path}: onnxruntime-genai's builder gives {len(wrong)} of this {source.model_type} "
                            f"model's layers another attention window than transformers ({said}); use " + PORTABLE)


def _windows_by_layer(trunk) -> dict[int, int] | None:
    """Each layer's GroupQueryAttention window (-1: none), by the layer number in the node's name
    (``/model/layers.N/...``); None when a node's name gives none or a layer has two."""
    out: dict[int, int] = {}
    for n in trunk.graph:
        if n.op_type != "GroupQueryAttention":
            continue
        m = re.search(r"/layers\.(\d+)/", n.name or "")
        if m is None or int(m.group(1)) in out:
            return None
        attr = n.attributes.get("local_window_size")
        out[int(m.group(1))] = attr.value if attr is not None else -1
    return out


def _window_words(w: int) -> str:
    return "full attention" if w == -1 else f"a window of {w}"


def run_builder(model: Path, out: Path, precision: str, execution_provider: str, options: dict,
                workdir: Path) -> subprocess.CompletedProcess:
    """onnxruntime-genai's builder on the model directory, offline, its cache in ``workdir``, through
    ``builder_main`` (transformers' config given in the keys the builder reads)."""
    home = str(Path(__file__).resolve().parents[2])  # builder_main's package, installed or not (appended: no shadowing)
    run = f"import sys; sys.path.append({home!r}); from {__package__}.builder_main import main; main()"
    workdir = Path(workdir).resolve()  # the builder runs in it: relative paths would resolve a second time inside
    cmd = [sys.executable, "-c", run, "-i", str(Path(model).resolve()), "-o", str(Path(out).resolve()),
           "-p", precision, "-e", execution_provider, "-c", str(workdir / "cache")]
    if options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in sorted(options.items()))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=str(workdir), env=env)


def build_trunk(source: Source, precision: str, execution_provider: str, extra_options: dict, workdir: Path) -> Path:
    """Run the builder into ``workdir``/trunk; return that directory (model.onnx + data, genai_config.json, tokenizer)."""
    require_builder()
    if source.tokenizer_path is None:
        raise VQExportError(f"{source.path}: onnxruntime-genai's builder loads the model's tokenizer, and this directory has "
                            "no tokenizer.json; add the tokenizer files or use " + PORTABLE)
    out = Path(workdir) / "trunk"
    proc = run_builder(source.path, out, precision, execution_provider, {"exclude_lm_head": "true", **extra_options}, workdir)
    if proc.returncode != 0 or not (out / "model.onnx").is_file():
        raise VQExportError(f"{source.path}: onnxruntime-genai's builder cannot build this {source.model_type} model "
                            f"({failure_reason(proc)}); use " + PORTABLE)
    return out


INTERNAL_ERRORS = ("KeyError", "AttributeError", "IndexError", "TypeError")  # say little without where they came from


def failure_reason(proc: subprocess.CompletedProcess) -> str:
    """One line from a failed builder run: its last error, with where in the builder a bare KeyError & co. arose."""
    lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln.split(":")[0] or "is not currently supported" in ln]
    text = errors[-1] if errors else (lines[-1] if lines else f"exit code {proc.returncode}")
    if "is not currently supported" in text:
        return "the builder does not support this architecture"
    if text.split(":")[0] in INTERNAL_ERRORS:
        frames = [m for m in map(BUILDER_FRAME.search, lines) if m]
        if frames:
            text += f" in the builder's {frames[-1]['func']}, {frames[-1]['file']} line {frames[-1]['line']}"
    return text[:240]


def scale_hidden(trunk, scale: float) -> None:
    """Multiply the builder's ``hidden_states`` (``trunk``, onnx_ir, in place) by the model's logit scale, as the
    portable trunk does in torch (``Trunk.hidden_scale``): the head reads what gives the model's own logits."""
    import numpy as np
    import onnx_ir as ir

    from ..graph_io import HIDDEN

    if scale == 1.0:
        return
    g = trunk.graph
    index, hidden = next((i, v) for i, v in enumerate(g.outputs) if v.name == HIDDEN)
    hidden.name = f"{HIDDEN}_unscaled"
    dtype = hidden.dtype.numpy() if hidden.dtype is not None else np.float32
    const = ir.Value(name="/vqexport/logit_scale", const_value=ir.tensor(np.array(scale, dtype=dtype)))
    g.initializers.add(const)
    node = ir.node("Mul", [hidden, const], name="/vqexport/logit_scale/Mul", outputs=[ir.Value(name=HIDDEN)])
    node.outputs[0].dtype, node.outputs[0].shape = hidden.dtype, hidden.shape
    g.append(node)
    g.outputs[index] = node.outputs[0]


def genai_config(trunk_dir: Path, logits: bool) -> dict:
    """The builder's genai_config.json for the joined graph: ``logits`` is an output again (the head's)."""
    cfg = json.loads((Path(trunk_dir) / "genai_config.json").read_text(encoding="utf-8"))
    outputs = cfg["model"]["decoder"].setdefault("outputs", {})
    if logits:
        outputs["logits"] = "logits"
    return cfg

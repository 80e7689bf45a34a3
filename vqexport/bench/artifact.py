"""``bench --artifact``: end-to-end latency of a built artifact with onnxruntime (and of its dense twin).

Each model is measured in a fresh worker process (so peak RSS is the model's own): time to first token
for a 128-token prompt, then per-token decode latency over >= 64 greedy tokens after warm-up.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..artifact import read_manifest, weights_beside
from ..errors import VQExportError


def measure(model_path: str, runtime: dict, prompt_len: int, tokens: int, warmup: int, vocab: int) -> dict:
    """Runs inside the worker: prefill + greedy decode timings for one model file."""
    import time

    from ..backends.runners import runner_from_runtime
    from .timing import peak_rss_mb

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, size=(1, prompt_len))
    runner = runner_from_runtime(model_path, runtime)

    def choose(out):
        if out.logits is not None:
            return int(out.logits[0, -1].argmax())
        return int(out.extra["topk_ids"][0, -1, 0])

    import importlib  # the runtime's own import is not the model's memory: done before the first reading

    importlib.import_module(RUNTIME_MODULES.get(runtime.get("backend", "ort"), "onnxruntime"))
    rss_before = _rss_mb()
    with runner:
        ttft = []
        for i in range(4):  # the first prefill warms up; the rest are timed
            t0 = time.perf_counter()
            out = runner.step(prompt, np.ones_like(prompt), runner.empty_past(1))
            nxt = choose(out)
            if i:
                ttft.append(time.perf_counter() - t0)
        mask = np.ones((1, prompt_len), np.int64)
        per_token = []
        for i in range(warmup + tokens):
            mask = np.concatenate([mask, [[1]]], axis=1)
            t0 = time.perf_counter()
            out = runner.step(np.array([[nxt]]), mask, out.present)
            nxt = choose(out)
            if i >= warmup:
                per_token.append(time.perf_counter() - t0)
        rss_loaded = _rss_mb()
    lat = np.asarray(per_token) * 1e3
    return {
        "ttft_ms": float(np.median(ttft) * 1e3),
        "decode_ms_p50": float(np.percentile(lat, 50)), "decode_ms_p90": float(np.percentile(lat, 90)),
        "decode_ms_p99": float(np.percentile(lat, 99)), "tokens_per_s": float(1e3 / lat.mean()),
        "peak_rss_mb": peak_rss_mb(),
        "session_rss_mb": rss_loaded - rss_before,  # resident memory the loaded, running model added
        "model_bytes": _model_bytes(Path(model_path)),
    }


RUNTIME_MODULES = {"ort": "onnxruntime", "openvino": "openvino", "trt": "tensorrt"}


def _last_position_only(graph_path: Path) -> bool:
    """Does the artifact's graph give logits for the last position only (a two-stage head's default, or the
    profile's choice)? Read from the graph itself, so that the twin computes as many positions as the artifact."""
    from ..graph_io import dims_of, load_graph

    logits = next((o for o in load_graph(graph_path).graph.output if o.name == "logits"), None)
    return logits is not None and dims_of(logits)[1] == 1


def _model_bytes(path: Path) -> int:
    """The graph file and its weights (an ONNX graph's external data, an OpenVINO IR's .bin)."""
    weights = weights_beside(path.name)
    extra = path.with_name(weights) if weights is not None else None
    return path.stat().st_size + (extra.stat().st_size if extra is not None and extra.is_file() else 0)


def _head_of(artifact: Path):
    """The head's definition the artifact keeps (what its dense twin is made from)."""
    from ..head.spec import read_artifact_head

    return read_artifact_head(artifact)


def dense_twin(artifact: Path, model_file: str, out: Path, last_position_only: bool = False) -> Path:
    """The artifact's trunk with the dense-head twin of its head (W[v] = C[M[v]] (+ U[v] P), same bias), written to
    ``out``/dense.onnx: the same logits as the VQ head, from one V x d MatMul. A two-stage head's twin is the
    model's own output layer (the rows it rescores with: the trunk's embedding table when tied, else the artifact's
    fp32 copy, or the codes stage 2 reads dequantized when it keeps no fp32 copy): the dense model it was converted
    from. On an int4 / int8 trunk the twin's output layer is quantized the same way (MatMulNBits, the trunk's
    blocks), so both sides run at the trunk's precision."""
    import onnx_ir as ir

    from ..head.graph import DENSE_MATMUL, HeadForm
    from ..join import detach_head, join, save

    head = _head_of(artifact)
    model = ir.load(str(artifact / model_file))
    rows = rows_bias = None
    tied = False
    manifest = read_manifest(artifact)
    config = manifest["config"]
    quant = _trunk_quantization(manifest["profile"])
    softcap = config.get("logit_softcap")  # the twin's logits capped as the artifact's
    if head.two_stage:
        rows, rows_bias = _initializer(model, "head.rows"), _initializer(model, "head.rows_bias")
        tied = bool(config.get("tie_word_embeddings"))
        if rows is None and not tied:  # an untied model's output layer, kept only as stage 2's codes
            rows = _rows_from_codes(model, head.config.vocab_size)
        if rows is None and not tied:
            raise VQExportError(f"{artifact}: the model's output layer is not in this artifact in a form its dense twin "
                                "can be made of; build with [two_stage] rows = \"fp32\"")
        if rows is None:
            rows = _table_rows(model, quant is not None)
            tied = rows is None
    try:
        model = join(detach_head(model), head, HeadForm(dense=True, last_position_only=last_position_only), rows=rows,
                     rows_bias=rows_bias, tied=tied, softcap=softcap)
    except ValueError as e:  # a tied two-stage head whose trunk reads its embedding table some other way
        if not head.two_stage:
            raise
        raise VQExportError(f"{artifact}: cannot build the two-stage head's dense twin ({e})") from None
    if quant is not None:
        from ..trunk.quantize import quantize_nodes

        model = quantize_nodes(model, [DENSE_MATMUL], *quant)
        if next((n.op_type for n in model.graph if n.name.startswith(DENSE_MATMUL)), None) != "MatMulNBits":
            raise VQExportError(f"{artifact}: the dense twin's output layer could not be quantized like the "
                                f"{quant[0]} trunk")
    save(model, out, "dense.onnx")
    return out / "dense.onnx"


def output_layer_bytes(twin: Path) -> int:
    """The bytes of the dense twin's output layer as stored (fp32, or the trunk's int4 / int8 blocks with their
    scales and zero points): the initializers its MatMul reads."""
    import onnx_ir as ir

    from ..head.graph import DENSE_MATMUL

    graph = ir.load(str(twin)).graph
    weights = {v.name: v.const_value for n in graph if n.name.startswith(DENSE_MATMUL)
               for v in n.inputs if v is not None and v.const_value is not None}
    return sum(t.nbytes for t in weights.values())


def _trunk_quantization(profile: dict) -> tuple[str, int, int] | None:
    """(precision, block size, accuracy level) of an int4 / int8 trunk from the manifest's profile: the portable
    trunk's [trunk] keys, or what the builder makes of its options."""
    from ..profiles import QUANTIZED

    precision = profile.get("precision")
    if precision not in QUANTIZED:
        return None
    trunk = profile.get("trunk", {})
    if trunk.get("source") == "genai":
        from ..trunk.genai import weight_quantization

        return precision, *weight_quantization(trunk.get("execution_provider", "cpu"), trunk.get("extra_options", {}))
    return precision, int(trunk.get("block_size", 32)), int(trunk.get("accuracy_level", 4))


def _table_rows(model, quantized_trunk: bool) -> np.ndarray | None:
    """A tied model's output rows for its twin, when the twin cannot share the trunk's embedding table: a table
    read by GatherBlockQuantized, as onnxruntime's kernel reads it, or a plain table on a quantized trunk (an fp32
    copy, which the twin's output layer quantizes). None: the twin shares the table."""
    from ..graph_io import embedding_lookup
    from ..trunk.quantize import dequantized_rows

    lookup = embedding_lookup(model.graph)
    if lookup is not None and lookup.op_type == "GatherBlockQuantized":
        return dequantized_rows(lookup)
    if lookup is not None and quantized_trunk and lookup.inputs[0].const_value is not None:
        return np.array(lookup.inputs[0].const_value.numpy(), dtype=np.float32)
    return None


ROW_CODES = {"int8": "7-bit", "int4": "4-bit"}  # a two-stage head's row forms: the codes each stores (head/graph.py)


def _rows_from_codes(model, vocab: int) -> np.ndarray | None:
    """An untied model's output rows [V, d], fp32, from the codes a two-stage head's stage 2 reads them as (the int8
    copy laid out by cluster: codes times their scales; the int4 table: as onnxruntime's kernel gathers it); None when
    the graph has neither. (The int8 form's kernel multiplies the codes by h quantized per position, so the artifact's
    exact logits also carry h's rounding, which the twin's do not.)"""
    from ..head.graph import EXACT_ROWS
    from ..trunk.quantize import dequantized_rows

    codes = _initializer(model, "head.rows_q")  # [K, d, cap] codes, each cluster's rows transposed
    if codes is not None:  # its scales and member ids, [K, cap] each (the int4 form has other scales: not copied)
        scale, ids = _initializer(model, "head.rows_scale"), _initializer(model, "head.members")
        if scale is not None and ids is not None:
            K, d, cap = codes.shape
            rows = np.empty((vocab, d), np.float32)
            for k in range(0, K, 1024):  # padding repeats a member of its cluster: the same row written twice
                block = codes[k : k + 1024].transpose(0, 2, 1).astype(np.float32) * scale[k : k + 1024, :, None]
                rows[ids[k : k + 1024].reshape(-1)] = block.reshape(-1, d)
            return rows
    lookup = next((n for n in model.graph if n.name == EXACT_ROWS and n.op_type == "GatherBlockQuantized"), None)
    return None if lookup is None else dequantized_rows(lookup)


def _initializer(model, name: str) -> np.ndarray | None:
    """A copy of the named initializer (a view would keep the weights file mapped, and the twin may load it)."""
    value = model.graph.initializers.get(name)
    return None if value is None else np.array(value.const_value.numpy())


def _rss_mb() -> float:
    """Current resident set size (Linux /proc; 0.0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration, ValueError):
        return 0.0


def _in_worker(model_path: Path, runtime: dict, prompt_len: int, tokens: int, warmup: int, vocab: int) -> dict:
    args = json.dumps([str(model_path), runtime, prompt_len, tokens, warmup, vocab])
    code = "import json,sys; from vqexport.bench.artifact import measure; print(json.dumps(measure(*json.loads(sys.argv[1]))))"
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if proc.returncode != 0:
        worker_failed(proc)
    return json.loads(proc.stdout.strip().splitlines()[-1])


_USER_ERROR = f"{VQExportError.__module__}.{VQExportError.__qualname__}: "


def worker_failed(proc: subprocess.CompletedProcess):
    """A worker process failed: its VQExportError is the user's (one line, exit 2); anything else is a bug."""
    last = (proc.stderr.strip().splitlines() or [str(proc.returncode)])[-1]
    if last.startswith(_USER_ERROR):
        raise VQExportError(last[len(_USER_ERROR):])
    raise RuntimeError(f"benchmark worker failed: {last}")


def _check_trt_bench(manifest: dict, artifact: Path, vs_dense: bool, prompt_len: int, steps: int) -> None:
    """A TensorRT artifact: this machine must run its engine, and the engine's profiles must hold the run."""
    from ..backends.trt.env import check_engine_runs_here, probe
    from ..backends.trt.shapes import check_fits_run
    from ..profiles import parse_profile

    if vs_dense:
        raise VQExportError("--vs-dense builds an ONNX Runtime twin; it is not available for a TensorRT artifact")
    profile = parse_profile(manifest["profile"], f"{artifact}/manifest.json", recorded=True)
    check_fits_run(profile.trt, 1, prompt_len, steps, f"{artifact}: bench", built=True)
    check_engine_runs_here(manifest["runtime"].get("engine", {}), probe(), str(artifact))


def _median(values):
    return float(np.median(values))


def run_artifact_bench(artifact, vs_dense: bool = False, prompt_len: int = 128, tokens: int = 64, warmup: int = 8,
                       repeats: int = 3, progress=None) -> dict:
    from .timing import machine

    from ..artifact import check_files
    from ..build import check_logits_fit
    from ..profiles import parse_profile

    artifact = Path(artifact)
    if tokens < 1 or prompt_len < 1 or repeats < 1:
        raise VQExportError("--tokens, --prompt-length and --repeats must be >= 1")
    manifest = read_manifest(artifact)
    check_files(artifact, manifest, hashes=True)  # the weights timed are the ones built
    cfg = manifest["config"]
    if prompt_len + warmup + tokens > cfg.get("max_position", 2048):
        raise VQExportError(f"prompt + tokens exceed the model's max_position {cfg.get('max_position')}")
    runtime = manifest["runtime"]
    if vs_dense and manifest["profile"].get("decode", {}).get("mode") == "topk":
        raise VQExportError("this artifact has no logits output (decode = 'topk'); its dense twin cannot be built")
    if runtime.get("backend") == "trt":
        _check_trt_bench(manifest, artifact, vs_dense, prompt_len, warmup + tokens)
    # the prefill's shape from the recorded profile, not the graph: one onnxruntime cannot load is the worker's to say
    profile = parse_profile(manifest["profile"], f"{artifact}/manifest.json", recorded=True)
    form = profile.head_form((cfg.get("head") or {}).get("type") == "two-stage")
    check_logits_fit(form, 1, prompt_len, cfg["vocab_size"], f"{artifact}: bench", "give a shorter --prompt-length")
    models = {"vq": artifact / runtime["model_file"]}
    with tempfile.TemporaryDirectory() as tmp:
        if vs_dense:
            if runtime.get("backend") == "openvino":  # the IR's own trunk, as built and compressed, the head replaced
                from ..backends.openvino.twin import dense_twin_ir

                models["dense"], layer_bytes = dense_twin_ir(artifact, runtime, _head_of(artifact), cfg.get("logit_softcap"),
                                                             form.last_position_only, Path(tmp))
            else:
                twin = models["dense"] = dense_twin(artifact, runtime["model_file"], Path(tmp),
                                                    last_position_only=_last_position_only(artifact / runtime["model_file"]))
                layer_bytes = output_layer_bytes(twin)
        # the sides alternate, `repeats` times each, so drift on the machine hits both alike; medians reported
        runs: dict[str, list[dict]] = {k: [] for k in models}
        steps = repeats * len(models)
        for r in range(repeats):
            for i, (side, path) in enumerate(models.items()):
                if progress:
                    progress(f"{side}: run {r + 1}/{repeats}", r * len(models) + i, steps)
                runs[side].append(_in_worker(path, runtime, prompt_len, tokens, warmup, cfg["vocab_size"]))
    result = {"artifact": str(artifact), "target": manifest["target"], "backend": runtime.get("backend", "ort"),
              "prompt_length": prompt_len, "tokens": tokens,
              "repeats": repeats, "machine": machine()}
    for side, measured in runs.items():
        result[side] = {k: _median([m[k] for m in measured]) if isinstance(v, float) else v for k, v in measured[0].items()}
    result["vq"]["artifact_bytes"] = sum(f["bytes"] for f in manifest["files"].values())
    if vs_dense:
        vq, dense = result["vq"], result["dense"]
        dense["artifact_bytes"] = dense["model_bytes"]
        result["ratios"] = {
            "ttft": dense["ttft_ms"] / vq["ttft_ms"], "decode_p50": dense["decode_ms_p50"] / vq["decode_ms_p50"],
            "tokens_per_s": vq["tokens_per_s"] / dense["tokens_per_s"], "model_bytes": dense["model_bytes"] / vq["model_bytes"],
            "peak_rss": dense["peak_rss_mb"] / vq["peak_rss_mb"],
            "session_rss": dense["session_rss_mb"] / max(vq["session_rss_mb"], 1e-9),
        }
        cfg = manifest["config"]
        rows_form = manifest["profile"].get("two_stage", {}).get("rows")
        if cfg["head"].get("type") == "two-stage" and not cfg.get("tie_word_embeddings") and rows_form in ("int8", "int4"):
            result["note"] = (f"this artifact keeps the model's output layer only as the {ROW_CODES[rows_form]} codes its "
                              "stage 2 reads, so the twin's layer is made from them, dequantized"
                              + (" (then quantized like the trunk)" if _trunk_quantization(manifest["profile"]) else "")
                              + ": a dense layer's size and speed, its logits within the codes' error of the dense model's")
        if cfg.get("tie_word_embeddings") and cfg["head"].get("type", "vq") == "vq":
            result["note"] = (f"the model ties its embeddings, so its own dense output layer is the embedding table; the "
                              f"twin computes the VQ head's logits with a V x d layer of its own, {layer_bytes:,} bytes "
                              "that model does not hold, in the twin's model bytes and memory")
    if progress:
        progress("done", steps, steps)
    return result

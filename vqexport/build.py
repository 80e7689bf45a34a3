"""``build``: model directory -> trunk graph + head graph -> target backend -> parity check -> artifact (atomically).

    source     the Hugging Face model directory and its head (vqexport.source)
    trunk      torch.onnx of transformers' decoder (vqexport.trunk.portable), fp16 for fp16 targets
    head       the profile's head form built from the head's tensors (vqexport.head.graph), joined to the trunk
    backend    ONNX Runtime, TensorRT or OpenVINO lay out and build the artifact (vqexport.backends)
    parity     the artifact against transformers' model + the head's torch module (vqexport.verify)
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .artifact import (build_lock, check_files, check_output_dir, graph_file, read_manifest, source_hashes, staged_dir,
                       write_manifest)
from .errors import ParityError, VQExportError
from .head.spec import has_head, read_head_config
from .memory import available_memory
from .profiles import QUANTIZED, Profile, load_profile
from .source import DEMO_NAME, Source, is_demo, resolve_source
from .verify import ParityReport

DEFAULT_OUT = "artifacts"  # ./artifacts/<target>/ (not ./build/, where setuptools builds)
_TRUNKS: dict = {}  # exported trunks of small models, reused within one process (tests, several targets)
_MEMO_MAX_BYTES = 256 << 20  # per trunk
_MEMO_ENTRIES = 8


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    parity: ParityReport


def _noop(stage: str) -> None:
    pass


def source_record(source: Source) -> dict:
    files = source_hashes(source.files())
    return {"model": DEMO_NAME if is_demo(source.path) else str(source.path.resolve()), "sha256": files}


def fingerprint(source: dict, profile: Profile) -> str:
    blob = json.dumps({"source": source["sha256"], "profile": profile.to_dict(), "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def versions(runtime: dict | None = None) -> dict:
    import onnx
    import onnxruntime
    import torch
    import transformers

    out = {"vqexport": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if runtime and runtime.get("backend") == "trt":
        out["tensorrt"] = runtime["engine"]["tensorrt"]
    if runtime and runtime.get("backend") == "openvino":
        out["openvino"] = runtime["openvino"]
    return out


def resolve_profile(target: str | Path | Profile, head: str | None = None) -> Profile:
    """The profile for ``target``, with the head form overridden by ``--head`` if given."""
    profile = target if isinstance(target, Profile) else load_profile(target)
    if head is not None and head != profile.head:
        import dataclasses

        if head not in ("standard", "fused"):
            raise VQExportError(f"--head must be 'standard' or 'fused', got {head!r}")
        profile = dataclasses.replace(profile, head=head, name=f"{profile.name}-{head}",
                                      description=f"{profile.description} (head = {head!r} by --head)")
    return profile


def with_tolerances(profile: Profile, atol: float | None = None, rtol: float | None = None) -> Profile:
    """``profile`` with its parity check's ``atol`` / ``rtol`` replaced where given (``--atol``, ``--rtol``)."""
    import dataclasses

    given = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
    for key, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise VQExportError(f"--{key} must be a finite number >= 0, got {value!r}")
    given = {k: float(v) for k, v in given.items()}
    return dataclasses.replace(profile, parity=dataclasses.replace(profile.parity, **given)) if given else profile


def build(target: str | Path | Profile = "ort", model=None, out=None, force: bool = False, steps: int | None = None,
          head: str | None = None, atol: float | None = None, rtol: float | None = None, progress=_noop) -> BuildResult:
    """Build a verified artifact for ``target`` from ``model`` (a model directory; None = the embedded demo).
    ``atol`` / ``rtol`` replace the profile's parity tolerances; the manifest records them, so ``verify`` applies
    them again.

    Raises VQExportError for bad input (nothing written) and ParityError if the artifact does not match the
    PyTorch reference within the profile's tolerances (nothing written either).
    """
    profile = with_tolerances(resolve_profile(target, head), atol, rtol)
    check_machine(profile)
    progress("reading the model")
    source = resolve_source(model)
    out = (Path(out) if out is not None else Path(DEFAULT_OUT) / profile.name).resolve()
    model_dir = source.path.resolve()
    if out == model_dir or out in model_dir.parents:
        raise VQExportError(f"{out}: the output directory would replace the model directory {model_dir} (or a folder "
                            "holding it); choose another --out")
    check_profile_fits(profile, source)
    prompts = check_steps_fit(source, profile, steps)
    source = for_target(source, profile)
    record = source_record(source)
    fp = fingerprint(record, profile)
    missing = [d for d in (out, *out.parents) if not d.exists()]  # deepest first: removed again if the build fails
    try:
        check_output_dir(out, fp, force)
        with build_lock(out):  # another build into the same directory finishes first; then this one decides again
            check_output_dir(out, fp, force)
            return _build(profile, source, record, fp, out, steps, prompts, progress)
    except BaseException:
        for d in missing:
            try:
                d.rmdir()  # only if empty: another process may have put something there meanwhile
            except FileNotFoundError:
                continue
            except OSError:
                break
        raise


def _build(profile: Profile, source: Source, record: dict, fp: str, out: Path, steps, prompts, progress) -> BuildResult:
    previous_cache = _previous_timing_cache(out) if profile.backend == "trt" else None
    with staged_dir(out) as tmp:
        reference = reference_runner(source, progress)
        trunk = write_graph(tmp, profile, source, reference, progress)
        readiness = None
        progress(f"building for {profile.name}")
        if profile.backend == "trt":
            from .backends.trt.builder import build_trt
            from .backends.trt.prepare import prepare_for_trt
            from .backends.trt.readiness import check, enforce
            from .graph_io import load_graph

            progress("checking TensorRT readiness")
            graph = prepare_for_trt(load_graph(tmp / "model.onnx"))  # what TensorRT's parser sees: checked, then built
            readiness = check(graph, profile, source.geometry, weights_dir=tmp)
            enforce(readiness)
            runtime = build_trt(tmp, profile, source, timing_cache=previous_cache, graph=graph)
        elif profile.backend == "openvino":
            from .backends.openvino.builder import build_openvino

            progress("converting to OpenVINO IR")
            runtime = build_openvino(tmp, profile, source)
        else:
            from .backends.ort.builder import build_ort

            runtime = build_ort(tmp, profile, source, trunk)
        progress("verifying parity against PyTorch")
        report = verify_dir(tmp, runtime, profile, source, prompts, reference, steps=steps, progress=progress)
        if profile.triton.enabled:
            from .serving.triton import layout

            progress("laying out the Triton model repository")
            runtime = layout(tmp, runtime, profile)
        sizes, opset = _graph_record(tmp, runtime)
        if profile.backend == "openvino" and not profile.openvino.keep_onnx:  # sizes recorded: the IR alone ships
            from .backends.openvino.builder import drop_onnx

            runtime = drop_onnx(tmp, runtime)
        manifest = {
            "fingerprint": fp,
            "target": profile.name,
            "profile": profile.to_dict(),
            "source": record,
            "config": {**source.geometry.to_dict(), "head": source.head.config.to_dict()},
            "opset": opset,
            "versions": versions(runtime),
            "runtime": runtime,
            "sizes": sizes,
            "parity": report.to_dict(),
        }
        if readiness is not None:
            manifest["readiness"] = readiness.to_dict()
        if not report.passed:
            raise ParityError(f"for target {profile.name}: {'; '.join(report.failures)}", report)
        progress("writing manifest")
        manifest = write_manifest(tmp, manifest)
    return BuildResult(out=out, manifest=manifest, parity=report)


def _graph_record(directory: Path, runtime: dict) -> tuple[dict, int]:
    """The written graph's head and trunk sizes, and its opset (the builder's trunk has its own, whatever the
    profile's ``opset``)."""
    from .graph_io import load_graph
    from .sizes import onnx_sizes

    proto = load_graph(directory / graph_file(runtime))
    return onnx_sizes(proto), next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def reference_runner(source: Source, progress=_noop):
    """transformers' model of ``source`` + its head's torch module, as the Runner parity compares against."""
    from .backends.torch_ref import TorchRunner

    progress(f"loading the {source.model_type} model with transformers")
    return TorchRunner.from_source(source)


def export_trunk(profile: Profile, source: Source, reference, progress=_noop):
    """The trunk graph (onnx_ir) of ``source``: exported once per process for small models, then copied. Always a
    copy (its tensors shared, not duplicated): a copy names the values added to it afterwards (the head's, those of
    the passes) from a fresh counter, where the export's own graph would continue the export's, so the first build
    in a process and every later one write the same bytes."""
    from .trunk.portable import export_trunk as export, memo_key

    key = memo_key(source, profile.opset)
    if key in _TRUNKS:
        return _TRUNKS[key].clone()
    progress(f"exporting the {source.model_type} trunk with torch.onnx")
    model = export(reference.trunk, source, opset=profile.opset)
    if _weight_bytes(reference.trunk) <= _MEMO_MAX_BYTES:
        while len(_TRUNKS) >= _MEMO_ENTRIES:
            _TRUNKS.pop(next(iter(_TRUNKS)))
        _TRUNKS[key] = model
    return model.clone()


def write_graph(directory: Path, profile: Profile, source: Source, reference, progress=_noop) -> dict:
    """Make the trunk (portable export or onnxruntime-genai's builder), attach the profile's head, write
    model.onnx + model.onnx.data into ``directory``. Returns what the backend needs to know about the trunk."""
    import tempfile

    import onnx_ir as ir

    from .join import check, join, save

    form = profile.head_form(two_stage=source.head.two_stage)
    scales = None
    if form.codebook == "int8" and form.int8_encoding == "qdq" and form.activations:
        from .calibrate import activation_scales

        progress("calibrating the head's int8 activations")
        scales = activation_scales(reference, source)
    with tempfile.TemporaryDirectory(prefix="vqexport-trunk-") as work:
        if profile.trunk.source == "genai":
            from .trunk.genai import build_trunk, check_window, genai_config, scale_hidden

            progress(f"building the {profile.precision} trunk with onnxruntime-genai's model builder")
            trunk_dir = build_trunk(source, profile.precision, profile.trunk.execution_provider, profile.trunk.extra_options,
                                    Path(work))
            trunk = ir.load(str(trunk_dir / "model.onnx"))
            check_window(source, trunk)
            scale_hidden(trunk, reference.trunk.hidden_scale)
            info = {"trunk": "genai", "past_present_share_buffer": True,
                    "genai_config": genai_config(trunk_dir, logits="logits" in form.outputs(source.head))}
        else:
            trunk = export_trunk(profile, source, reference, progress)
            if profile.backend != "ort":  # NNCF and TensorRT's readiness check do not look into an If's branches
                from .trunk.experts import unwrap_experts

                unwrap_experts(trunk)
            if profile.precision == "fp16":
                from .trunk.fp16 import fp16_trunk

                progress("casting the trunk to fp16 (head stays fp32)")
                trunk = fp16_trunk(trunk)
            elif profile.precision in QUANTIZED:
                from .trunk.quantize import quantize_weights

                t = profile.trunk
                progress(f"quantizing the trunk's weights to {profile.precision} (blocks of {t.block_size}) with "
                         "onnxruntime's quantizer")
                trunk = quantize_weights(trunk, profile.precision, t.block_size, t.accuracy_level, t.quantize_embedding)
            info = {"trunk": "portable", "past_present_share_buffer": False}
        progress(f"building the head ({source.head.config.type}, {profile.head}, {profile.codebook}, {profile.decode.mode})")
        rows = rows_bias = None
        if source.head.two_stage:  # exact rows: the model's output layer (shared with the embedding when tied)
            rows = reference.head.rows.numpy()
            rows_bias = reference.head.rows_bias.numpy() if reference.head.rows_bias is not None else None
        try:
            model = join(trunk, source.head, form, scales, metadata={"vqexport.target": profile.name}, rows=rows,
                         rows_bias=rows_bias, tied=source.geometry.tie_word_embeddings,
                         softcap=source.geometry.logit_softcap)
        except ValueError as e:  # a tied two-stage head finds no embedding table in the trunk to read its rows from
            if not source.head.two_stage:
                raise
            raise VQExportError(f"{source.path}: cannot attach the two-stage head to the {info['trunk']} trunk ({e})") from None
        progress("writing model.onnx with external data")
        info["files"] = save(model, directory)
    if info["trunk"] == "portable":  # the builder's graph uses onnxruntime's own ops, which onnx's checker does not know
        check(directory)
    return info


def check_machine(profile: Profile) -> None:
    """What the target needs from this machine, before anything is exported or written."""
    if profile.backend == "trt":
        from .backends.trt.env import require

        require(f"target {profile.name}")
    elif profile.backend == "openvino":
        from .backends.openvino.env import require_device, require_nncf

        require_device(profile.openvino.device, f"target {profile.name}")
        if profile.openvino.weights != "fp32":
            require_nncf(f"target {profile.name}")
    else:
        from .backends.ort.session import available_providers

        available_providers(profile.ort.providers)
        if profile.trunk.source == "genai":
            from .trunk.genai import require_builder

            require_builder()
    if profile.triton.enabled:
        from .serving.triton import model_config_schema

        model_config_schema()


def _previous_timing_cache(out: Path) -> bytes | None:
    """The timing cache of the TensorRT artifact being replaced, so a rebuild reuses its measurements."""
    try:
        name = read_manifest(out)["runtime"].get("timing_cache")
    except VQExportError:
        return None
    path = out / name if name else None
    return path.read_bytes() if path is not None and path.is_file() else None


def check_readiness(target: str | Path | Profile, model=None, head: str | None = None, progress=_noop):
    """``build --check-only``: export, attach the profile's head, then the TensorRT readiness check, on CPU.

    Returns the Readiness report (``passed``, ``reasons``); writes nothing and needs neither TensorRT nor a GPU.
    """
    import tempfile

    from .backends.trt.prepare import prepare_for_trt
    from .backends.trt.readiness import check
    from .graph_io import load_graph

    profile = resolve_profile(target, head)
    if profile.backend != "trt":
        raise VQExportError(f"--check-only checks TensorRT readiness; target {profile.name} has backend {profile.backend!r}")
    source = resolve_source(model)
    check_profile_fits(profile, source)
    source = for_target(source, profile)
    reference = reference_runner(source, progress)
    with tempfile.TemporaryDirectory() as tmp:
        write_graph(Path(tmp), profile, source, reference, progress)
        progress("checking TensorRT readiness")
        return check(prepare_for_trt(load_graph(Path(tmp) / "model.onnx")), profile, source.geometry, weights_dir=Path(tmp))


def for_target(source: Source, profile: Profile) -> Source:
    """The model as the target builds it: a two-stage head with the profile's probes when the profile sets them
    (``check_profile_fits``, run first, saw that they fit)."""
    import dataclasses

    head = source.head
    if head is None or not head.two_stage or not profile.two_stage.probes or profile.two_stage.probes == head.config.probes:
        return source
    config = dataclasses.replace(head.config, probes=profile.two_stage.probes)
    return dataclasses.replace(source, head=dataclasses.replace(head, config=config))


def check_profile_fits(profile: Profile, source: Source) -> None:
    """Reject a profile the model cannot satisfy before any work starts."""
    head = source.head.config
    if source.geometry.logit_softcap and profile.decode.mode == "topk":
        raise VQExportError(f"target {profile.name}: {source.path} soft-caps its logits (final_logit_softcapping = "
                            f"{source.geometry.logit_softcap:g}), so they are not cluster score + token terms and the "
                            "top-k form's cluster log-probabilities do not hold; use a target with decode.mode = 'logits'")
    if head.type == "two-stage" and profile.head == "fused":
        raise VQExportError(f"target {profile.name}: the fused VQLogits op has no second stage, and {source.path} has a "
                            "two-stage head; build it with --head standard (head = 'standard' in a target file)")
    if profile.codebook == "int8" and profile.int8.encoding == "native":
        if profile.head == "fused":
            raise VQExportError(f"target {profile.name}: the native int8 encoding (MatMulNBits) cannot feed a fused VQLogits head; build with --head standard, or set [int8] encoding = 'qdq' in a target file")
        if profile.int8.activations:
            raise VQExportError(f"target {profile.name}: int8.activations applies to the QDQ encoding only")
    if profile.backend == "trt":
        from .backends.trt.checks import check_trt_profile

        check_trt_profile(profile, source)
    if profile.head == "fused" and profile.backend == "openvino":
        raise VQExportError(f"target {profile.name}: OpenVINO cannot convert the fused VQLogits op; use head = 'standard'")
    if profile.head == "fused":
        if profile.decode.mode == "topk":
            raise VQExportError(f"target {profile.name}: head = 'fused' outputs logits; it cannot be combined with decode.mode = 'topk'")
        if profile.backend == "ort" and profile.ort.kernel == "extensions":
            if head.rank:
                raise VQExportError(f"target {profile.name}: the onnxruntime-extensions VQLogits kernel takes the 4-input form only, and "
                                    f"{source.path} has a rank-{head.rank} correction; use a target with [ort] kernel = \"function\"")
            from .ops.vqlogits import register_ort_kernel

            register_ort_kernel()  # fails clearly if the runtime has no way to provide the kernel
    if head.type == "two-stage":
        if profile.two_stage.probes > head.codebook_size:
            raise VQExportError(f"target {profile.name}: two_stage.probes = {profile.two_stage.probes} exceeds the head's "
                                f"codebook_size {head.codebook_size}")
        from .head.graph import NATIVE_BLOCK

        if profile.two_stage.rows == "int4" and head.hidden_size % NATIVE_BLOCK:
            raise VQExportError(f"target {profile.name}: two_stage.rows = 'int4' quantizes the rows in blocks of "
                                f"{NATIVE_BLOCK} along the hidden size, and {source.path} has hidden size {head.hidden_size}; "
                                "use rows = 'int8' or 'fp32'")
        if profile.backend == "trt" and profile.two_stage.rows == "int8":
            raise VQExportError(f"target {profile.name}: two_stage.rows = 'int8' uses MatMulInteger, which TensorRT does not run")
    if profile.trunk.source == "genai":
        from .trunk.genai import check_fits

        check_fits(source, profile.name)
    if profile.decode.mode == "topk" and profile.decode.k > head.vocab_size:
        raise VQExportError(f"target {profile.name}: decode.k = {profile.decode.k} exceeds the vocabulary size {head.vocab_size}")


MAX_STEPS = 4096  # greedy decode steps of a parity check (the CLI's --steps range)


def check_steps_fit(source: Source, profile: Profile, steps: int | None, prompts: list[list[int]] | None = None,
                    artifact: Path | None = None) -> list[list[int]]:
    """The parity check's longest prompt (``prompts``' ids, or the built-in prompts) and its decode steps must fit in
    the model's positions, and on a TensorRT target in the engine's ranges: the profile's (a build), or those of the
    engine built in ``artifact`` (a verify). Returns the prompts' ids checked."""
    from .prompts import prompt_ids

    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_STEPS):
        raise VQExportError(f"steps must be an integer in [0, {MAX_STEPS}], got {steps!r}")
    n = profile.parity.steps if steps is None else steps
    given = prompts is not None
    prompts = prompts if given else prompt_ids(source.tokenizer_path, source.geometry.vocab_size)
    longest = max(len(p) for p in prompts)
    limit = source.geometry.max_position
    if limit and longest + n > limit:
        raise VQExportError(f"the parity check's longest prompt ({longest} tokens) + {n} decode steps exceeds the "
                            f"model's max_position {limit}; pass --steps {max(limit - longest, 0)} or fewer")
    if profile.backend == "trt":
        from .backends.trt.shapes import check_fits_run

        where = (f"target {profile.name} parity check" if artifact is None
                 else f"{artifact}: " + ("the prompts given" if given else "the parity check"))
        check_fits_run(profile.trt, len(prompts), longest, n, where, built=artifact is not None)
    return prompts


PEAK_PER_LOGITS = 3  # a prefill's peak memory over its [B, S, V] float32 logits: the head's V-wide intermediates
# (the standard head's expanded map and gathered scores) and the output's copy. Measured at the Qwen2.5-0.5B head
# shape, 8 prompts of 1,000 tokens (4.5 GiB of logits): verify peaked at 14.7 GB, onnxruntime's run alone at 12.8 GB.


def check_logits_fit(form, batch: int, longest: int, vocab: int, where: str, remedy: str) -> None:
    """A prefill of ``batch`` prompts padded to ``longest`` tokens gives V float32 logits at every position (1 MiB per
    position at V = 262,144), or at the last one for a graph of that ``form`` (vqexport.head.graph.HeadForm), and
    none V-wide for a top-k graph; they must fit PEAK_PER_LOGITS times over in the memory available: a run that
    cannot is refused before anything is loaded, rather than killed by the kernel minutes in."""
    if form.decode != "logits" and not form.keep_logits:  # top-k outputs: k values per position
        return
    need = PEAK_PER_LOGITS * batch * (1 if form.last_position_only else longest) * vocab * 4
    free = available_memory()
    if free is not None and need > free:
        s = "s" if batch > 1 else ""
        shape = (f"the last position of {batch} prompt{s}" if form.last_position_only
                 else f"{batch} prompts padded to {longest} tokens" if batch > 1 else f"a prompt of {longest} tokens")
        raise VQExportError(f"{where}: the target's logits need about {need / 2**30:.1f} GiB at their peak ({shape} x "
                            f"V = {vocab:,} float32, {PEAK_PER_LOGITS} times over: the head's V-wide intermediates and "
                            f"the output's copy) and {free / 2**30:.1f} GiB is available; {remedy}")


def verify_dir(artifact: Path, runtime: dict, profile: Profile, source: Source, prompts: list[list[int]], reference=None,
               steps=None, progress=_noop) -> ParityReport:
    """Compare the artifact in ``artifact`` (its runtime section) with the PyTorch reference, on ``prompts`` (token
    ids, as ``check_steps_fit`` checked and returned them)."""
    from .backends.runners import runner_from_runtime
    from .verify import verify_runners

    reference = reference if reference is not None else reference_runner(source, progress)
    n = profile.parity.steps if steps is None else steps
    geo = source.geometry
    pad = geo.pad_token_id if geo.pad_token_id is not None else (geo.eos_token_id or 0)
    target = runner_from_runtime(Path(artifact) / runtime["model_file"], runtime)
    batched = not runtime.get("past_present_share_buffer", False)  # GroupQueryAttention takes no left-padded batch
    with reference as ref:
        return verify_runners(ref, target, prompts, n, profile.parity, target_name=profile.name, pad_id=pad,
                              mapping=source.head.map, batched=batched,
                              progress=lambda i, total: progress(f"verifying parity: step {i}/{total}"),
                              reference_error=lambda: reference_error(source, ref, prompts, n, progress))


def reference_error(source: Source, reference, prompts, steps: int, progress=_noop) -> tuple[float | None, str]:
    """PyTorch's own float32 error on the parity check (``verify.rounding_error``): ``reference`` (float32) against the
    same model with float64 weights and activations, on the same prompts and decode steps; or None and why it could
    not be measured. (transformers computes a few steps in float32 whatever the model's type: norms, rotary angles.)
    The prompts go in one at a time: transformers' float64 attention turns fully masked (left-padding) rows into NaN."""
    import gc

    import torch

    from .backends.torch_ref import TorchRunner
    from .trunk.hf import MODEL_ERRORS
    from .verify import rounding_error

    geo = source.geometry
    # the float64 model (twice the float32 trunk and output layer) and what loading it maps (measured: 2.4x to 2.6x)
    need = int(2.5 * (_weight_bytes(reference.trunk) + 4 * geo.vocab_size * geo.hidden_size))
    free = available_memory()
    if free is not None and need > free:
        return None, (f"the model in float64 needs {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB is available; --atol sets "
                      "the tolerance")
    progress("measuring PyTorch's own float32 error (the model in float64)")
    exact = None
    try:
        exact = TorchRunner.from_source(source, dtype=torch.float64)
        with exact:
            return rounding_error(reference, exact, prompts, steps), ""
    except (*MODEL_ERRORS, VQExportError) as e:  # an architecture whose code assumes float32
        cause = e.__cause__ if isinstance(e, VQExportError) and e.__cause__ is not None else e
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return None, f"the model does not run in float64 ({type(cause).__name__}: {first[:160]})"
    finally:
        del exact
        gc.collect()  # transformers' modules hold reference cycles: free the float64 model now, not at some later collection


def _weight_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


def verify_artifact(artifact, steps: int | None = None, model=None, atol: float | None = None, rtol: float | None = None,
                    progress=_noop, prompts=None) -> ParityReport:
    """Re-run parity for a built artifact against the model it was built from (or ``model``), with the tolerances
    it was built with (or ``atol`` / ``rtol`` for this check), on the built-in prompts or ``prompts`` (a list of
    strings, encoded with the model's tokenizer, or of token-id lists)."""
    from .profiles import parse_profile
    from .prompts import given_prompt_ids

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    profile = with_tolerances(parse_profile(manifest["profile"], f"{artifact}/manifest.json", recorded=True), atol, rtol)
    src = manifest["source"]
    if model is None and src["model"] != DEMO_NAME and not Path(src["model"]).exists():
        raise VQExportError(f"{src['model']}: the model this artifact was built from is gone; pass --model DIR")
    source = resolve_source(model if model is not None else src["model"])
    check_profile_fits(profile, source)
    source = for_target(source, profile)
    built = manifest["config"]
    for key in ("vocab_size", "n_layers", "n_kv_heads", "hidden_size", "head_dim"):
        if getattr(source.geometry, key) != built.get(key):
            raise VQExportError(f"{source.path}: {key} = {getattr(source.geometry, key)} but the artifact was built with "
                                f"{key} = {built.get(key)}; pass the model it was built from")
    if model is None and source_record(source)["sha256"] != src["sha256"]:
        raise VQExportError(f"{source.path}: the model changed since the artifact was built; rebuild, or pass --model")
    ids = given_prompt_ids(prompts, source.tokenizer_path, source.geometry.vocab_size) if prompts is not None else None
    ids = check_steps_fit(source, profile, steps, ids, artifact)  # the engine is built: its ranges bound the run
    if prompts is not None:  # the builder's graphs (a shared cache buffer) take the prompts one at a time
        batch = 1 if manifest["runtime"].get("past_present_share_buffer", False) else len(ids)
        check_logits_fit(profile.head_form(source.head.two_stage), batch, max(len(p) for p in ids),
                         source.geometry.vocab_size, f"{artifact}: the prompts given", "give fewer or shorter prompts")
    check_files(artifact, manifest, hashes=True)
    if has_head(artifact):  # the head the artifact was built with, as given to the build
        ours, theirs = read_head_config(artifact).to_dict(), source.head.config.to_dict()
        if ours["type"] != theirs["type"]:
            raise VQExportError(f"{source.path}: its head is a {theirs['type']} head but the artifact's is a {ours['type']} "
                                "head; pass the model it was built from")
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                raise VQExportError(f"{source.path}: its head has {key} = {theirs.get(key)!r} but the artifact's has "
                                    f"{key} = {ours.get(key)!r}; pass the model it was built from")
    return verify_dir(artifact, manifest["runtime"], profile, source, ids, steps=steps, progress=progress)

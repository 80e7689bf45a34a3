"""``build``: checkpoint -> export -> target backend -> parity check -> artifact directory (atomically)."""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .artifact import check_output_dir, sha256_file, staged_dir, write_manifest
from .checkpoint import DEMO_NAME, Checkpoint, demo_dir, resolve_checkpoint
from .errors import ParityError
from .profiles import Profile, load_profile
from .verify import ParityReport


@dataclass
class BuildResult:
    out: Path
    manifest: dict
    parity: ParityReport


def _noop(stage: str) -> None:
    pass


def source_record(ckpt: Checkpoint) -> dict:
    files = {p.name: sha256_file(p) for p in sorted(ckpt.path.iterdir()) if p.is_file() and p.suffix in (".json", ".safetensors")}
    is_demo = ckpt.path.resolve() == demo_dir().resolve()
    return {"model": DEMO_NAME if is_demo else str(ckpt.path.resolve()), "sha256": files}


def fingerprint(source: dict, profile: Profile) -> str:
    blob = json.dumps({"source": source["sha256"], "profile": profile.to_dict(), "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def versions(runtime: dict | None = None) -> dict:
    import onnx
    import onnxruntime
    import torch

    out = {"vqexport": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    if runtime and runtime.get("backend") == "trt":
        out["tensorrt"] = runtime["engine"]["tensorrt"]
    return out


def resolve_profile(target: str | Profile, head: str | None = None) -> Profile:
    """The profile for ``target``, with the head form overridden by ``--head`` if given."""
    profile = target if isinstance(target, Profile) else load_profile(target)
    if head is not None and head != profile.head:
        import dataclasses

        from .errors import VQExportError

        if head not in ("standard", "fused"):
            raise VQExportError(f"--head must be 'standard' or 'fused', got {head!r}")
        profile = dataclasses.replace(profile, head=head, name=f"{profile.name}-{head}",
                                      description=f"{profile.description} (head = {head!r} by --head)")
    return profile


def build(target: str | Profile = "ort", model=None, out=None, force: bool = False, steps: int | None = None,
          head: str | None = None, progress=_noop) -> BuildResult:
    """Build a verified artifact for ``target`` from ``model`` (a checkpoint dir; None = embedded demo).

    Raises VQExportError for bad input (nothing written) and ParityError if the artifact does not match
    PyTorch within the profile's tolerances (nothing written either).
    """
    from .sizes import onnx_sizes

    profile = resolve_profile(target, head)
    check_machine(profile)
    progress("loading checkpoint")
    ckpt = resolve_checkpoint(model)
    out = (Path(out) if out is not None else Path("build") / profile.name).resolve()
    check_profile_fits(profile, ckpt)
    source = source_record(ckpt)
    fp = fingerprint(source, profile)
    check_output_dir(out, fp, force)
    previous_cache = _previous_timing_cache(out) if profile.backend == "trt" else None

    with staged_dir(out) as tmp:
        reference, proto = export_for(profile, ckpt, progress)
        readiness = None
        progress(f"building for {profile.name}")
        if profile.backend == "trt":
            from .backends.trt.builder import build_trt
            from .backends.trt.prepare import prepare_for_trt
            from .backends.trt.readiness import check, enforce

            progress("checking TensorRT readiness")
            graph = prepare_for_trt(proto)  # what TensorRT's parser sees: checked here, built below
            readiness = check(graph, profile, ckpt.config)
            enforce(readiness)
            runtime = build_trt(proto, profile, ckpt, tmp, timing_cache=previous_cache, graph=graph)
        else:
            from .backends.ort.builder import build_ort

            runtime = build_ort(proto, profile, ckpt, tmp)
        progress("verifying parity against PyTorch")
        report = verify_dir(tmp, runtime, profile, ckpt, reference, steps=steps, progress=progress)
        if profile.triton.enabled:
            from .serving.triton import layout

            progress("laying out the Triton model repository")
            runtime = layout(tmp, runtime, proto, profile)
        manifest = {
            "fingerprint": fp,
            "target": profile.name,
            "profile": profile.to_dict(),
            "source": source,
            "config": ckpt.config.to_dict(),
            "opset": profile.opset,
            "versions": versions(runtime),
            "runtime": runtime,
            "sizes": onnx_sizes(proto),
            "parity": report.to_dict(),
        }
        if readiness is not None:
            manifest["readiness"] = readiness.to_dict()
        if not report.passed:
            raise ParityError(f"parity failed for target {profile.name}: {'; '.join(report.failures)}", report)
        progress("writing manifest")
        manifest = write_manifest(tmp, manifest)
    return BuildResult(out=out, manifest=manifest, parity=report)


def check_machine(profile: Profile) -> None:
    """What the target needs from this machine, before anything is exported or written."""
    if profile.backend == "trt":
        from .backends.trt.env import require

        require(f"target {profile.name}")
    else:
        from .backends.ort.session import available_providers

        available_providers(profile.ort.providers)
    if profile.triton.enabled:
        from .serving.triton import model_config_schema

        model_config_schema()


def _previous_timing_cache(out: Path) -> bytes | None:
    """The timing cache of the TensorRT artifact being replaced, so a rebuild reuses its measurements."""
    from .artifact import read_manifest
    from .errors import VQExportError

    try:
        name = read_manifest(out)["runtime"].get("timing_cache")
    except VQExportError:
        return None
    path = out / name if name else None
    return path.read_bytes() if path is not None and path.is_file() else None


def export_for(profile: Profile, ckpt: Checkpoint, progress=_noop):
    """The PyTorch reference model and its ONNX export with the profile's passes applied."""
    from .export import export_onnx
    from .model import from_tensors

    progress("exporting to ONNX")
    reference = from_tensors(ckpt.config, ckpt.tensors)
    return reference, apply_passes(export_onnx(reference, opset=profile.opset), profile, ckpt, progress)


def check_readiness(target: str | Profile, model=None, head: str | None = None, progress=_noop):
    """``build --check-only``: export and apply the profile's passes, then the TensorRT readiness check, on CPU.

    Returns the Readiness report (``passed``, ``reasons``); writes nothing and needs neither TensorRT nor a GPU.
    """
    from .backends.trt.prepare import prepare_for_trt
    from .backends.trt.readiness import check
    from .errors import VQExportError

    profile = resolve_profile(target, head)
    if profile.backend != "trt":
        raise VQExportError(f"--check-only checks TensorRT readiness; target {profile.name} has backend {profile.backend!r}")
    ckpt = resolve_checkpoint(model)
    check_profile_fits(profile, ckpt)
    _, proto = export_for(profile, ckpt, progress)
    progress("checking TensorRT readiness")
    return check(prepare_for_trt(proto), profile, ckpt.config)


def check_profile_fits(profile: Profile, ckpt: Checkpoint) -> None:
    """Reject a profile the checkpoint cannot satisfy before any work starts."""
    from .errors import VQExportError

    if profile.codebook == "int8" and ckpt.config.head.type != "vq":
        raise VQExportError(f"target {profile.name} quantizes the codebook, but {ckpt.path} has a dense head")
    if profile.codebook == "int8" and profile.int8.encoding == "native":
        if profile.head == "fused":
            raise VQExportError(f"target {profile.name}: the native int8 encoding (MatMulNBits) cannot feed a fused VQLogits head; use encoding = 'qdq'")
        if profile.int8.activations:
            raise VQExportError(f"target {profile.name}: int8.activations applies to the QDQ encoding only")
    if profile.backend == "trt":
        from .backends.trt.checks import check_trt_profile

        check_trt_profile(profile, ckpt)
    if profile.head == "fused":
        if ckpt.config.head.type != "vq":
            raise VQExportError(f"target {profile.name} fuses a VQ-Logits head, but {ckpt.path} has a dense head")
        if profile.decode.mode == "topk":
            raise VQExportError(f"target {profile.name}: head = 'fused' outputs logits; it cannot be combined with decode.mode = 'topk'")
        if profile.backend == "ort" and profile.ort.kernel == "extensions":
            if ckpt.config.head.rank:
                raise VQExportError(f"target {profile.name}: the onnxruntime-extensions VQLogits kernel takes the 4-input form only, and "
                                    f"{ckpt.path} has a rank-{ckpt.config.head.rank} correction; use a target with [ort] kernel = \"function\"")
            from .ops.vqlogits import register_ort_kernel

            register_ort_kernel()  # fails clearly if the runtime has no way to provide the kernel
    if profile.decode.mode == "topk":
        if ckpt.config.head.type != "vq":
            raise VQExportError(f"target {profile.name} decodes top-k from the codebook, but {ckpt.path} has a dense head")
        if profile.decode.k > ckpt.config.vocab_size:
            raise VQExportError(f"target {profile.name}: decode.k = {profile.decode.k} exceeds the vocabulary size {ckpt.config.vocab_size}")


def apply_passes(proto, profile: Profile, ckpt: Checkpoint, progress=_noop):
    """The profile's graph passes, in order (each a pure ModelProto -> ModelProto)."""
    if profile.head == "fused":
        from .passes.fuse_head import fuse_head

        progress("fusing the head into one VQLogits node")
        proto = fuse_head(proto, select=profile.select)
    elif profile.select == "gather_elements" and ckpt.config.head.type == "vq":
        from .passes.select_form import use_gather_elements

        proto = use_gather_elements(proto)
    if profile.codebook == "int8" and profile.int8.encoding == "native":
        from .passes.int8_codebook import native_codebook

        progress("quantizing the codebook to int8 (MatMulNBits)")
        proto = native_codebook(proto, accuracy_level=profile.int8.accuracy_level)
    elif profile.codebook == "int8":
        from .passes.int8_codebook import quantize_codebook

        progress("quantizing the codebook to int8")
        scales = {}
        if profile.int8.activations:
            from .passes.calibrate import head_amax

            scales = {k: max(v, 1e-8) / 127.0 for k, v in head_amax(proto, ckpt).items()}
        proto = quantize_codebook(proto, activation_scale=scales.get("hidden"), lowrank_activation_scale=scales.get("lowrank"))
    if profile.decode.last_position_only:
        from .passes.last_position import last_position_only

        proto = last_position_only(proto)
    if profile.decode.mode == "topk":
        from .passes.topk_decode import add_topk_outputs

        progress(f"adding exact top-{profile.decode.k} outputs")
        proto = add_topk_outputs(proto, profile.decode.k, keep_logits=profile.decode.keep_logits)
    if profile.precision == "fp16":
        from .passes.fp16_trunk import fp16_trunk

        progress("casting the trunk to fp16 (head stays fp32)")
        proto = fp16_trunk(proto)
    return proto


def verify_dir(artifact: Path, runtime: dict, profile: Profile, ckpt: Checkpoint, reference=None, steps=None,
               progress=_noop) -> ParityReport:
    """Compare the artifact in ``artifact`` (its runtime section) with the PyTorch reference."""
    from .backends.runners import runner_from_runtime
    from .backends.torch_ref import TorchRunner
    from .model import from_tensors
    from .verify import compare_runners, prompt_ids

    reference = reference if reference is not None else from_tensors(ckpt.config, ckpt.tensors)
    n = profile.parity.steps if steps is None else steps
    prompts = prompt_ids(ckpt.tokenizer_path, ckpt.config.vocab_size)
    pad = ckpt.config.pad_token_id or 0
    if profile.backend == "trt":
        from .backends.trt.shapes import check_fits_run

        check_fits_run(profile.trt, len(prompts), max(len(p) for p in prompts), n, f"target {profile.name} parity check")
    target = runner_from_runtime(Path(artifact) / runtime["model_file"], runtime)
    with TorchRunner(reference) as ref, target as tgt:
        return compare_runners(ref, tgt, prompts, n, profile.parity, target_name=profile.name, pad_id=pad,
                               mapping=ckpt.tensors.get("head.map"),
                               progress=lambda i, total: progress(f"verifying parity: step {i}/{total}"))


def verify_artifact(artifact, steps: int | None = None, model=None, progress=_noop) -> ParityReport:
    """Re-run parity for a built artifact against the checkpoint it was built from (or ``model``)."""
    from .artifact import read_manifest
    from .errors import VQExportError
    from .profiles import parse_profile

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    profile = parse_profile(manifest["profile"], f"{artifact}/manifest.json")
    src = manifest["source"]
    if model is None and src["model"] != DEMO_NAME and not Path(src["model"]).exists():
        raise VQExportError(f"{src['model']}: the checkpoint this artifact was built from is gone; pass --model DIR")
    ckpt = resolve_checkpoint(model if model is not None else src["model"])
    built = manifest["config"]
    for key in ("vocab_size", "n_layers", "n_kv_heads", "d_model", "n_heads"):
        if getattr(ckpt.config, key) != built.get(key):
            raise VQExportError(f"{ckpt.path}: {key} = {getattr(ckpt.config, key)} but the artifact was built with "
                                f"{key} = {built.get(key)}; pass the checkpoint it was built from")
    if model is None:
        now = source_record(ckpt)["sha256"]
        if now != src["sha256"]:
            raise VQExportError(f"{ckpt.path}: checkpoint changed since the artifact was built; rebuild, or pass --model")
    for name, info in manifest["files"].items():
        f = artifact / name
        if not f.is_file() or sha256_file(f) != info["sha256"]:
            raise VQExportError(f"{f}: missing or modified since the build (sha256 mismatch with manifest.json)")
    return verify_dir(artifact, manifest["runtime"], profile, ckpt, steps=steps, progress=progress)

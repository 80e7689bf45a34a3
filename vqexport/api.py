"""The public Python API. The CLI calls these and nothing else.

    from vqexport import api
    result = api.build("ort")                      # embedded demo model -> ./artifacts/ort
    result = api.build("ort", model="my-model")    # a Hugging Face model directory with vq_head.json beside it
    report = api.verify("artifacts/ort", steps=32)
    info   = api.inspect("artifacts/ort/model.onnx")
    gen    = api.generate("artifacts/ort", "def main(", max_new_tokens=16)
"""

from __future__ import annotations

from .bench.head import SHAPES as HEAD_SHAPES
from .build import BuildResult, build, check_readiness, verify_artifact as verify
from .head.spec import Head, HeadConfig, make_head, read_artifact_head, read_head, write_head
from .source import Source, load_source, resolve_source
from .errors import ParityError, VQExportError
from .generate import Generation, generate
from .inspect import inspect_path as inspect
from .profiles import Profile, aliases as target_aliases, bundled_names as target_names, load_profile
from .verify import ParityReport



def bench_head(shapes=tuple(HEAD_SHAPES), threads: int = 2, min_seconds: float = 0.5, progress=None, rank: int = 8) -> dict:
    """Head-only latency of dense / VQ / int8 / top-k variants at batch-1 decode (see vqexport.bench.head)."""
    from .bench.head import run_head_bench

    unknown = [s for s in shapes if s not in HEAD_SHAPES]
    if unknown or not shapes:
        raise VQExportError(f"unknown head shape(s) {', '.join(unknown) or '(none)'}; known: {', '.join(HEAD_SHAPES)}")
    if not 0 <= rank <= 256:
        raise VQExportError(f"--rank must be in [0, 256], got {rank}")
    return run_head_bench(tuple(shapes), threads=threads, min_seconds=min_seconds, progress=progress, rank=rank)


def doctor() -> dict:
    """Which bundled targets this machine can build and run, and why not (see vqexport.doctor)."""
    from .doctor import doctor as run

    return run()


def convert(src, codebook_size: int, out, bias: bool = True, distill_text=None, steps: int | None = None, seed: int = 0,
            clustering: str = "auto", rank: int = 0, head: str = "vq", probes: int | None = None, progress=None):
    """A Hugging Face model directory -> the same model with a VQ-Logits head beside it (see vqexport.convert);
    ``head = "two-stage"``: the codebook routes, the model's own rows rescore the best ``probes`` clusters."""
    from .convert.convert import convert as run

    return run(src, codebook_size, out, bias=bias, distill_text=distill_text, steps=steps, seed=seed,
               clustering=clustering, rank=rank, head=head, probes=probes, progress=progress or (lambda *a: None))


def fidelity(model, text, probes: int | None = None, max_tokens: int | None = None, window: int | None = None, progress=None) -> dict:
    """The head against the dense output layer it replaces, on ``text`` scored in windows of ``window`` tokens (see
    vqexport.convert.fidelity)."""
    from .convert.fidelity import fidelity as run

    return run(model, text, probes=probes, max_tokens=max_tokens, window=window, progress=progress)


def bench_e2e(model=None, shape: str | None = None, target: str = "ort-int4", prompt_len: int = 64, tokens: int = 64,
              repeats: int = 3, work=None, progress=None, head: str = "vq", text=None) -> dict:
    """The artifact against onnxruntime-genai's own dense model of the same trunk, through onnxruntime-genai
    (see vqexport.bench.e2e); ``text``: a file whose first tokens the agreement with the dense model is measured on."""
    from .bench.e2e import run_e2e_bench

    return run_e2e_bench(model=model, shape=shape, target=target, prompt_len=prompt_len, tokens=tokens, repeats=repeats,
                         work=work, progress=progress, head=head, text=text)


def bench_artifact(artifact, vs_dense: bool = False, prompt_len: int = 128, tokens: int = 64, repeats: int = 3,
                   progress=None) -> dict:
    """End-to-end latency of a built artifact (and of its dense-head twin; see vqexport.bench.artifact)."""
    from .bench.artifact import run_artifact_bench

    return run_artifact_bench(artifact, vs_dense=vs_dense, prompt_len=prompt_len, tokens=tokens, repeats=repeats,
                              progress=progress)


__all__ = [
    "BuildResult", "Generation", "Head", "HeadConfig", "ParityError", "ParityReport", "Profile", "Source", "VQExportError",
    "bench_artifact", "bench_e2e", "bench_head", "build", "check_readiness", "convert", "doctor", "fidelity", "generate", "inspect", "load_profile",
    "load_source", "make_head", "read_artifact_head", "read_head", "resolve_source", "target_aliases", "target_names", "verify", "write_head",
]

"""The public Python API. The CLI calls these and nothing else.

    from vqexport import api
    result = api.build("ort")                      # embedded demo model -> ./build/ort
    report = api.verify("build/ort", steps=32)
    info   = api.inspect("build/ort/model.onnx")
    gen    = api.generate("build/ort", "def main(", max_new_tokens=16)
"""

from __future__ import annotations

from .bench.head import SHAPES as HEAD_SHAPES
from .build import BuildResult, build, check_readiness, verify_artifact as verify
from .checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from .errors import ParityError, VQExportError
from .generate import Generation, generate
from .inspect import inspect_path as inspect
from .profiles import Profile, bundled_names as target_names, load_profile
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


def convert(src, codebook_size: int, out, bias: bool = True, distill_text=None, steps: int = 300, seed: int = 0,
            clustering: str = "auto", rank: int = 0, finetune_trunk: bool = False, progress=None):
    """Dense-head checkpoint -> VQ-Logits checkpoint, optionally with a rank-r correction (see vqexport.convert)."""
    from .convert import convert as run

    return run(src, codebook_size, out, bias=bias, distill_text=distill_text, steps=steps, seed=seed,
               clustering=clustering, rank=rank, finetune_trunk=finetune_trunk, progress=progress or (lambda *a: None))


def bench_artifact(artifact, vs_dense: bool = False, prompt_len: int = 128, tokens: int = 64, repeats: int = 3,
                   progress=None) -> dict:
    """End-to-end latency of a built artifact (and of its dense-head twin; see vqexport.bench.artifact)."""
    from .bench.artifact import run_artifact_bench

    return run_artifact_bench(artifact, vs_dense=vs_dense, prompt_len=prompt_len, tokens=tokens, repeats=repeats,
                              progress=progress)


__all__ = [
    "BuildResult", "Checkpoint", "Generation", "ParityError", "ParityReport", "Profile", "VQExportError",
    "bench_artifact", "bench_head", "build", "check_readiness", "convert", "doctor", "generate", "inspect", "load_checkpoint", "load_profile", "resolve_checkpoint", "target_names", "verify",
]

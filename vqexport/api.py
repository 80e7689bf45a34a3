"""The public Python API. The CLI calls these and nothing else.

    from vqexport import api
    result = api.build("ort")                      # embedded demo model -> ./build/ort
    report = api.verify("build/ort", steps=32)
    info   = api.inspect("build/ort/model.onnx")
    gen    = api.generate("build/ort", "def main(", max_new_tokens=16)
"""

from __future__ import annotations

from .build import BuildResult, build, verify_artifact as verify
from .checkpoint import Checkpoint, load_checkpoint, resolve_checkpoint
from .errors import ParityError, VQExportError
from .generate import Generation, generate
from .inspect import inspect_path as inspect
from .profiles import Profile, bundled_names as target_names, load_profile
from .verify import ParityReport

__all__ = [
    "BuildResult", "Checkpoint", "Generation", "ParityError", "ParityReport", "Profile", "VQExportError",
    "build", "generate", "inspect", "load_checkpoint", "load_profile", "resolve_checkpoint", "target_names", "verify",
]

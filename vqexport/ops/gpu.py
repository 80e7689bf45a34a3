"""Where the GPU kernels of the heads live: ops/vqlogits/gpu/ (installed as ``vqexport._ops_gpu``).

Imported lazily: it needs torch with CUDA and Triton, which only GPU machines have (or Triton's interpreter, on CPU
tensors: the tests).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from ..errors import VQExportError

_MODULE = "vqexport._ops_gpu.vqlogits_triton"


def source_path() -> Path:
    return Path(__file__).resolve().parents[2] / "ops" / "vqlogits" / "gpu" / "vqlogits_triton.py"


def load_kernel():
    """The Triton kernel module (``vq_logits`` and ``two_stage_logits``, and their plain-torch forms
    ``torch_reference`` and ``two_stage_reference``); a clear error when it cannot run here."""
    missing = [m for m in ("torch", "triton") if importlib.util.find_spec(m) is None]
    if missing:
        raise VQExportError(f"the GPU kernels of the heads need {' and '.join(missing)} (pip install triton; a CUDA build of torch)")
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    if importlib.util.find_spec("vqexport._ops_gpu") is not None:
        return importlib.import_module(_MODULE)
    path = source_path()
    if not path.is_file():
        raise VQExportError(f"the GPU kernels of the heads are missing ({path}); reinstall vqexport")
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module
    spec.loader.exec_module(module)
    return module

"""ONNX Runtime session options from a profile (shared by build, runner, generate). No torch."""

from __future__ import annotations

from ...errors import VQExportError

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


def graph_level(name: str):
    import onnxruntime as ort

    attr = _LEVELS[name]
    if not hasattr(ort.GraphOptimizationLevel, attr):  # older onnxruntime has no LAYOUT level
        attr = "ORT_ENABLE_ALL"
    return getattr(ort.GraphOptimizationLevel, attr)


def session_options(level: str, threads: int = 0, config: dict | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = graph_level(level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    for k, v in sorted((config or {}).items()):
        so.add_session_config_entry(k, str(v))
    return so


def available_providers(requested) -> list[str]:
    import onnxruntime as ort

    have = ort.get_available_providers()
    missing = [p for p in requested if p not in have]
    if missing:
        raise VQExportError(
            f"onnxruntime here lacks execution provider(s) {', '.join(missing)} (available: {', '.join(have)})"
        )
    return list(requested)


def create_session(model, so, providers):
    """An InferenceSession; a model or setting onnxruntime refuses is a one-line error, not a traceback."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, so, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail / InvalidArgument / InvalidGraph types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VQExportError(f"onnxruntime could not load the model with these settings: {msg[:300]}") from None

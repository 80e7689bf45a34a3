"""Trunk graph + head graph -> one decoder graph, written as ``model.onnx`` + ``model.onnx.data``.

The trunk's output ``hidden_states`` stays inside the joined graph as the head's input; the graph's outputs become
the head's outputs (``logits`` or the top-k outputs) followed by ``present.*``. Weights always go to external data
(one file beside the graph, tensors of 1 KiB and more): a real model's fp32 graph does not fit one 2 GB protobuf,
and one layout for every size keeps the artifact the same whatever the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from . import __version__
from .errors import VQExportError
from .graph_io import HEAD_NODE_PREFIX, HEAD_PREFIX, HIDDEN
from .head.graph import HeadForm, build_head
from .head.spec import Head

MODEL_FILE = "model.onnx"
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors (shapes, axes, scales) stay inside the graph


def join(trunk: ir.Model, head: Head, form: HeadForm, scales: dict[str, float] | None = None,
         metadata: dict[str, str] | None = None, rows=None, rows_bias=None, tied: bool = False,
         softcap: float | None = None) -> ir.Model:
    """Attach ``head`` in ``form`` to ``trunk``'s hidden state (in place); return the joined model. A two-stage head
    reads its exact rows from the trunk's embedding table when the model is ``tied``, else from ``rows``; a model
    with ``final_logit_softcapping`` (``softcap``) gets its logits capped the same way."""
    g = trunk.graph
    hidden = next((v for v in g.outputs if v.name == HIDDEN), None)
    if hidden is None:
        raise VQExportError(f"the trunk graph has no {HIDDEN!r} output to attach the head to")
    built = build_head(g, hidden, head, form, scales, rows=rows, rows_bias=rows_bias, tied=tied, softcap=softcap)
    presents = [v for v in g.outputs if v.name.startswith("present.")]
    g.outputs.clear()
    g.outputs.extend([*built.outputs.values(), *presents])
    for domain, version in built.domains.items():
        g.opset_imports.setdefault(domain, version)
        trunk.opset_imports.setdefault(domain, version)
    for fn in built.functions:
        trunk.functions[fn.identifier()] = fn
    trunk.producer_name = "vqexport"
    trunk.producer_version = __version__
    trunk.metadata_props.clear()
    trunk.metadata_props.update({"vqexport.head": json.dumps(head.config.to_dict(), sort_keys=True), **(metadata or {})})
    return trunk


def detach_head(model: ir.Model) -> ir.Model:
    """The trunk of a joined model (head nodes and initializers removed, ``hidden_states`` an output again)."""
    g = model.graph
    hidden = next((v for n in g for v in n.outputs if v.name == HIDDEN), None)
    if hidden is None:
        raise VQExportError(f"this graph has no {HIDDEN!r} value: not a vqexport decoder")
    presents = [v for v in g.outputs if v.name.startswith("present.")]
    g.outputs.clear()
    g.outputs.extend([hidden, *presents])
    for node in reversed([n for n in g if (n.name or "").startswith(HEAD_NODE_PREFIX)]):
        g.remove(node, safe=False)
    for name in [n for n in g.initializers if n.startswith(HEAD_PREFIX) or n.startswith(HEAD_NODE_PREFIX)]:
        del g.initializers[name]
    model.functions.clear()
    return model


def save(model: ir.Model, directory: Path, name: str = MODEL_FILE) -> list[str]:
    """Write ``name`` + ``name.data`` into ``directory``; return the file names written."""
    directory = Path(directory)
    data = f"{name}.data"
    ir.save(model, directory / name, external_data=data, size_threshold_bytes=EXTERNAL_THRESHOLD, max_workers=1)
    return [name] + ([data] if (directory / data).exists() else [])


def check(directory: Path, name: str = MODEL_FILE) -> None:
    """ONNX's own checker on the saved graph (external data stays on disk)."""
    import onnx

    try:
        onnx.checker.check_model(str(Path(directory) / name), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise RuntimeError(f"the joined graph is not valid ONNX: {str(e).splitlines()[0]}") from e

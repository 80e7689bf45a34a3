"""The dense twin of an OpenVINO artifact, made from its IR (``bench --artifact --vs-dense``): the IR's own trunk, as
built and compressed, with the head replaced by one V x d output layer computing what the dense model computes.

* A standard VQ head's twin: W[v] = C[M[v]] (+ U[v] P) and the head's bias, fp32, compressed by NNCF as the build
  compressed the artifact (``weights``): NNCF leaves the trunk's already compressed weights as they are, and gives
  the new layer what it gives a dense model's last MatMul.
* A two-stage head's twin: the model's own output layer, the rows its stage 2 reads (the trunk's embedding table
  when tied, as the IR holds it, compressed or not; else the artifact's copy) and their bias.

The model's soft cap applies to the twin's logits as to the artifact's, and an artifact whose head gives the last
position's logits only gets a twin that does the same."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import VQExportError
from ...graph_io import HIDDEN
from ...head.graph import DENSE_MATMUL, EXACT_BIAS, EXACT_BIAS_ADD, EXACT_ROWS, dense_weight_t
from .builder import compress, quiet_logs
from .env import error_line, require_nncf, require_openvino


def _find_output(model, name: str, what: str):
    port = next((o for op in model.get_ordered_ops() for o in op.outputs() if name in o.get_names()), None)
    if port is None:
        raise VQExportError(f"{what}: the IR has no {name!r} value: not a vqexport decoder")
    return port


def _op(model, name: str):
    return next((op for op in model.get_ordered_ops() if op.get_friendly_name() == name), None)


def layer_bytes(model) -> int:
    """The bytes of the twin's output layer as stored: the constants its MatMul reads its weights from (through a
    decompression's Convert / Subtract / Multiply)."""
    seen, todo, total = set(), [_op(model, DENSE_MATMUL).input_value(1).get_node()], 0
    while todo:
        node = todo.pop()
        if node.get_friendly_name() in seen:
            continue
        seen.add(node.get_friendly_name())
        if node.get_type_name() == "Constant":
            total += node.get_byte_size()
        else:
            todo.extend(i.get_node() for i in node.input_values())
    return total


def _dense_layer(model, head, ops, what: str):
    """The twin's weight (an output of the IR, or a new constant), whether the MatMul transposes it, and its bias."""
    if not head.two_stage:
        bias = ops.constant(head.bias.astype(np.float32)).output(0) if head.bias is not None else None
        return ops.constant(dense_weight_t(head)).output(0), False, bias
    rows = _op(model, EXACT_ROWS)  # the model's own output layer: what stage 2 reads its rows from
    if rows is None or rows.get_type_name() != "Gather":
        raise VQExportError(f"{what}: the IR's two-stage head reads its rows as quantized codes, not as a table "
                            "to make the dense layer of (build with [two_stage] rows = \"shared\" or \"fp32\")")
    found = _op(model, EXACT_BIAS)
    if found is None and _op(model, EXACT_BIAS_ADD) is not None:
        raise VQExportError(f"{what}: the IR adds a bias to its exact logits but its lookup ({EXACT_BIAS!r}) is not "
                            "found")
    return rows.input_value(0), True, found.input_value(0) if found is not None else None


def dense_twin_ir(artifact: Path, runtime: dict, head, softcap: float | None, last_position_only: bool,
                  out: Path) -> tuple[Path, int]:
    """``out``/dense.xml (+ .bin): the artifact's IR with its head replaced by the dense output layer, for the last
    position only when the artifact's head computes only that (``last_position_only``, the recorded profile's);
    returns the path and the output layer's bytes as stored."""
    what = f"{artifact}: the dense twin"
    ov = require_openvino(what)
    from openvino import opset13 as ops

    weights = runtime.get("weights", "fp32")
    try:
        model = ov.Core().read_model(str(artifact / runtime["model_file"]))
        h = _find_output(model, HIDDEN, what)
        if last_position_only:
            h = ops.slice(h, *(np.array([v], np.int64) for v in (-1, np.iinfo(np.int64).max, 1, 1))).output(0)
        weight, transpose, bias = _dense_layer(model, head, ops, what)
        logits = ops.matmul(h, weight, False, transpose)
        logits.set_friendly_name(DENSE_MATMUL)
        if bias is not None:
            logits = ops.add(logits, bias)
        if softcap:
            cap = np.float32(softcap)
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        logits.output(0).set_names({"logits"})
        results = model.get_results()
        is_logits = ["logits" in r.input_value(0).get_names() for r in results]
        if sum(is_logits) != 1:
            raise VQExportError(f"{what}: the IR has {sum(is_logits)} outputs named 'logits', not one: not a vqexport decoder")
        results = [ops.result(logits) if replace else r for r, replace in zip(results, is_logits)]
        twin = ov.Model(results, model.get_parameters(), "dense_twin")
        with quiet_logs():
            if weights != "fp32" and not head.two_stage:  # the new layer only: the trunk's weights are compressed
                twin = compress(require_nncf(what), twin, weights, what)
            ov.save_model(twin, str(out / "dense.xml"), compress_to_fp16=False)
        return out / "dense.xml", layer_bytes(twin)
    except VQExportError:
        raise
    except Exception as e:  # OpenVINO's or NNCF's own errors
        raise VQExportError(f"{what}: OpenVINO could not make it ({error_line(e)})") from None

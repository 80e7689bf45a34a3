"""The portable trunk: torch.onnx (dynamo) of transformers' decoder, standard ops, any runtime.

    inputs   input_ids [batch_size, sequence_length] int64
             attention_mask [batch_size, total_sequence_length] int64
             past_key_values.{i}.key|value [batch_size, n_kv_heads, past_sequence_length, head_dim] float32
                                           (i: each layer that keeps keys and values, of its own shape: kv_shapes)
    outputs  hidden_states [batch_size, sequence_length, hidden] float32   (the final, normed hidden state, times the
                                                                            model's logit scale: Trunk.hidden_scale)
             present.{i}.key|value [batch_size, n_kv_heads, total_sequence_length, head_dim] float32

Initializers keep the checkpoint's parameter names (``model.layers.0.self_attn.q_proj.weight``). The result is an
onnx_ir model, so no 2 GB protobuf limit applies before it is saved with external data.
"""

from __future__ import annotations

import re

import onnx_ir as ir
import torch

from ..errors import VQExportError
from ..graph_io import BATCH, HIDDEN, PAST, SEQ, TOTAL, cache_names
from ..source import Source
from .experts import TRANSLATIONS as EXPERTS
from .experts import expand_routed_experts, exportable_experts
from .hf import Trunk, quiet

DEFAULT_OPSET = 18
# torch.export's symbol names -> the graph's axis names.
_DIM_NAMES = {"batch": BATCH, "sequence": SEQ, "past_sequence": PAST, "total_sequence": TOTAL,
              "past_sequence + sequence": TOTAL, "sequence + past_sequence": TOTAL}


def export_trunk(trunk: Trunk, source: Source, opset: int = DEFAULT_OPSET) -> ir.Model:
    """torch.onnx export of ``trunk`` (transformers' decoder of ``source``) with the graph contract above."""
    from torch.export import Dim

    geo = source.geometry
    b, s, p = 2, 3, 5  # all >= 2 and pairwise different, so the tracer neither specialises nor conflates axes
    ids = torch.arange(b * s, dtype=torch.int64).reshape(b, s) % geo.vocab_size
    mask = torch.ones(b, p + s, dtype=torch.int64)
    past = trunk.empty_past(b, p)
    batch, seq, past_len, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in past))
    past_names, present_names = cache_names(trunk.n_layers)
    try:
        with quiet(), torch.no_grad(), exportable_experts(trunk.decoder, source.path) as experts:
            program = torch.onnx.export(trunk, (ids, mask, *past), dynamic_shapes=dynamic_shapes,
                                        input_names=["input_ids", "attention_mask", *past_names],
                                        output_names=[HIDDEN, *present_names], opset_version=opset, dynamo=True,
                                        optimize=True, verbose=False, custom_translation_table={**TRANSLATIONS, **EXPERTS})
    except VQExportError:
        raise
    except Exception as e:  # torch.export / torch.onnx raise many types
        raise VQExportError(f"{source.path}: torch.onnx cannot export the {geo.model_type} decoder "
                            f"({export_failure(e)[:240]})") from None
    model = program.model
    try:
        with quiet():
            expand_routed_experts(model, experts, trunk.decoder_name, opset)
    except VQExportError as e:
        raise VQExportError(f"{source.path}: {e}") from None
    except Exception as e:
        raise VQExportError(f"{source.path}: the {geo.model_type} decoder's experts layers cannot be exported "
                            f"({export_failure(e)[:240]})") from None
    canonicalize(model)
    return model


# M. Giles, "Approximating the erfinv function" (GPU Computing Gems, 2010): single precision, a polynomial in
# w = -log(1 - x^2) - 2.5 where w < 5, else in sqrt(w) - 3; highest power first.
_ERFINV_CENTRAL = (2.81022636e-08, 3.43273939e-07, -3.5233877e-06, -4.39150654e-06, 2.1858087e-04, -1.25372503e-03,
                   -4.17768164e-03, 2.46640727e-01, 1.50140941)
_ERFINV_TAIL = (-2.00214257e-04, 1.00950558e-04, 1.34934322e-03, -3.67342844e-03, 5.73950773e-03, -7.6224613e-03,
                9.43887047e-03, 1.00167406, 2.83297682)


def _erfinv(x):
    """erfinv(x) in standard ops (ONNX has no Erfinv), computed in float32 whatever x's type: relative error about
    1e-7, and +-inf at +-1. Gemma 3n's activation sparsity takes the normal quantile of a constant through it, so the
    exporter's optimizer folds it to that constant."""
    from onnxscript import opset18 as op

    def const(v):
        return op.Constant(value_float=v)

    def horner(coefficients, t):
        p = const(coefficients[0])
        for c in coefficients[1:]:
            p = op.Add(op.Mul(p, t), const(c))
        return p

    x32 = op.Cast(x, to=1)  # FLOAT
    w = op.Neg(op.Log(op.Mul(op.Sub(const(1.0), x32), op.Add(const(1.0), x32))))
    central = horner(_ERFINV_CENTRAL, op.Sub(w, const(2.5)))
    tail = horner(_ERFINV_TAIL, op.Sub(op.Sqrt(w), const(3.0)))
    y = op.Mul(op.Where(op.Less(w, const(5.0)), central, tail), x32)
    y = op.Where(op.Equal(op.Abs(x32), const(1.0)), op.Mul(x32, const(float("inf"))), y)
    return op.CastLike(y, x)


TRANSLATIONS = {torch.ops.aten.erfinv.default: _erfinv, torch.ops.prims.erf_inv.default: _erfinv}

ANSI = re.compile(r"\x1b\[[0-9;]*m")
SUMMARY = re.compile(r"<class '(?:[\w.]+\.)?(\w+)'>: (.+)")


def export_failure(e: Exception) -> str:
    """What stopped torch.onnx, in one line: the first exception of its "## Exception summary" (the op it has no
    ONNX function for, ...) rather than its first line, which names only the step and what to do next."""
    lines = [ln.strip() for ln in ANSI.sub("", str(e)).splitlines() if ln.strip()]
    if "## Exception summary" in lines:
        cause = next((SUMMARY.match(ln) for ln in lines[lines.index("## Exception summary") + 1:] if SUMMARY.match(ln)), None)
        if cause is not None:
            return f"{cause[1]}: {cause[2]}"
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def canonicalize(model: ir.Model) -> None:
    """Stable and readable: no source paths or exporter metadata, named dynamic axes."""
    model.doc_string = None
    model.metadata_props.clear()
    g = model.graph
    g.name = "vqexport_decoder"
    g.doc_string = None
    g.metadata_props.clear()
    for node in g.all_nodes():
        node.doc_string = None
        node.metadata_props.clear()
        for v in node.outputs:
            _rename_dims(v)
            v.metadata_props.clear()
            v.doc_string = None
    for v in [*g.inputs, *g.outputs, *g.initializers.values()]:
        _rename_dims(v)
        v.metadata_props.clear()
        v.doc_string = None


def _rename_dims(v: ir.Value) -> None:
    if v.shape is None:
        return
    dims = [ir.SymbolicDim(_DIM_NAMES.get(d.value, d.value)) if isinstance(d, ir.SymbolicDim) else d for d in v.shape]
    if dims != list(v.shape):
        v.shape = ir.Shape(dims)


def memo_key(source: Source, opset: int) -> tuple:
    """What an exported trunk depends on: the model's config and weights (by name, size and mtime) and the opset;
    not the head beside them."""
    files = [source.path / "config.json", *source.weight_files]
    return (opset, tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))

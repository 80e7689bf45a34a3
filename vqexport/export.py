"""PyTorch reference model -> one ONNX decoder graph (prefill and decode, KV cache), standard ops only.

The graph follows the names Optimum and onnxruntime-genai use:

    inputs   input_ids [batch_size, sequence_length] int64
             attention_mask [batch_size, total_sequence_length] int64
             past_key_values.{i}.key|value [batch_size, n_kv_heads, past_sequence_length, head_dim] float32
    outputs  logits [batch_size, sequence_length, vocab] float32
             present.{i}.key|value [batch_size, n_kv_heads, total_sequence_length, head_dim] float32

and its head is ``Add(Gather(MatMul(h, head.codebook_t), head.map, axis=-1), head.bias)``; with a rank-r
correction that sum gets ``+ MatMul(MatMul(h, head.lowrank_p_t), head.lowrank_u_t)``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from . import __version__
from .graph import BATCH, PAST, SEQ, TOTAL, cache_names, check_dynamic_axes, find_head, rename_tensors
from .model import VQLogitsLM

DEFAULT_OPSET = 18
MIN_OPSET = 18

# torch.export's symbol names -> the graph's axis names.
_DIM_NAMES = {"batch": BATCH, "sequence": SEQ, "past_sequence": PAST, "total_sequence": TOTAL,
              "past_sequence + sequence": TOTAL, "sequence + past_sequence": TOTAL}


class _Decoder(torch.nn.Module):
    """Flat signature for the exporter: (input_ids, attention_mask, *past_key_values)."""

    def __init__(self, model: VQLogitsLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, *past_key_values):
        return self.model(input_ids, attention_mask, *past_key_values)


def export_onnx(model: VQLogitsLM, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export ``model`` (float32, eval) to a validated, canonical ONNX ModelProto."""
    from torch.export import Dim

    cfg = model.cfg
    model = model.eval()
    # Sample sizes: all >= 2 and pairwise different, so the tracer cannot specialise or conflate axes.
    b, s, p = 2, 3, 5
    ids = torch.arange(b * s, dtype=torch.int64).reshape(b, s) % cfg.vocab_size
    mask = torch.ones(b, p + s, dtype=torch.int64)
    past = tuple(torch.zeros(b, cfg.n_kv_heads, p, cfg.head_dim) for _ in range(2 * cfg.n_layers))
    batch, seq, past_len, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    dynamic_shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in past))
    past_names, present_names = cache_names(cfg.n_layers)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _quiet_torch_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _Decoder(model),
            (ids, mask, *past),
            dynamic_shapes=dynamic_shapes,
            input_names=["input_ids", "attention_mask", *past_names],
            output_names=["logits", *present_names],
            opset_version=opset,
            dynamo=True,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    canonicalize(proto, cfg)
    check_dynamic_axes(proto)
    onnx.checker.check_model(proto, full_check=True)
    return proto


@contextlib.contextmanager
def _quiet_torch_logs():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def canonicalize(proto: onnx.ModelProto, cfg) -> None:
    """Make the graph stable and readable: no source paths, documented names, int32 map, named axes."""
    proto.producer_name = "vqexport"
    proto.producer_version = __version__
    proto.doc_string = ""
    del proto.metadata_props[:]
    g = proto.graph
    g.name = "vqexport_decoder"
    g.doc_string = ""
    for node in g.node:
        node.doc_string = ""
        del node.metadata_props[:]
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        del vi.metadata_props[:]
        vi.doc_string = ""
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param in _DIM_NAMES:
                d.dim_param = _DIM_NAMES[d.dim_param]
    for t in g.initializer:
        del t.metadata_props[:]
        t.doc_string = ""

    renames = {t.name: t.name.removeprefix("model.") for t in g.initializer if t.name.startswith("model.")}
    head = find_head(proto)
    renames[head.matmul.input[1]] = "head.codebook_t" if head.kind == "vq" else "head.weight_t"
    if head.gather is not None:
        renames[head.gather.input[1]] = "head.map"
    if head.add is not None:
        bias = [i for i in head.add.input if i in {t.name for t in g.initializer}]
        if bias:
            renames[bias[0]] = "head.bias"
    if head.lowrank is not None:
        renames[head.lowrank.p.input[1]] = "head.lowrank_p_t"
        renames[head.lowrank.u.input[1]] = "head.lowrank_u_t"
    rename_tensors(proto, renames)
    if head.gather is not None:
        for t in g.initializer:
            if t.name == "head.map" and t.data_type != onnx.TensorProto.INT32:
                t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.int32), "head.map"))
        keep = [vi for vi in g.value_info if vi.name != "head.map"]
        del g.value_info[:]
        g.value_info.extend(keep)
    proto.metadata_props.add(key="vqexport.head", value=cfg.head.type)
    proto.metadata_props.add(key="vqexport.config", value=cfg.to_json().replace("\n", " "))

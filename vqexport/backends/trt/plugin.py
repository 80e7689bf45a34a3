"""The fused VQLogits op as TensorRT plugins, written with TensorRT's Python plugin API (``tensorrt.plugin``).

    vqexport::VQLogits         (hidden, codebook_t, map, bias) -> logits
    vqexport::VQLogitsLowRank  (hidden, codebook_t, map, bias, lowrank_p_t, lowrank_u_t) -> logits

TensorRT's ONNX parser finds them by the node's op type and its ``plugin_namespace`` attribute (see prepare.py).
Each runs the Triton kernel in ops/vqlogits/gpu on TensorRT's stream, reading and writing TensorRT's buffers in
place. fp32 in and out, int32 map, linear layout. These are JIT plugins: the process that runs the engine must
call ``register()`` before deserializing it (TrtRunner does).

No ``from __future__ import annotations`` here: tensorrt.plugin reads the decorated functions' type hints, which
must be real objects, not strings naming locals of ``register()``.
"""

from typing import List, Tuple

from .prepare import LOWRANK_OP_TYPE
from ...ops.vqlogits import OP_TYPE, PLUGIN_NAMESPACE

_done: list = []


def plugin_ids() -> Tuple[str, str]:
    return f"{PLUGIN_NAMESPACE}::{OP_TYPE}", f"{PLUGIN_NAMESPACE}::{LOWRANK_OP_TYPE}"


def register() -> None:
    """Register both plugins with TensorRT (once per process)."""
    if _done:
        return
    import tensorrt as trt
    import tensorrt.plugin as trtp
    import torch

    from ...ops.gpu import load_kernel

    kernel = load_kernel()
    base_id, lowrank_id = plugin_ids()

    def logits_desc(hidden, mapping):
        dims = [hidden.shape_expr[i] for i in range(len(hidden.shape_expr) - 1)]
        return trtp.from_shape_expr(tuple(dims) + (mapping.shape_expr[0],), dtype=trt.float32)

    def run(inputs, out, stream):
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            t = [torch.as_tensor(x, device="cuda") for x in inputs]
            kernel.vq_logits(*t, out=torch.as_tensor(out, device="cuda"))

    @trtp.register(base_id)
    def _desc(hidden: trtp.TensorDesc, codebook_t: trtp.TensorDesc, mapping: trtp.TensorDesc,
              bias: trtp.TensorDesc) -> trtp.TensorDesc:
        return logits_desc(hidden, mapping)

    @trtp.autotune(base_id)
    def _tune(hidden: trtp.TensorDesc, codebook_t: trtp.TensorDesc, mapping: trtp.TensorDesc, bias: trtp.TensorDesc,
              outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, INT32, FP32, FP32", "LINEAR")]

    @trtp.impl(base_id)
    def _impl(hidden: trtp.Tensor, codebook_t: trtp.Tensor, mapping: trtp.Tensor, bias: trtp.Tensor,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
        run((hidden, codebook_t, mapping, bias), outputs[0], stream)

    @trtp.register(lowrank_id)
    def _desc_lr(hidden: trtp.TensorDesc, codebook_t: trtp.TensorDesc, mapping: trtp.TensorDesc, bias: trtp.TensorDesc,
                 lowrank_p_t: trtp.TensorDesc, lowrank_u_t: trtp.TensorDesc) -> trtp.TensorDesc:
        return logits_desc(hidden, mapping)

    @trtp.autotune(lowrank_id)
    def _tune_lr(hidden: trtp.TensorDesc, codebook_t: trtp.TensorDesc, mapping: trtp.TensorDesc, bias: trtp.TensorDesc,
                 lowrank_p_t: trtp.TensorDesc, lowrank_u_t: trtp.TensorDesc, outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination("FP32, FP32, INT32, FP32, FP32, FP32, FP32", "LINEAR")]

    @trtp.impl(lowrank_id)
    def _impl_lr(hidden: trtp.Tensor, codebook_t: trtp.Tensor, mapping: trtp.Tensor, bias: trtp.Tensor,
                 lowrank_p_t: trtp.Tensor, lowrank_u_t: trtp.Tensor, outputs: Tuple[trtp.Tensor], stream: int) -> None:
        run((hidden, codebook_t, mapping, bias, lowrank_p_t, lowrank_u_t), outputs[0], stream)

    _done.append(True)

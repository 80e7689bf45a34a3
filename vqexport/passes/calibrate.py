"""Calibration: the largest |activation| entering the head's MatMuls (hidden state, rank-r projection), over the
verify prompts, with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import find_head


def head_amax(proto: onnx.ModelProto, ckpt) -> dict[str, float]:
    """{"hidden": max |h|} and, with a rank-r correction, {"lowrank": max |h·Pᵀ|} over the verify prompts."""
    import onnxruntime as ort

    from ..backends.ort.session import session_options
    from ..graph import cache_names
    from ..verify import left_pad, prompt_ids

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    head = find_head(probe)
    h = head.matmul.input[0]
    probe.graph.output.add().name = h
    names = {"hidden": h}
    if head.lowrank is not None:
        names["lowrank"] = head.lowrank.p.output[0]
        probe.graph.output.add().name = names["lowrank"]
    sess = ort.InferenceSession(probe.SerializeToString(), session_options("basic"), providers=["CPUExecutionProvider"])
    ids, mask = left_pad(prompt_ids(ckpt.tokenizer_path, ckpt.config.vocab_size))
    cfg = ckpt.config
    past = np.zeros((ids.shape[0], cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, **{n: past for n in cache_names(cfg.n_layers)[0]}}
    values = sess.run(list(names.values()), feeds)
    keep = mask.astype(bool)
    return {key: float(np.abs(v[keep]).max()) for key, v in zip(names, values)}

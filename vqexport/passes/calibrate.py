"""Calibration: the largest |hidden state| entering the head, over the verify prompts, with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx

from ..graph import find_head


def hidden_amax(proto: onnx.ModelProto, ckpt) -> float:
    import onnxruntime as ort

    from ..backends.ort.session import session_options
    from ..graph import cache_names
    from ..verify import left_pad, prompt_ids

    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    h = find_head(probe).matmul.input[0]
    probe.graph.output.add().name = h
    sess = ort.InferenceSession(probe.SerializeToString(), session_options("basic"), providers=["CPUExecutionProvider"])
    ids, mask = left_pad(prompt_ids(ckpt.tokenizer_path, ckpt.config.vocab_size))
    cfg = ckpt.config
    past = np.zeros((ids.shape[0], cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    feeds = {"input_ids": ids, "attention_mask": mask, **{n: past for n in cache_names(cfg.n_layers)[0]}}
    hidden = sess.run([h], feeds)[0]
    return float(np.abs(hidden[mask.astype(bool)]).max())

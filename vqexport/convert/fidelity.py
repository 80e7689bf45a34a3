"""``fidelity``: how close a model's VQ-Logits head is to the dense output layer it replaces, on a given text.

Both heads read the same hidden states (transformers' model of the directory); reported: perplexity of each,
its change, top-1 agreement, KL(dense || head) per token, and for a two-stage head the share of positions whose
dense argmax fell inside the probed clusters (probes: the head's own, or ``probes``) and the perplexity change and
top-1 agreement it would have with ideal routing (the P clusters holding the most dense probability probed): about
how much of the loss its router causes and how much its tail does. The text is scored in windows of ``window``
tokens, each from an empty cache (128 by default, the windows ``convert`` measures on; a longer window gives a
model the context it is used with, up to its maximum positions). The figures are also broken down by the dense
distribution's entropy at each position (``by_dense_entropy``: bands of 1 nat up to 5, then the rest).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..errors import VQExportError
from ..head.spec import check_probes
from ..source import resolve_source
from .convert import SEQ, _Hidden, _read_tokens, evaluate


def fidelity(model, text, probes: int | None = None, max_tokens: int | None = None, window: int | None = None, progress=None) -> dict:
    from ..head.module import DenseHead, head_module
    from ..trunk.hf import load_causal_lm, make_trunk, output_bias, output_weight

    window = SEQ if window is None else window
    source = resolve_source(model)
    if source.tokenizer_path is None:
        raise VQExportError(f"{source.path}: fidelity tokenizes the text with the model's tokenizer.json, and there is none")
    if not 2 <= window <= source.geometry.max_position:
        raise VQExportError(f"--window must be in [2, the model's maximum positions {source.geometry.max_position}], got {window}")
    if max_tokens is not None and max_tokens < 1:
        raise VQExportError(f"--max-tokens must be at least 1, got {max_tokens}")
    head = source.head
    if probes is not None:
        if not head.two_stage:
            raise VQExportError("--probes applies to a two-stage head; this model's head is a plain VQ head")
        probes = check_probes(probes, head.config.codebook_size)
        head = dataclasses.replace(head, config=dataclasses.replace(head.config, probes=probes))
    ids = _read_tokens(Path(text), source.tokenizer_path, "scoring", min_tokens=window + 1)
    if max_tokens is not None:
        ids = ids[: max(max_tokens, window) + 1]  # at least one window
    if progress is not None:
        progress(f"loading the {source.model_type} model with transformers")
    model_ = load_causal_lm(source)
    for p in model_.parameters():
        p.requires_grad_(False)
    trunk = make_trunk(source, model_)
    hidden = _Hidden(trunk, source.geometry)
    weight, bias = output_weight(model_).detach().float(), output_bias(model_, trunk.hidden_scale)
    def scored(done: int, total: int) -> None:
        if progress is not None:
            progress(f"scoring {total:,} tokens with both heads: {done:,} done")

    with torch.no_grad():
        dense = DenseHead(weight, bias, source.geometry.logit_softcap)
        report = evaluate(hidden, dense, head_module(head, weight, bias), torch.from_numpy(ids), ideal=True, seq=window,
                          by_entropy=True, progress=scored)
    return {"model": str(source.path), "head": head.config.to_dict(), "text": str(text), "window": window, **report}

"""Greedy generation with onnxruntime alone: the minimal "embed the artifact in an app" path.

Imports numpy, onnxruntime and tokenizers only (never torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import read_manifest
from .backends.ort.runner import OrtRunner
from .errors import VQExportError


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    stopped_at_eos: bool


def generate(artifact, prompt: str, max_new_tokens: int = 32, on_token=None) -> Generation:
    """Greedy-decode up to ``max_new_tokens`` after ``prompt``; ``on_token(text_piece)`` streams output."""
    from tokenizers import Tokenizer

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    if max_new_tokens < 1:
        raise VQExportError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    tok_path = artifact / "tokenizer.json"
    if not tok_path.is_file():
        raise VQExportError(f"{artifact}: no tokenizer.json in the artifact (the checkpoint had none); generate needs text in and out")
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(prompt).ids
    if not ids:
        raise VQExportError("the prompt is empty after tokenization; give some text")
    cfg = manifest["config"]
    limit = cfg.get("max_position", 2048)
    if len(ids) + max_new_tokens > limit:
        raise VQExportError(f"prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceeds the model's max_position {limit}")
    eos = cfg.get("eos_token_id")
    rt = manifest["runtime"]
    runner = OrtRunner(artifact / rt["model_file"], rt["providers"], rt["session_optimization_level"],
                       rt["intra_op_num_threads"], rt.get("session_config"))
    new: list[int] = []
    stopped = False
    with runner:
        x = np.asarray([ids], dtype=np.int64)
        mask = np.ones_like(x)
        out = runner.step(x, mask, runner.empty_past(1))
        shown = ""
        for _ in range(max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            if eos is not None and nxt == eos:
                stopped = True
                break
            new.append(nxt)
            if on_token is not None:
                text = tok.decode(new)
                if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                    on_token(text[len(shown):])
                    shown = text
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            out = runner.step(np.asarray([[nxt]], dtype=np.int64), mask, out.present)
    return Generation(prompt_ids=ids, new_ids=new, text=tok.decode(new), stopped_at_eos=stopped)

"""The prompts a parity check (and int8 calibration) runs: the built-in ones, or a user's, as token ids.

Text is encoded with the model's tokenizer; a model without one gets seeded random ids. The prompts go in as one
left-padded batch where the graph takes one (``left_pad``)."""

from __future__ import annotations

import numpy as np

from .errors import VQExportError

DEFAULT_PROMPTS = (
    "def fibonacci(n):\n    ",
    "import os\nimport sys\n\n\nclass ",
    "    for i, line in enumerate(lines):\n        if ",
)


def prompt_ids(tokenizer_path=None, vocab_size: int = 0, prompts=DEFAULT_PROMPTS, seed: int = 0,
               lengths=(7, 4, 11)) -> list[list[int]]:
    """Token ids of the prompts (with the model's tokenizer), or without one seeded random ids, one run of each of
    ``lengths``."""
    if tokenizer_path is not None:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_path))
        return [tok.encode(p).ids or [0] for p in prompts]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, size=n).tolist() for n in lengths]


MAX_PROMPTS = 64  # prompts of one parity check (they go in as one batch)


def given_prompt_ids(prompts, tokenizer_path, vocab_size: int) -> list[list[int]]:
    """The token ids of a user's parity prompts: each a string (encoded with the model's tokenizer) or a list of token
    ids in [0, vocab_size). Anything else, an empty prompt, or none at all is a VQExportError."""
    if not isinstance(prompts, (list, tuple)):
        raise VQExportError(f"prompts must be a list of prompts (each a string or a list of token ids), not a "
                            f"{type(prompts).__name__}")
    if not prompts:
        raise VQExportError("no prompts given: expected a list of prompts, each a string or a list of token ids")
    if len(prompts) > MAX_PROMPTS:
        raise VQExportError(f"{len(prompts)} prompts given; at most {MAX_PROMPTS} (they go in as one batch)")
    tok, out = None, []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer_path is None:
                raise VQExportError(f"prompt {i + 1} is text and the model has no tokenizer.json; give token ids")
            if tok is None:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(str(tokenizer_path))
            ids = tok.encode(p).ids
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            ids = list(p)
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise VQExportError(f"prompt {i + 1} has token id {bad[0]} outside [0, {vocab_size})")
        else:
            raise VQExportError(f"prompt {i + 1} is neither a string nor a list of token ids")
        if not ids:
            raise VQExportError(f"prompt {i + 1} is empty (no tokens)")
        out.append(ids)
    return out


def read_prompts_file(path) -> list:
    """A prompts file: a JSON list whose entries are strings or lists of token ids."""
    from .jsonfile import read_json

    return read_json(path, list, "a JSON list of prompts (strings or lists of token ids)")


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return ids, mask

"""Calibration of the head's int8 activations: the largest |value| entering each head MatMul on calibration prompts.

    hidden    max |h|        (the codebook MatMul and the rank-r projection read it)
    lowrank   max |h · Pᵀ|   (the rank-r correction's second MatMul reads it)

Scales are amax / 127 (symmetric, zero point 0). The hidden states come from the PyTorch reference, so calibration
needs no runtime. The calibration prompts are not the parity prompts (``prompts.DEFAULT_PROMPTS``): a scale fitted on
the very states parity then measures would make the parity figures optimistic.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_PROMPTS = (
    "from collections import defaultdict\n\n\ndef group_by(items, key):\n    groups = defaultdict(list)\n",
    "class Config:\n    \"\"\"Settings read from a file.\"\"\"\n\n    def __init__(self, path):\n        self.path = path\n",
    "    try:\n        with open(path, encoding=\"utf-8\") as f:\n            data = json.load(f)\n    except OSError as e:\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(description=__doc__)\n    parser.add_argument(",
    "    while queue:\n        node = queue.popleft()\n        for child in graph[node]:\n            if child not in seen:\n",
    "# Copyright and license notices go here.\n\nimport numpy as np\nimport torch\n\n\ndef softmax(x, axis=-1):\n",
)
CALIBRATION_SEED = 1  # the random ids of a model without a tokenizer; parity's are seed 0
CALIBRATION_LENGTHS = (24, 17, 31, 9, 28, 20)


def calibration_ids(tokenizer_path=None, vocab_size: int = 0) -> list[list[int]]:
    """Token ids of the calibration prompts (with the model's tokenizer), or seeded random ids without one."""
    from .prompts import prompt_ids

    return prompt_ids(tokenizer_path, vocab_size, CALIBRATION_PROMPTS, CALIBRATION_SEED, CALIBRATION_LENGTHS)


def activation_scales(reference, source) -> dict[str, float]:
    from .prompts import left_pad

    geo = source.geometry
    prompts = calibration_ids(source.tokenizer_path, geo.vocab_size)
    if geo.max_position:
        prompts = [p[: geo.max_position] for p in prompts]
    ids, mask = left_pad(prompts)
    h, _ = reference.hidden(ids, mask, reference.empty_past(ids.shape[0]))
    h = h.numpy()[mask.astype(bool)].astype(np.float64)
    amax = {"hidden": float(np.abs(h).max())}
    if source.head.lowrank is not None:
        amax["lowrank"] = float(np.abs(h @ source.head.lowrank[0].astype(np.float64).T).max())
    return {k: max(v, 1e-8) / 127.0 for k, v in amax.items()}

"""The Runner interface every target implements (numpy in, numpy out).

    with runner:
        out = runner.step(input_ids, attention_mask, past)   # prefill: past = runner.empty_past(batch)
        out = runner.step(next_ids, longer_mask, out.present)  # decode

``verify`` and ``bench`` only talk to Runners, so a new target is one new runner module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, S, V] float32
    present: list[np.ndarray]  # 2 * n_layers tensors [B, Hkv, T, hd]
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Routing:
    """How a two-stage head routes (a reference runner's, for tie-aware parity): the cluster of every token [V] and
    the number of clusters probed. The runner's step then also returns ``route_scores`` [B, S, K], ``vq_logits`` and
    ``exact_logits`` [B, S, V] in ``extra``."""

    clusters: np.ndarray
    probes: int


class Runner:
    """Base class: subclasses set ``name``, the cache geometry, and implement ``_activate`` and ``step``."""

    name = "runner"
    routing: Routing | None = None  # set by a reference whose head is two-stage
    n_layers: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int

    def __enter__(self):
        self._activate()
        return self

    def __exit__(self, *exc):
        self._deactivate()
        return False

    def _activate(self) -> None:
        pass

    def _deactivate(self) -> None:
        pass

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.n_kv_heads, 0, self.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.n_layers)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> StepOutput:
        raise NotImplementedError

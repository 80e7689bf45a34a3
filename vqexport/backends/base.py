"""The Runner interface every target implements (numpy in, numpy out).

    with runner:
        out = runner.step(input_ids, attention_mask, past)   # prefill: past = runner.empty_past(batch)
        out = runner.step(next_ids, longer_mask, out.present)  # decode

``verify`` and ``bench`` only talk to Runners, so a new target is one new runner module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..graph_io import cache_dims


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, S, V] float32
    present: list[np.ndarray]  # 2 per layer with a cache: [B, Hkv, T, hd], each its layer's Hkv and hd
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Routing:
    """How a two-stage head routes (a reference runner's, for tie-aware parity): the cluster of every token [V] and
    the number of clusters probed. The runner's step then also returns ``route_scores`` [B, S, K], ``vq_logits`` and
    ``exact_logits`` [B, S, V] in ``extra``."""

    clusters: np.ndarray
    probes: int


class Runner:
    """Base class: subclasses set ``name``, the cache geometry (``kv_shapes``: ``graph_io.cache_shape`` of each layer
    with a cache, in the graph's order) and ``vocab_size``, and implement ``_activate`` and ``step``."""

    name = "runner"
    routing: Routing | None = None  # set by a reference whose head is two-stage
    kv_shapes: list[tuple[int, ...]]
    vocab_size: int

    @property
    def n_layers(self) -> int:
        """Layers with a cache: the past/present pairs of a step."""
        return len(self.kv_shapes)

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

    def empty_past(self, batch: int, length: int = 0) -> list[np.ndarray]:
        return [np.zeros((batch, heads, length, size), dtype=np.float32)
                for heads, *sizes in map(cache_dims, self.kv_shapes) for size in sizes]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> StepOutput:
        raise NotImplementedError

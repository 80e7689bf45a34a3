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
    logits: np.ndarray | None  # [B, S, V] float32 (None for a graph that outputs top-k only)
    present: list[np.ndarray]  # 2 per layer with a cache: [B, Hkv, T, hd], each its layer's Hkv and hd
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # other outputs per position: [B, S, ...]

    def _arrays(self) -> list[np.ndarray]:
        return [a for a in (self.logits, *self.extra.values()) if a is not None]

    @property
    def batch(self) -> int:
        return self._arrays()[0].shape[0]

    @property
    def length(self) -> int:
        """S: the positions the per-position outputs cover (1 for a graph that outputs the last position only)."""
        return self._arrays()[0].shape[1]

    def at(self, b: np.ndarray, s: np.ndarray) -> "StepOutput":
        """The per-position outputs at the positions (b[i], s[i]) (s may count from the end: -1 is the last), as
        [n, ...] arrays; no cache."""
        return StepOutput(logits=None if self.logits is None else self.logits[b, s], present=[],
                          extra={k: v[b, s] for k, v in self.extra.items()})

    def last(self) -> "StepOutput":
        """The outputs at each row's last position ([B, ...] arrays)."""
        return self.at(np.arange(self.batch), np.full(self.batch, -1))


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

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]) -> StepOutput:
        """``step``, for a long prompt whose outputs are read a few positions at a time (``StepOutput.at``): a runner
        that can compute them when read returns a step that does (the PyTorch reference: a [B, S, V] array is
        GBs at V = 262k and a few thousand positions, and a two-stage head has three of them)."""
        return self.step(input_ids, attention_mask, past)

"""The PyTorch reference: transformers' own model (its decoder's final hidden state) followed by the head's torch
module, float32 on the CPU. Nothing here is a hand-written trunk."""

from __future__ import annotations

import numpy as np
import torch

from ..head.module import TwoStageHead, head_module, soft_cap
from ..source import Source
from ..trunk.hf import Trunk, make_trunk
from .base import Routing, Runner, StepOutput


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, trunk: Trunk, head: torch.nn.Module, vocab_size: int, softcap: float | None = None):
        self.trunk, self.head = trunk.eval(), head.eval()
        self.kv_shapes, self.vocab_size = list(trunk.kv_shapes), vocab_size
        self.softcap = softcap  # the model's final_logit_softcapping, applied to the head's logits
        if isinstance(head, TwoStageHead):
            self.routing = Routing(clusters=head.map.numpy(), probes=head.probes)

    @classmethod
    def from_source(cls, source: Source, trunk: Trunk | None = None, dtype: torch.dtype = torch.float32) -> "TorchRunner":
        """The reference of ``source``: its transformers model (or ``trunk``) and head, computing in ``dtype``."""
        from ..errors import VQExportError
        from ..trunk import hf

        g = source.geometry
        if trunk is None:
            model = hf.load_causal_lm(source, dtype)
            trunk = make_trunk(source, model)
        else:
            model = None
        rows = rows_bias = None
        if source.head.two_stage:  # exact rows: the model's own output layer (the tied embedding table, or lm_head)
            model = model if model is not None else hf.load_causal_lm(source, dtype)
            rows, rows_bias = hf.output_weight(model), hf.output_bias(model, trunk.hidden_scale)
            if tuple(rows.shape) != (g.vocab_size, g.hidden_size):
                raise VQExportError(f"{source.path}: the model's output layer is {list(rows.shape)}; a two-stage head reads "
                                    f"its exact rows there and needs [{g.vocab_size}, {g.hidden_size}]")
        return cls(trunk, head_module(source.head, rows, rows_bias).to(trunk.dtype), g.vocab_size, g.logit_softcap)

    @torch.no_grad()
    def hidden(self, input_ids, attention_mask, past) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out = self.trunk(torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
                         torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)),
                         *(torch.from_numpy(np.ascontiguousarray(p)).to(self.trunk.dtype) for p in past))
        return out[0], out[1:]

    @torch.no_grad()
    def step(self, input_ids, attention_mask, past):
        h, present = self.hidden(input_ids, attention_mask, past)
        return head_step(self.head, h, [t.numpy() for t in present], self.softcap)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, past):
        """The trunk's step; the head's outputs are computed for the positions read (``HeadAt``)."""
        h, present = self.hidden(input_ids, attention_mask, past)
        return HeadAt(self.head, h, [t.numpy() for t in present], self.softcap)


class HeadAt(StepOutput):
    """A step whose head outputs are computed for the positions read (``at``, ``last``) from the trunk's hidden
    states [B, S, d]: the same values as ``head_step`` (the head is per position), without its [B, S, V] arrays."""

    def __init__(self, head: torch.nn.Module, h: torch.Tensor, present: list[np.ndarray], softcap: float | None):
        super().__init__(logits=None, present=present)
        self.head, self.h, self.softcap = head, h, softcap

    @property
    def batch(self) -> int:
        return self.h.shape[0]

    @property
    def length(self) -> int:
        return self.h.shape[1]

    @torch.no_grad()
    def at(self, b, s) -> StepOutput:
        return head_step(self.head, self.h[torch.as_tensor(b), torch.as_tensor(s)], [], self.softcap)


@torch.no_grad()
def head_step(head: torch.nn.Module, h: torch.Tensor, present: list[np.ndarray], softcap: float | None = None) -> StepOutput:
    """The head's step output for hidden states ``h``; a two-stage head adds its parts (``Routing``). ``softcap``
    caps the logits, and a two-stage head's VQ and exact logits each (the cap is per logit, so the logits of any
    other routing, put together from the parts, are capped as well)."""
    if isinstance(head, TwoStageHead):
        parts = {k: (v if k == "route_scores" else soft_cap(v, softcap)).numpy() for k, v in head.stages(h).items()}
        return StepOutput(logits=parts.pop("logits"), present=present, extra=parts)
    return StepOutput(logits=soft_cap(head(h), softcap).numpy(), present=present)

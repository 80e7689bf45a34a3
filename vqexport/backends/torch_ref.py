"""The PyTorch reference runner: the checkpoint's own model, float32, on the CPU."""

from __future__ import annotations

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..model import VQLogitsLM, from_tensors
from .base import Runner, StepOutput


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, model: VQLogitsLM):
        cfg = model.cfg
        self.model = model.eval()
        self.n_layers, self.n_kv_heads, self.head_dim, self.vocab_size = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint) -> "TorchRunner":
        return cls(from_tensors(ckpt.config, ckpt.tensors))

    @torch.no_grad()
    def step(self, input_ids, attention_mask, past):
        out = self.model(
            torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(attention_mask, dtype=np.int64)),
            *(torch.from_numpy(np.ascontiguousarray(p)) for p in past),
        )
        return StepOutput(logits=out[0].numpy(), present=[t.numpy() for t in out[1:]])

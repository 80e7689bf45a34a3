"""Run an ONNX decoder graph with onnxruntime (numpy only: no torch on this path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...graph import cache_names
from ..base import Runner, StepOutput
from .session import available_providers, create_session, session_options


class OrtRunner(Runner):
    name = "ort"

    @classmethod
    def from_artifact(cls, artifact, model_file: str | None = None) -> "OrtRunner":
        """A runner with the settings the artifact's manifest records (providers, levels, session config, kernels)."""
        from ...artifact import read_manifest

        rt = read_manifest(artifact)["runtime"]
        return cls.from_runtime(Path(artifact) / (model_file or rt["model_file"]), rt)

    @classmethod
    def from_runtime(cls, model_path, rt: dict) -> "OrtRunner":
        return cls(model_path, rt["providers"], rt["session_optimization_level"], rt["intra_op_num_threads"],
                   rt.get("session_config"), rt.get("custom_ops"))

    def __init__(self, model_path, providers=("CPUExecutionProvider",), optimization_level: str = "all",
                 threads: int = 0, session_config: dict | None = None, custom_ops: str | None = None):
        self.model_path = model_path if isinstance(model_path, bytes) else Path(model_path)  # a file or serialized bytes
        self.providers = list(providers)
        self.optimization_level = optimization_level
        self.threads = threads
        self.session_config = dict(session_config or {})
        self.custom_ops = custom_ops
        self.session = None

    def _activate(self):
        so = session_options(self.optimization_level, self.threads, self.session_config)
        if self.custom_ops == "onnxruntime-extensions":
            from ...ops.vqlogits import register_ort_kernel

            so.register_custom_ops_library(register_ort_kernel())
        model = self.model_path if isinstance(self.model_path, bytes) else str(self.model_path)
        self.session = create_session(model, so, available_providers(self.providers))
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.n_layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        if self.n_layers:
            shape = inputs["past_key_values.0.key"].shape
            self.n_kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self._past_names, _ = cache_names(self.n_layers)
        self.output_names = [o.name for o in self.session.get_outputs()]
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        self.vocab_size = int(logits.shape[-1]) if logits is not None else None

    def _deactivate(self):
        self.session = None

    def step(self, input_ids, attention_mask, past):
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        feeds.update(zip(self._past_names, past))
        outs = dict(zip(self.output_names, self.session.run(None, feeds)))
        present = [outs.pop(n) for n in [o for o in self.output_names if o.startswith("present.")]]
        return StepOutput(logits=outs.pop("logits", None), present=present, extra=outs)

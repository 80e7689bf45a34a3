"""Run an OpenVINO IR decoder as a Runner: the same prefill + per-token decode steps with a KV cache as ONNX Runtime
(the portable graph's concatenating cache), numpy in and out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import VQExportError
from ...graph_io import cache_names, cache_shapes
from ..base import Runner, StepOutput
from .env import require_device, require_openvino


class OvRunner(Runner):
    name = "openvino"

    @classmethod
    def from_runtime(cls, model_path, rt: dict) -> "OvRunner":
        return cls(model_path, rt.get("device", "CPU"), rt.get("inference_precision", "f32"))

    def __init__(self, model_path, device: str = "CPU", inference_precision: str = "f32"):
        self.model_path, self.device, self.inference_precision = Path(model_path), device, inference_precision
        self.request = None

    def _activate(self):
        what = f"{self.model_path}: running an OpenVINO model"
        ov = require_openvino(what)
        require_device(self.device, what)
        if not self.model_path.is_file() or not self.model_path.with_suffix(".bin").is_file():
            raise VQExportError(f"{self.model_path}: the OpenVINO IR (model.xml + model.bin) is missing; rebuild the artifact")
        core = ov.Core()
        try:
            compiled = core.compile_model(str(self.model_path), self.device, {"INFERENCE_PRECISION_HINT": self.inference_precision})
        except RuntimeError as e:
            raise VQExportError(f"{self.model_path}: OpenVINO could not compile the model ({str(e).splitlines()[0][:200]})") from None
        self.request = compiled.create_infer_request()
        self._inputs = [p.any_name for p in compiled.inputs]
        self.output_names = [p.any_name for p in compiled.outputs]
        shapes = {p.any_name: p.get_partial_shape() for p in compiled.inputs if p.any_name.startswith("past_key_values.")}
        self._past_names, _ = cache_names(len(shapes) // 2)
        self.kv_shapes = cache_shapes(len(shapes) // 2,
                                      lambda name: (shapes[name][1].get_length(), shapes[name][3].get_length()))
        logits = next((p for p in compiled.outputs if p.any_name == "logits"), None)
        self.vocab_size = logits.get_partial_shape()[-1].get_length() if logits is not None else None

    def _deactivate(self):
        self.request = None

    def step(self, input_ids, attention_mask, past):
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        feeds.update((n, np.ascontiguousarray(p, dtype=np.float32)) for n, p in zip(self._past_names, past))
        res = self.request.infer(feeds)
        outs = {name: np.array(res[name]) for name in self.output_names}
        present = [outs.pop(n) for n in [o for o in self.output_names if o.startswith("present.")]]
        return StepOutput(logits=outs.pop("logits", None), present=present, extra=outs)

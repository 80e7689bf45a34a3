"""Run a TensorRT engine as a Runner: prefill on optimization profile 0, decode steps on profile 1.

numpy in, numpy out (device buffers through torch, which vqexport already depends on). The engine's metadata in
the manifest is checked against this machine first: another TensorRT version or GPU is one clear error.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import VQExportError
from ...graph_io import cache_names, cache_shapes
from ..base import Runner, StepOutput
from .env import check_engine_runs_here, probe, require
from .shapes import profile_for


class TrtRunner(Runner):
    name = "trt"

    @classmethod
    def from_runtime(cls, plan_path, rt: dict) -> "TrtRunner":
        return cls(plan_path, rt.get("engine", {}), rt.get("plugins", []))

    def __init__(self, plan_path, engine_meta: dict, plugins=()):
        self.plan_path = Path(plan_path)
        self.engine_meta = dict(engine_meta)
        self.plugins = list(plugins)
        self.engine = None

    def _activate(self):
        here = probe()
        check_engine_runs_here(self.engine_meta, here, str(self.plan_path))
        trt = require(f"{self.plan_path}: running a TensorRT engine", here)
        import torch

        if self.plugins:
            from .plugin import register

            register()
        self._torch = torch
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        if self.engine_meta.get("version_compatible"):
            self._runtime.engine_host_code_allowed = True
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise VQExportError(f"{self.plan_path}: TensorRT could not load the engine (built for another version or GPU?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = torch.cuda.Stream()
        self.contexts = []
        for idx in range(self.engine.num_optimization_profiles):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(idx, self.stream.cuda_stream)
            self.contexts.append(ctx)
        self.stream.synchronize()
        layers = sum(1 for n in self._inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        self._past_names, _ = cache_names(layers)
        self.kv_shapes = cache_shapes(layers, lambda name: (int(self.engine.get_tensor_shape(name)[1]),
                                                            int(self.engine.get_tensor_shape(name)[3])))
        self.vocab_size = int(self.engine.get_tensor_shape("logits")[-1]) if "logits" in self.output_names else None

    def _deactivate(self):
        self.contexts = []
        self.engine = None

    def _device(self, arr: np.ndarray, dtype: np.dtype):
        torch = self._torch
        host = np.ascontiguousarray(arr, dtype=dtype)
        # a zero-size tensor still gets a real (one-element) buffer: TensorRT wants a valid address
        t = torch.from_numpy(host.reshape(-1) if host.size else np.zeros(1, dtype)).to("cuda", non_blocking=False)
        return t, host.shape

    def step(self, input_ids, attention_mask, past):
        torch = self._torch
        past_len = past[0].shape[2] if past else 0
        ctx = self.contexts[min(profile_for(past_len), len(self.contexts) - 1)]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, **dict(zip(self._past_names, past))}
        keep = []
        for name in self._inputs:
            t, shape = self._device(feeds[name], self._dtypes[name])
            if not ctx.set_input_shape(name, shape):
                raise VQExportError(f"{self.plan_path}: input {name} of shape {list(shape)} is outside the engine's profiles")
            ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = {}
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            n = int(np.prod(shape)) if shape else 1
            t = torch.empty(max(n, 1), dtype=torch.from_numpy(np.zeros(0, self._dtypes[name])).dtype, device="cuda")
            ctx.set_tensor_address(name, t.data_ptr())
            outs[name] = (t, shape)
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.plan_path}: TensorRT execution failed")
        self.stream.synchronize()
        res = {}
        for name, (t, shape) in outs.items():
            n = int(np.prod(shape)) if shape else 1
            res[name] = t[:n].cpu().numpy().reshape(shape)  # the graph's outputs are fp32 / int64 (fp16 stays inside)
        present = [res.pop(n) for n in [o for o in self.output_names if o.startswith("present.")]]
        return StepOutput(logits=res.pop("logits", None), present=present, extra=res)

"""Run an ONNX decoder graph with onnxruntime (numpy only: no torch on this path).

Two KV-cache conventions:

* concatenating (the portable graph): ``present`` = ``past`` + the new positions, fed back as the next ``past``;
* shared buffer (onnxruntime-genai's GroupQueryAttention graphs, ``past_present_share_buffer``): past and present
  are one preallocated buffer per layer that the graph writes the new positions into, as onnxruntime-genai runs
  it. The runner keeps those buffers (growing them when a sequence outgrows them) and returns views of the valid
  positions, so callers see the same ``present`` as with a concatenating graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ...errors import VQExportError
from ...graph_io import attention_windows, cache_names, cache_shapes, load_graph
from ..base import Runner, StepOutput
from .session import available_providers, create_session, session_options


MIN_BUFFER = 256  # positions of a shared cache buffer when it is first made


NODE_FAILURE = "Non-zero status code returned while running"  # onnxruntime's words for a node that failed


def positions(input_ids, attention_mask) -> np.ndarray:
    """The positions of ``input_ids`` [B, S] from the mask [B, T]: ``cumsum - 1`` over the last S columns, as the
    trunk computes them inside its graph and onnxruntime-genai feeds them to a graph with a ``position_ids`` input."""
    mask = np.asarray(attention_mask, dtype=np.int64)
    return np.ascontiguousarray(np.maximum(mask.cumsum(-1) - 1, 0)[:, -np.shape(input_ids)[1]:])


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
                   rt.get("session_config"), rt.get("custom_ops"), rt.get("head_dim"), rt.get("past_present_share_buffer", False))

    def __init__(self, model_path, providers=("CPUExecutionProvider",), optimization_level: str = "all",
                 threads: int = 0, session_config: dict | None = None, custom_ops: str | None = None,
                 head_dim: int | None = None, share_buffer: bool = False):
        self.model_path = model_path if isinstance(model_path, bytes) else Path(model_path)  # a file or serialized bytes
        self.providers = list(providers)
        self.optimization_level = optimization_level
        self.threads = threads
        self.session_config = dict(session_config or {})
        self.custom_ops = custom_ops
        self.head_dim = head_dim  # for graphs whose cache declares its head size symbolically
        self.share_buffer = share_buffer
        self._buffers: list[np.ndarray] = []
        self._min_length = MIN_BUFFER
        self.session = None

    def _activate(self):
        so = session_options(self.optimization_level, self.threads, self.session_config)
        if self.custom_ops == "onnxruntime-extensions":
            from ...ops.vqlogits import register_ort_kernel

            so.register_custom_ops_library(register_ort_kernel())
        model = self.model_path if isinstance(self.model_path, bytes) else str(self.model_path)
        self.session = create_session(model, so, available_providers(self.providers))
        inputs = {i.name: i for i in self.session.get_inputs()}
        layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
        self.kv_shapes = cache_shapes(layers, lambda name: self._kv_shape(inputs[name].shape))
        self._past_names, self._present_names = cache_names(layers)
        if self.share_buffer:  # GroupQueryAttention refuses a cache buffer shorter than its sliding window
            graph = onnx.load_from_string(model) if isinstance(model, bytes) else load_graph(model)
            self._min_length = max([MIN_BUFFER, *attention_windows(graph)])
        self.takes_positions = "position_ids" in inputs  # the builder's graphs with RotaryEmbedding nodes (HunYuan)
        self.output_names = [o.name for o in self.session.get_outputs()]
        logits = next((o for o in self.session.get_outputs() if o.name == "logits"), None)
        self.vocab_size = int(logits.shape[-1]) if logits is not None else None

    def _kv_shape(self, shape) -> tuple[int, int]:
        if isinstance(shape[3], int):
            return int(shape[1]), shape[3]
        if self.head_dim is None:
            raise ValueError(f"{self.model_path}: the KV cache's head size is symbolic ({shape[3]!r}); pass head_dim")
        return int(shape[1]), self.head_dim

    def _deactivate(self):
        self.session = None
        self._buffers = []

    def step(self, input_ids, attention_mask, past):
        try:
            run = self._step_shared if self.share_buffer else self._step
            return run(input_ids, attention_mask, past)
        except Exception as e:  # a node of the graph that fails while running: one line, not onnxruntime's traceback
            msg = " ".join(str(e).split())
            if NODE_FAILURE not in msg:  # anything else (a feed the runner got wrong, ...) is a bug: its traceback
                raise
            raise VQExportError(f"onnxruntime cannot run {self.model_path}: {msg[msg.index(NODE_FAILURE):][:400]}") from None

    def _step(self, input_ids, attention_mask, past):
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        if self.takes_positions:
            feeds["position_ids"] = positions(input_ids, attention_mask)
        feeds.update(zip(self._past_names, past))
        outs = dict(zip(self.output_names, self.session.run(None, feeds)))
        present = [outs.pop(n) for n in [o for o in self.output_names if o.startswith("present.")]]
        return StepOutput(logits=outs.pop("logits", None), present=present, extra=outs)

    def _step_shared(self, input_ids, attention_mask, past):
        """One step on preallocated cache buffers bound as both past input and present output."""
        batch, total = attention_mask.shape
        valid = past[0].shape[2] if past else 0
        ours = bool(self._buffers) and all(np.shares_memory(p, b) for p, b in zip(past, self._buffers))
        if not ours or self._buffers[0].shape[0] != batch or self._buffers[0].shape[2] < total:
            # a sequence that outgrew its buffers gets twice their length (decode steps grow it by one at a time); a
            # new sequence gets what it needs, whatever the last one had: doubling there compounds over prompts
            grow = 2 * self._buffers[0].shape[2] if ours else 0
            length = max(total, grow, self._min_length)
            fresh = self.empty_past(batch, length)
            for buf, p in zip(fresh, past):
                buf[:, :, :valid] = p
            self._buffers = fresh
        io = self.session.io_binding()
        io.bind_cpu_input("input_ids", np.ascontiguousarray(input_ids, dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        if self.takes_positions:
            io.bind_cpu_input("position_ids", positions(input_ids, attention_mask))
        for name_in, name_out, buf in zip(self._past_names, self._present_names, self._buffers):
            io.bind_input(name_in, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
            io.bind_output(name_out, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
        others = [n for n in self.output_names if not n.startswith("present.")]
        for name in others:
            io.bind_output(name, "cpu")
        self.session.run_with_iobinding(io)
        outs = dict(zip(others, io.copy_outputs_to_cpu()[len(self._buffers):]))
        present = [buf[:, :, :total] for buf in self._buffers]
        return StepOutput(logits=outs.pop("logits", None), present=present, extra=outs)

"""Mixture-of-experts decoders on the portable trunk: each experts layer becomes a graph that runs every expert on
the tokens routed to it (vqexport/trunk/experts.py). The oracle is transformers' own model: an identity head (K = V)
makes the artifact's logits the model's."""

import hashlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner
from vqexport.errors import VQExportError
from vqexport.graph_io import all_graphs, all_nodes
from vqexport.head.spec import write_head
from vqexport.trunk.experts import exportable_experts

from .models import (artifact_logits, genai_greedy, hf_config, identity_head, runner_greedy, save_hf,
                     transformers_logits)
from .test_fp16_trunk import ort_fp16_toml

# 8 experts, 2 per token: a decode step of 2 rows reaches at most 4, so some experts get no rows at all
MOE = {
    # concatenated gate and up projections, SiLU gate, softmax router
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16),
    # transposed weights, biases, interleaved gate and up with gpt-oss's own clamped gate, attention sinks
    "gpt_oss": dict(num_local_experts=8, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"],
                    sliding_window=4),
}


def _moe_model(path, arch):
    save_hf(path, hf_config(arch, vocab=101, hidden=32, layers=2, heads=4, kv_heads=2, **MOE[arch]))
    write_head(path, identity_head(path))
    return path


def _logits(out, model_dir):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 101, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    nxt = rng.integers(0, 101, size=(2, 1))
    prefill, decode = artifact_logits(out, ids, mask, nxt)
    ref = transformers_logits(model_dir, ids, mask)
    full_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    ref_next = transformers_logits(model_dir, np.concatenate([ids, nxt], 1), full_mask)[:, -1]
    keep = mask.astype(bool)
    return prefill[keep], ref[keep], decode, ref_next


@pytest.mark.parametrize("arch", list(MOE))
def test_a_mixture_of_experts_artifact_equals_transformers(tmp_path, arch):
    model_dir = _moe_model(tmp_path / "model", arch)
    result = api.build("ort", model=model_dir, out=tmp_path / "art", steps=4)
    assert result.parity.passed
    prefill, ref, decode, ref_next = _logits(result.out, model_dir)
    np.testing.assert_allclose(prefill, ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(decode, ref_next, atol=1e-4, rtol=0)

    graph = onnx.load(str(result.out / "model.onnx"), load_external_data=False).graph
    names = {t.name for t in graph.initializer}
    stacked = [n for n in names if n.endswith("experts.down_proj") or n.endswith("experts.gate_up_proj")]
    assert stacked == []  # nothing gathers an expert from the stacked tensor at run time
    per_expert = sorted(n for n in names if ".mlp.experts.down_proj." in n)
    assert per_expert == sorted(f"model.layers.{i}.mlp.experts.down_proj.{e}" for i in range(2) for e in range(8))
    nodes = list(all_nodes(graph))
    assert sum(n.op_type == "NonZero" for n in nodes) == 2 * 8
    # each expert inside an If: an expert no token chose runs none of its nodes
    assert sum(n.op_type == "If" for n in graph.node) == 2 * 8 and not any(n.op_type == "NonZero" for n in graph.node)
    assert not any(n.domain == "vqexport" for n in nodes)
    # each expert's row count is its own: no shared symbolic dimension lets onnxruntime reuse one expert's buffer
    infos = [v for g in all_graphs(graph) for v in g.value_info]
    assert not any(d.dim_param == "rows" for v in infos for d in v.type.tensor_type.shape.dim)

    prompt = [5, 17, 99, 3, 42]  # onnxruntime-genai runs the graph as it is
    with OrtRunner.from_artifact(result.out) as runner:
        assert genai_greedy(result.out, prompt, 8) == runner_greedy(runner, prompt, 8)


def test_openvino_gets_its_experts_unwrapped_and_compresses_every_one(tmp_path):
    """NNCF compresses no weight inside an If's branch: an OpenVINO target gets each expert's nodes run
    unconditionally (the graph before the Ifs), and openvino-int8 compresses every expert's weights."""
    import openvino as ov

    result = api.build("openvino-int8", model=_moe_model(tmp_path / "model", "qwen3_moe"), out=tmp_path / "ov", steps=4)
    assert result.parity.passed, result.parity.failures
    ops = ov.Core().read_model(str(result.out / "model.xml")).get_ops()  # the IR the artifact ships
    kinds = [op.get_type_name() for op in ops]
    assert "If" not in kinds and kinds.count("NonZero") == 2 * 8
    names = [op.get_friendly_name() for op in ops
             if op.get_type_name() == "Constant" and op.get_element_type().get_type_name() == "u8"]
    compressed = {n for n in names if ".mlp.experts." in n and not n.endswith("/zero_point")}
    assert compressed == {f"model.layers.{i}.mlp.experts.{t}.{e}" for i in range(2) for t in ("gate_up_proj", "down_proj")
                          for e in range(8)}


def test_the_experts_graph_is_byte_identical_across_exports(tmp_path):
    from vqexport.source import load_source
    from vqexport.trunk.hf import make_trunk
    from vqexport.trunk.portable import export_trunk

    source = load_source(_moe_model(tmp_path / "model", "qwen3_moe"))
    digests = [hashlib.sha256(ir.to_proto(export_trunk(make_trunk(source), source)).SerializeToString()).hexdigest()
               for _ in range(2)]
    assert digests[0] == digests[1]


def test_the_fp16_trunk_runs_the_experts(tmp_path):
    model_dir = _moe_model(tmp_path / "model", "qwen3_moe")
    result = api.build(str(ort_fp16_toml(tmp_path)), model=model_dir, out=tmp_path / "art", steps=4)
    assert result.parity.passed
    prefill, ref, decode, ref_next = _logits(result.out, model_dir)
    np.testing.assert_allclose(prefill, ref, atol=5e-2, rtol=0)
    np.testing.assert_allclose(decode, ref_next, atol=5e-2, rtol=0)
    graph = onnx.load(str(result.out / "model.onnx"), load_external_data=False).graph
    assert next(t for t in graph.initializer if t.name == "model.layers.0.mlp.experts.down_proj.3__fp16").data_type \
        == onnx.TensorProto.FLOAT16


def test_an_experts_layer_without_stacked_weights_is_one_line(tmp_path):
    """An experts layer of transformers' kind whose weights are not the stacked projections the graph reads is
    refused by name in one line, through the trunk's export."""
    from vqexport.source import load_source
    from vqexport.trunk.hf import make_trunk
    from vqexport.trunk.portable import export_trunk

    source = load_source(_moe_model(tmp_path / "model", "qwen3_moe"))
    trunk = make_trunk(source)
    experts = trunk.decoder.layers[1].mlp.experts
    experts.w2 = experts.down_proj
    del experts.down_proj
    with pytest.raises(VQExportError) as e:
        export_trunk(trunk, source)
    assert str(e.value) == (f"{source.path}: the experts layer layers.1.mlp.experts (Qwen3MoeExperts) has no down_proj "
                            "of stacked expert weights; vqexport exports transformers' stacked experts only")


def test_the_experts_forward_is_restored_after_a_failed_export():
    layer = _Layer(_experts("gate-bias"))
    with pytest.raises(RuntimeError, match="stop"):
        with exportable_experts(layer, "model"):
            assert "forward" in vars(layer.experts)
            raise RuntimeError("stop")
    assert "forward" not in vars(layer.experts)


E, D, F = 4, 8, 6  # experts, hidden size, expert width


def _experts(kind: str) -> torch.nn.Module:
    """A transformers-style experts layer (``use_experts_implementation``) of ``kind``, random weights."""
    from transformers.integrations.moe import use_experts_implementation

    gate, bias, transposed, post = {"gate-bias": (True, True, False, False),
                                    "no-gate-transposed": (False, True, True, False),
                                    "post-norm": (True, False, False, True)}[kind]

    @use_experts_implementation(has_gate=gate, has_bias=bias, is_transposed=transposed, has_post_expert_norm=post)
    class Experts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts = E
            width = 2 * F if gate else F
            first = (E, D, width) if transposed else (E, width, D)
            second = (E, F, D) if transposed else (E, D, F)
            setattr(self, "gate_up_proj" if gate else "up_proj", torch.nn.Parameter(torch.randn(first)))
            self.down_proj = torch.nn.Parameter(torch.randn(second) * 0.3)
            if bias:
                setattr(self, "gate_up_proj_bias" if gate else "up_proj_bias", torch.nn.Parameter(torch.randn(E, width)))
                self.down_proj_bias = torch.nn.Parameter(torch.randn(E, D))
            self.act_fn = torch.nn.SiLU() if gate else torch.nn.GELU()
            if post:
                self.post_expert_norm = torch.nn.LayerNorm(D)
                torch.nn.init.normal_(self.post_expert_norm.weight)

    torch.manual_seed(0)
    return Experts(type("Config", (), {"_experts_implementation": "batched_mm"})())


class _Layer(torch.nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.experts(hidden, top_k_index, top_k_weights)


def _oracle(m, hidden, index, weights):
    """Token by token, choice by choice: an id of num_experts or more adds nothing, a repeated id adds twice."""
    out = torch.zeros_like(hidden)
    first = m.gate_up_proj if m.has_gate else m.up_proj
    for t in range(hidden.shape[0]):
        for e, w in zip(index[t].tolist(), weights[t]):
            if e >= m.num_experts:
                continue
            y = hidden[t] @ first[e] if m.is_transposed else first[e] @ hidden[t]
            y = y + (m.gate_up_proj_bias[e] if m.has_gate else m.up_proj_bias[e]) if m.has_bias else y
            y = m.act_fn(y[:F]) * y[F:] if m.has_gate else m.act_fn(y)
            y = y @ m.down_proj[e] if m.is_transposed else m.down_proj[e] @ y
            y = y + m.down_proj_bias[e] if m.has_bias else y
            out[t] += w * (m.post_expert_norm(y) if m.has_post_expert_norm else y)
    return out


@pytest.mark.parametrize("kind", ["gate-bias", "no-gate-transposed", "post-norm"])
def test_the_experts_graph_computes_each_routed_expert(kind):
    """One experts layer alone through the placeholder export and its expansion, against a token-by-token oracle:
    an expert no token chose (3), a token choosing one expert twice (row 1), an id past the last expert (row 2,
    which transformers' loop skips), and a single-token step."""
    import onnxruntime as ort
    from torch.export import Dim

    from vqexport.trunk.experts import TRANSLATIONS, expand_routed_experts

    layer = _Layer(_experts(kind)).eval()
    index = torch.tensor([[0, 1], [1, 1], [2, 4], [0, 2], [1, 0], [2, 0]])
    hidden, weights = torch.randn(6, D), torch.rand(6, 2)
    tokens = Dim("tokens")
    with torch.no_grad(), exportable_experts(layer, "model") as modules:
        program = torch.onnx.export(layer, (hidden, index, weights), dynamic_shapes=({0: tokens},) * 3, dynamo=True,
                                    opset_version=18, custom_translation_table=TRANSLATIONS, verbose=False)
    model = program.model
    expand_routed_experts(model, modules, "", 18)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    for rows in (slice(None), slice(2, 3)):
        feed = {"hidden": hidden[rows].numpy(), "top_k_index": index[rows].numpy(), "top_k_weights": weights[rows].numpy()}
        got = session.run(None, feed)[0]
        with torch.no_grad():
            want = _oracle(layer.experts, hidden[rows], index[rows], weights[rows]).numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
        assert np.abs(want).max() > 0.1

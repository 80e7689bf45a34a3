"""The joined graph: trunk (torch.onnx of transformers' decoder) + head (built by vqexport), on small random models
of several shapes: its I/O contract, named dynamic axes, external data, parity, and the head's nodes and names."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner
from vqexport.build import reference_runner
from vqexport.errors import VQExportError
from vqexport.graph_io import check_dynamic_axes, load_graph
from vqexport.head.graph import CODEBOOK_MATMUL
from vqexport.source import load_source

from .models import make_model

SHAPES = {
    "odd-V": dict(vocab=97, k=11, bias=True),
    "K=1": dict(vocab=50, k=1, bias=True),
    "K=V": dict(vocab=64, k=64, bias=True),
    "no-bias": dict(vocab=101, k=7, bias=False),
    "mqa-qkv-bias-qwen2": dict(arch="qwen2", vocab=83, k=5, kv_heads=1, layers=1),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def built(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    model = make_model(tmp / "model", seed=len(request.param), **SHAPES[request.param])
    return load_source(model), api.build("ort", model=model, out=tmp / "art", steps=8)


def test_parity_passes(built):
    _, result = built
    r = result.parity
    assert r.passed, r.failures
    assert r.max_abs_diff <= 1e-4 and r.top1_agreement == 1.0
    assert r.greedy_match_steps == r.steps == 8


def test_graph_contract(built):
    source, result = built
    geo, head = source.geometry, source.head
    proto = load_graph(result.out / "model.onnx")
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    assert names_in[:2] == ["input_ids", "attention_mask"]
    assert names_in[2:] == [f"past_key_values.{i}.{k}" for i in range(geo.n_layers) for k in ("key", "value")]
    assert names_out == ["logits"] + [f"present.{i}.{k}" for i in range(geo.n_layers) for k in ("key", "value")]
    check_dynamic_axes(proto)
    nodes = {n.name: n for n in proto.graph.node}
    matmul = nodes[CODEBOOK_MATMUL]
    assert matmul.input[1] == "head.codebook_t" and nodes["head/select/gather"].op_type == "GatherElements"
    assert next(a.i for a in nodes["head/select/gather"].attribute if a.name == "axis") == 2  # non-negative axes
    assert ("head/bias/Add" in nodes) == head.config.bias
    hidden_producer = next(n for n in proto.graph.node if "hidden_states" in n.output)
    assert not hidden_producer.name.startswith("head/")  # the head reads the trunk's final hidden state
    assert matmul.input[0] == "hidden_states"
    inits = {t.name: t for t in proto.graph.initializer}
    assert list(inits["head.codebook_t"].dims) == [geo.hidden_size, head.config.codebook_size]
    assert inits["head.map"].data_type == onnx.TensorProto.INT32
    np.testing.assert_array_equal(numpy_helper.to_array(inits["head.map"]).reshape(-1), head.map)
    # trunk weights keep the checkpoint's names and live in the external data file
    assert any(n.startswith("model.layers.0.") for n in inits)
    big = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(dict((e.key, e.value) for e in t.external_data)["location"] == "model.onnx.data" for t in big)
    onnx.checker.check_model(str(result.out / "model.onnx"), full_check=True)


def test_plain_gather_form(tmp_path):
    model = make_model(tmp_path / "model", vocab=97, k=11)
    profile = tmp_path / "gather.toml"
    profile.write_text('backend = "ort"\nname = "gather"\nselect = "gather"\n[parity]\nsteps = 4\n')
    result = api.build(str(profile), model=model, out=tmp_path / "art")
    proto = load_graph(result.out / "model.onnx")
    gather = next(n for n in proto.graph.node if n.name == "head/select/gather")
    assert gather.op_type == "Gather" and next(a.i for a in gather.attribute if a.name == "axis") == 2
    assert not any(n.op_type == "GatherElements" for n in proto.graph.node)
    assert numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "head.map")).shape == (97,)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4


@pytest.mark.parametrize("batch,seq,past", [(1, 1, 0), (3, 1, 7), (1, 6, 0), (4, 2, 3)])
def test_dynamic_axes_really_dynamic(built, batch, seq, past):
    source, result = built
    geo = source.geometry
    rng = np.random.default_rng(batch * 100 + seq * 10 + past)
    ids = rng.integers(0, geo.vocab_size, size=(batch, past + seq))
    mask = np.ones_like(ids)
    with reference_runner(source) as ref, OrtRunner(result.out / "model.onnx") as tgt:
        past_ref = ref.step(ids[:, :past], mask[:, :past], ref.empty_past(batch)).present if past else ref.empty_past(batch)
        r = ref.step(ids[:, past:], mask, past_ref)
        t = tgt.step(ids[:, past:], mask, past_ref)
    assert t.logits.shape == (batch, seq, geo.vocab_size)
    assert t.present[0].shape == (batch, geo.n_kv_heads, past + seq, geo.head_dim)
    np.testing.assert_allclose(t.logits, r.logits, atol=1e-4, rtol=0)


def test_fixed_axis_is_caught(built):
    _, result = built
    proto = load_graph(result.out / "model.onnx")
    check_dynamic_axes(proto)
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 5
    with pytest.raises(VQExportError, match="axis 1 of 'input_ids'.*expected the dynamic axis 'sequence_length'"):
        check_dynamic_axes(proto)


def test_optimized_copy_only_when_the_profile_asks(tmp_path):
    model = make_model(tmp_path / "model")
    profile = tmp_path / "opt.toml"
    profile.write_text('backend = "ort"\nname = "opt"\n[ort]\nsaved_optimization_level = "basic"\n[parity]\nsteps = 2\n')
    result = api.build(str(profile), model=model, out=tmp_path / "art")
    assert (result.out / "model.optimized.onnx").is_file() and (result.out / "model.optimized.onnx.data").is_file()
    ids = np.arange(10).reshape(2, 5) % 97
    mask = np.ones_like(ids)
    with OrtRunner(result.out / "model.onnx") as a, OrtRunner(result.out / "model.optimized.onnx") as b:
        np.testing.assert_allclose(a.step(ids, mask, a.empty_past(2)).logits, b.step(ids, mask, b.empty_past(2)).logits, atol=1e-5)


def test_a_head_constant_name_is_one_value():
    """The head builder reuses a constant asked for twice by the same name; a name already holding another value is
    an error (a silent reuse would feed one term another term's constant)."""
    import onnx_ir as ir

    from vqexport.head.graph import HeadForm, _Builder

    b = _Builder(ir.Graph(inputs=[], outputs=[], nodes=[], opset_imports={"": 18}), HeadForm(), None)
    first = b.const("head/x", [0])
    assert b.const("head/x", [0]) is first and len(b.graph.initializers) == 1
    for other in ([2], [0, 0]):
        with pytest.raises(ValueError, match="'head/x' already holds another value"):
            b.const("head/x", other)
    with pytest.raises(ValueError, match="already holds another value"):
        b.const("head/x", [0], np.int32)  # same numbers, another type

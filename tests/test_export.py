"""Export + ORT parity on small random models of several shapes; the graph contract; dynamic axes."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner
from vqexport.backends.torch_ref import TorchRunner
from vqexport.errors import VQExportError
from vqexport.graph import check_dynamic_axes, find_head

from .conftest import make_checkpoint, make_config

SHAPES = {
    "odd-V": dict(vocab=97, k=11, bias=True),
    "K=1": dict(vocab=50, k=1, bias=True),
    "K=V": dict(vocab=64, k=64, bias=True),
    "no-bias": dict(vocab=101, k=7, bias=False),
    "mqa-qkv-bias": dict(vocab=83, k=5, kv_heads=1, qkv_bias=True, layers=1),
    "dense-head": dict(vocab=90, head="dense", bias=True),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def built(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = make_config(**SHAPES[request.param])
    ckpt = make_checkpoint(tmp / "ckpt", cfg, seed=len(request.param))
    result = api.build("ort", model=ckpt, out=tmp / "art", steps=8)
    return cfg, ckpt, result


def test_parity_passes(built):
    cfg, _, result = built
    r = result.parity
    assert r.passed, r.failures
    assert r.max_abs_diff <= 1e-4
    assert r.top1_agreement == 1.0
    assert r.greedy_match_steps == r.steps == 8


def test_graph_contract(built):
    cfg, _, result = built
    proto = onnx.load(str(result.out / "model.onnx"))
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    names_in = [i.name for i in proto.graph.input]
    names_out = [o.name for o in proto.graph.output]
    assert names_in[:2] == ["input_ids", "attention_mask"]
    assert names_in[2:] == [f"past_key_values.{i}.{k}" for i in range(cfg.n_layers) for k in ("key", "value")]
    assert names_out == ["logits"] + [f"present.{i}.{k}" for i in range(cfg.n_layers) for k in ("key", "value")]
    head = find_head(proto)
    if cfg.head.type == "vq":
        # the ort profile selects with Expand + GatherElements (measured faster than Gather)
        assert head.kind == "vq" and head.matmul.op_type == "MatMul" and head.gather.op_type == "GatherElements"
        assert_vq_head(proto, cfg, api.load_checkpoint(built[1]).tensors["head.map"])
    else:
        assert head.kind == "dense" and head.gather is None
    assert (head.add is not None) == cfg.head.bias
    if cfg.head.bias:
        assert "head.bias" in head.add.input
    onnx.checker.check_model(proto, full_check=True)


def assert_vq_head(proto, cfg, ckpt_map):
    head = find_head(proto)
    inits = {t.name: t for t in proto.graph.initializer}
    axis = next(a.i for a in head.gather.attribute if a.name == "axis")
    assert axis in (-1, 2)
    assert head.matmul.input[1] == "head.codebook_t"
    assert list(inits["head.codebook_t"].dims) == [cfg.d_model, cfg.head.codebook_size]
    mapping = inits["head.map"]
    assert mapping.data_type == onnx.TensorProto.INT32
    np.testing.assert_array_equal(numpy_helper.to_array(mapping).reshape(-1), ckpt_map)


def test_plain_gather_form(tmp_path):
    cfg = make_config(vocab=97, k=11)
    ckpt = make_checkpoint(tmp_path / "ckpt", cfg)
    profile = tmp_path / "gather.toml"
    profile.write_text('backend = "ort"\nname = "gather"\nselect = "gather"\n[parity]\nsteps = 4\n')
    result = api.build(str(profile), model=ckpt, out=tmp_path / "art")
    proto = onnx.load(str(result.out / "model.onnx"))
    head = find_head(proto)
    assert head.gather.op_type == "Gather" and not any(n.op_type == "GatherElements" for n in proto.graph.node)
    assert_vq_head(proto, cfg, api.load_checkpoint(ckpt).tensors["head.map"])
    assert numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "head.map")).shape == (97,)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4


@pytest.mark.parametrize("batch,seq,past", [(1, 1, 0), (3, 1, 7), (1, 6, 0), (4, 2, 3)])
def test_dynamic_axes_really_dynamic(built, batch, seq, past):
    cfg, ckpt, result = built
    rng = np.random.default_rng(batch * 100 + seq * 10 + past)
    ids = rng.integers(0, cfg.vocab_size, size=(batch, past + seq))
    mask = np.ones_like(ids)
    with TorchRunner.from_checkpoint(api.load_checkpoint(ckpt)) as ref, OrtRunner(result.out / "model.onnx") as tgt:
        r0 = ref.step(ids[:, :past], mask[:, :past], ref.empty_past(batch)) if past else None
        past_ref = r0.present if past else ref.empty_past(batch)
        r = ref.step(ids[:, past:], mask, past_ref)
        t = tgt.step(ids[:, past:], mask, past_ref)
    assert t.logits.shape == (batch, seq, cfg.vocab_size)
    assert t.present[0].shape == (batch, cfg.n_kv_heads, past + seq, cfg.head_dim)
    np.testing.assert_allclose(t.logits, r.logits, atol=1e-4, rtol=0)


def test_fixed_axis_is_caught(built):
    _, _, result = built
    proto = onnx.load(str(result.out / "model.onnx"))
    check_dynamic_axes(proto)
    dim = proto.graph.input[0].type.tensor_type.shape.dim[1]
    dim.dim_value = 5
    with pytest.raises(VQExportError, match="axis 1 of 'input_ids'.*expected the dynamic axis 'sequence_length'"):
        check_dynamic_axes(proto)


def test_optimized_model_matches(built):
    cfg, ckpt, result = built
    ids = np.arange(10).reshape(2, 5) % cfg.vocab_size
    mask = np.ones_like(ids)
    with OrtRunner(result.out / "model.onnx") as a, OrtRunner(result.out / "model.optimized.onnx") as b:
        np.testing.assert_allclose(a.step(ids, mask, a.empty_past(2)).logits, b.step(ids, mask, b.empty_past(2)).logits, atol=1e-5)

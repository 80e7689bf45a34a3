"""int8 codebook: the quantizer, the QDQ graph, and parity of int8 artifacts against fp32 PyTorch."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vqexport import api
from vqexport.errors import VQExportError
from vqexport.quant import dequantize_rows, quantize_rows

from .conftest import assert_user_error, make_checkpoint, make_config, run_cli


def test_per_row_symmetric_quantization_error_is_bounded():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((33, 17)).astype(np.float32) * rng.uniform(0.01, 10, size=(33, 1)).astype(np.float32)
    q, scale = quantize_rows(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (33,)
    np.testing.assert_allclose(scale, np.abs(w).max(1) / 127, rtol=1e-6)
    assert (np.abs(dequantize_rows(q, scale) - w) <= scale[:, None] / 2 + 1e-7).all()
    assert np.abs(q).max() == 127


def test_all_zero_rows_do_not_divide_by_zero():
    w = np.zeros((4, 8), np.float32)
    w[2] = np.linspace(-1, 1, 8)
    with np.errstate(all="raise"):
        q, scale = quantize_rows(w)
    assert np.isfinite(scale).all() and (scale > 0).all()
    assert (q[[0, 1, 3]] == 0).all()
    np.testing.assert_array_equal(dequantize_rows(q, scale)[[0, 1, 3]], 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_codebook_cannot_be_quantized(bad):
    w = np.ones((3, 3), np.float32)
    w[1, 2] = bad
    with pytest.raises(VQExportError, match=r"cannot quantize codebook: non-finite value at index \[1, 2\]"):
        quantize_rows(w)


@pytest.fixture(scope="module")
def int8_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "ort-int8"
    return api.build("ort-int8", out=out)


def test_int8_artifact_stores_an_int8_codebook(int8_demo):
    proto = onnx.load(str(int8_demo.out / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    cfg = api.load_checkpoint(api.resolve_checkpoint(None).path).config
    q = inits["head.codebook_q"]
    assert q.data_type == onnx.TensorProto.INT8
    assert list(q.dims) == [cfg.d_model, cfg.head.codebook_size]
    assert "head.codebook_t" not in inits
    scale = numpy_helper.to_array(inits["head.codebook_scale"])
    assert scale.shape == (cfg.head.codebook_size,) and scale.dtype == np.float32
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and dq[0].input[0] == "head.codebook_q"
    assert next(a.i for a in dq[0].attribute if a.name == "axis") == 1
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)


def test_int8_parity_meets_the_goal(int8_demo):
    r = int8_demo.parity
    assert r.passed, r.failures
    assert r.top1_agreement >= 0.99
    assert r.kl_divergence <= 1e-3
    assert r.max_abs_diff > 0  # it is really quantized
    runtime = int8_demo.manifest["runtime"]
    assert runtime["session_config"] == {"session.qdq_matmulnbits_accuracy_level": "4"}


def test_int8_head_bytes_shrink(int8_demo, demo_artifact):
    int8_head = api.inspect(int8_demo.out)["sizes"]["head"]
    fp32_head = api.inspect(demo_artifact)["sizes"]["head"]
    cb32 = fp32_head["tensors"]["head.codebook_t"]["bytes"]
    cb8 = int8_head["tensors"]["head.codebook_q"]["bytes"]
    assert cb8 * 4 == cb32
    assert int8_head["bytes"] < fp32_head["bytes"]


def test_verify_uses_the_recorded_runtime_settings(int8_demo):
    result = run_cli("verify", "--artifact", int8_demo.out, "--steps", 8, "--json")
    assert result.exit_code == 0, result.stderr


def test_int8_with_activation_qdq(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", make_config(vocab=211, k=13, d=64, heads=4, kv_heads=4))
    profile = tmp_path / "act.toml"
    profile.write_text('backend = "ort"\nname = "act"\ncodebook = "int8"\n[int8]\nactivations = true\n'
                       '[parity]\nsteps = 4\natol = 1.0\ntop1_agreement_min = 0.9\nkl_max = 1e-2\ngreedy_must_match = false\n')
    result = api.build(str(profile), model=ckpt, out=tmp_path / "out")
    proto = onnx.load(str(result.out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits["head.hidden_scale"] > 0 and inits["head.hidden_zero_point"].dtype == np.int8
    assert result.parity.passed and result.parity.top1_agreement >= 0.9


def test_int8_needs_a_vq_head(tmp_path):
    ckpt = make_checkpoint(tmp_path / "dense", make_config(head="dense"))
    assert_user_error(run_cli("build", "--target", "ort-int8", "--model", ckpt, "--out", tmp_path / "o"), "dense head")
    assert not (tmp_path / "o").exists()


def test_unknown_int8_encoding(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\ncodebook = "int8"\n[int8]\nencoding = "magic"\n')
    assert_user_error(run_cli("build", "--target", f), "int8.encoding must be")


def test_native_encoding_is_matmulnbits_and_meets_the_goal(tmp_path):
    result = api.build("ort-int8-native", out=tmp_path / "art")
    proto = onnx.load(str(result.out / "model.onnx"))
    (node,) = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in node.attribute}
    assert node.domain == "com.microsoft" and attrs["bits"] == 8 and attrs["accuracy_level"] == 4
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["head.codebook_q"].data_type == onnx.TensorProto.UINT8
    assert not any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    r = result.parity
    assert r.passed and r.top1_agreement >= 0.99 and r.kl_divergence <= 1e-3


def test_native_and_qdq_decode_to_the_same_codebook(tmp_path):
    from vqexport.passes.int8_codebook import native_codebook, quantize_codebook
    from vqexport.backends.ort.runner import OrtRunner

    ckpt = make_checkpoint(tmp_path / "ckpt", make_config(vocab=120, k=9, d=48, heads=4, kv_heads=4))
    fp32 = api.build("ort", model=ckpt, out=tmp_path / "fp32", steps=1)
    base = onnx.load(str(fp32.out / "model.onnx"))
    ids = np.arange(10).reshape(2, 5)
    outs = []
    for proto, cfg in ((quantize_codebook(base), {"session.qdq_matmulnbits_accuracy_level": "0"}),
                       (native_codebook(base, accuracy_level=0), {})):
        with OrtRunner(proto.SerializeToString(), session_config=cfg) as r:
            outs.append(r.step(ids, np.ones_like(ids), r.empty_past(2)).logits)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


def test_native_encoding_errors(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\ncodebook = "int8"\nhead = "fused"\n[int8]\nencoding = "native"\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "cannot feed a fused VQLogits head")
    f.write_text('backend = "ort"\ncodebook = "int8"\n[int8]\nencoding = "native"\nactivations = true\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "QDQ encoding only")
    f.write_text('backend = "ort"\ncodebook = "int8"\n[int8]\naccuracy_level = 9\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "int8.accuracy_level must be")

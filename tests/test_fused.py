"""The fused VQLogits op: reference, function body, the registered ORT kernel (proven to run), int8, errors."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, TensorProto

from vqexport import api
from vqexport.ops import vqlogits
from vqexport.ops.vqlogits import DOMAIN, OP_TYPE, function_proto, kernel_calls, reference

from .conftest import assert_user_error, make_checkpoint, make_config, run_cli


def _single_op_model(select, shape_h, d, K, V):
    node = helper.make_node(OP_TYPE, list(vqlogits.INPUTS), ["logits"], domain=DOMAIN, plugin_namespace="vqexport", plugin_version="1")
    graph = helper.make_graph([node], "g", [
        helper.make_tensor_value_info("hidden", TensorProto.FLOAT, shape_h),
        helper.make_tensor_value_info("codebook_t", TensorProto.FLOAT, [d, K]),
        helper.make_tensor_value_info("map", TensorProto.INT32, [V]),
        helper.make_tensor_value_info("bias", TensorProto.FLOAT, [V]),
    ], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape_h[:-1] + [V])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                             functions=[function_proto(select)])


def _inputs(shape_h, d, K, V, seed=0):
    rng = np.random.default_rng(seed)
    return {"hidden": rng.standard_normal(shape_h).astype(np.float32), "codebook_t": rng.standard_normal((d, K)).astype(np.float32),
            "map": rng.integers(0, K, V).astype(np.int32), "bias": rng.standard_normal(V).astype(np.float32)}


def test_reference_is_the_definition():
    x = _inputs((2, 3, 8), 8, 5, 40)
    z = x["hidden"] @ x["codebook_t"]
    expected = np.stack([z[..., x["map"][v]] + x["bias"][v] for v in range(40)], -1)
    np.testing.assert_allclose(reference(**{"hidden": x["hidden"], "codebook_t": x["codebook_t"], "mapping": x["map"], "bias": x["bias"]}), expected, rtol=1e-6)


@pytest.mark.parametrize("select", ["gather", "gather_elements"])
@pytest.mark.parametrize("shape_h", [(1, 1, 16), (3, 7, 16), (5, 16)])
def test_function_body_matches_reference_without_a_kernel(select, shape_h):
    model = _single_op_model(select, ["b"] * (len(shape_h) - 1) + [16], 16, 9, 61)
    onnx.checker.check_model(model, full_check=True)
    x = _inputs(shape_h, 16, 9, 61)
    before = kernel_calls()
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert kernel_calls() == before  # no kernel registered on this session: the function body ran
    np.testing.assert_allclose(out, reference(x["hidden"], x["codebook_t"], x["map"], x["bias"]), atol=1e-5)


def test_registered_kernel_runs_and_matches():
    pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions is not installed")
    model = _single_op_model("gather", ["b", "s", 16], 16, 9, 61)
    so = ort.SessionOptions()
    so.register_custom_ops_library(vqlogits.register_ort_kernel())
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = _inputs((2, 4, 16), 16, 9, 61, seed=3)
    before = kernel_calls()
    out = sess.run(None, x)[0]
    assert kernel_calls() == before + 1  # the kernel, not the function body, ran
    np.testing.assert_allclose(out, reference(x["hidden"], x["codebook_t"], x["map"], x["bias"]), atol=1e-6)


def _profile(tmp_path, kernel="extensions", codebook="fp32", select="gather_elements"):
    f = tmp_path / f"fused-{kernel}-{codebook}.toml"
    tol = 'atol = 1e-4\nkl_max = 1e-6' if codebook == "fp32" else 'atol = 1.0\nkl_max = 1e-2\ntop1_agreement_min = 0.9\ngreedy_must_match = false'
    f.write_text(f'backend = "ort"\nname = "fused"\nhead = "fused"\ncodebook = "{codebook}"\nselect = "{select}"\n'
                 f'[ort]\nkernel = "{kernel}"\n[parity]\nsteps = 4\n{tol}\n')
    return f


@pytest.mark.parametrize("bias", [True, False])
def test_fused_artifact_with_kernel(tmp_path, bias):
    pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions is not installed")
    ckpt = make_checkpoint(tmp_path / "ckpt", make_config(vocab=97, k=11, bias=bias))
    before = kernel_calls()
    result = api.build(str(_profile(tmp_path)), model=ckpt, out=tmp_path / "art")
    assert kernel_calls() > before
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    proto = onnx.load(str(result.out / "model.onnx"))
    (node,) = [n for n in proto.graph.node if n.op_type == OP_TYPE]
    assert node.domain == DOMAIN
    attrs = {a.name: a.s.decode() for a in node.attribute}
    assert attrs == {"plugin_namespace": "vqexport", "plugin_version": "1"}
    assert [f.name for f in proto.functions] == [OP_TYPE]
    assert result.manifest["runtime"]["custom_ops"] == "onnxruntime-extensions"
    # verify and generate paths load the kernel from what the manifest records
    n = kernel_calls()
    assert run_cli("verify", "--artifact", result.out, "--steps", 2).exit_code == 0
    assert kernel_calls() > n


def test_fused_artifact_function_only(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", make_config(vocab=97, k=11))
    before = kernel_calls()
    result = api.build(str(_profile(tmp_path, kernel="function", select="gather")), model=ckpt, out=tmp_path / "art")
    assert kernel_calls() == before
    assert result.parity.passed and result.manifest["runtime"]["custom_ops"] is None


def test_fused_int8(tmp_path):
    pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions is not installed")
    ckpt = make_checkpoint(tmp_path / "ckpt", make_config(vocab=150, k=12, d=64, heads=4, kv_heads=4))
    result = api.build(str(_profile(tmp_path, codebook="int8")), model=ckpt, out=tmp_path / "art")
    proto = onnx.load(str(result.out / "model.onnx"))
    producer = {o: n for n in proto.graph.node for o in n.output}
    fused = next(n for n in proto.graph.node if n.op_type == OP_TYPE)
    assert producer[fused.input[1]].op_type == "DequantizeLinear"
    assert next(t for t in proto.graph.initializer if t.name == "head.codebook_q").data_type == onnx.TensorProto.INT8
    assert result.parity.passed


def test_head_flag_on_the_cli(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", make_config(vocab=97, k=11))
    r = run_cli("build", "--model", ckpt, "--out", tmp_path / "art", "--head", "fused", "--steps", 2, "--json")
    assert r.exit_code == 0, r.stderr
    assert any(n.op_type == OP_TYPE for n in onnx.load(str(tmp_path / "art" / "model.onnx")).graph.node)


def test_fused_errors(tmp_path, monkeypatch):
    dense = make_checkpoint(tmp_path / "dense", make_config(head="dense"))
    assert_user_error(run_cli("build", "--model", dense, "--head", "fused", "--out", tmp_path / "o"), "dense head")
    f = tmp_path / "bad.toml"
    f.write_text('backend = "ort"\nhead = "fused"\n[decode]\nmode = "topk"\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "cannot be combined with decode.mode")
    # a runtime with neither the kernel package nor (by request) the function body
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    monkeypatch.setattr(vqlogits, "_registered", [])
    ckpt = make_checkpoint(tmp_path / "ckpt", make_config())
    assert_user_error(run_cli("build", "--model", ckpt, "--head", "fused", "--out", tmp_path / "o"), "needs onnxruntime-extensions")
    assert not (tmp_path / "o").exists()

"""The fused VQLogits op: reference, function body, the registered ORT kernel (proven to run), fused artifacts
(kernel and function body), int8, the --head flag, and errors."""

import importlib.util
import shutil
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vqexport import api
from vqexport.graph_io import load_graph
from vqexport.head.graph import FUSED_NODE, HeadForm, head_model
from vqexport.head.spec import write_head
from vqexport.ops import vqlogits
from vqexport.ops.vqlogits import DOMAIN, OP_TYPE, function_proto, kernel_calls, reference

from .conftest import assert_user_error, run_cli
from .models import make_model, random_head


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


def _session(model_bytes, kernel: bool):
    so = ort.SessionOptions()
    if kernel:
        so.register_custom_ops_library(vqlogits.register_ort_kernel())
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def _copy_trunk(src, dst, head=None):
    """The model directory ``src`` without its head (``head``: with that head instead)."""
    dst.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(src / name, dst / name)
    if head is not None:
        write_head(dst, head)
    return dst


# -- the op ----------------------------------------------------------------------------------------------------------

def test_reference_is_the_definition():
    x = _inputs((2, 3, 8), 8, 5, 40)
    z = x["hidden"] @ x["codebook_t"]
    expected = np.stack([z[..., x["map"][v]] + x["bias"][v] for v in range(40)], -1)
    np.testing.assert_allclose(reference(x["hidden"], x["codebook_t"], x["map"], x["bias"]), expected, rtol=1e-6)


@pytest.mark.parametrize("select", ["gather", "gather_elements"])
@pytest.mark.parametrize("shape_h", [(1, 1, 16), (3, 7, 16), (5, 16)])
def test_function_body_matches_reference_without_a_kernel(select, shape_h):
    model = _single_op_model(select, ["b"] * (len(shape_h) - 1) + [16], 16, 9, 61)
    onnx.checker.check_model(model, full_check=True)
    x = _inputs(shape_h, 16, 9, 61)
    before = kernel_calls()
    out = _session(model.SerializeToString(), kernel=False).run(None, x)[0]
    assert kernel_calls() == before  # no kernel registered on this session: the function body ran
    np.testing.assert_allclose(out, reference(x["hidden"], x["codebook_t"], x["map"], x["bias"]), atol=1e-5)


def test_registered_kernel_runs_and_matches():
    assert importlib.util.find_spec("onnxruntime_extensions"), "onnxruntime-extensions, a test dependency ('.[test]'), is missing"
    model = _single_op_model("gather", ["b", "s", 16], 16, 9, 61)
    sess = _session(model.SerializeToString(), kernel=True)
    x = _inputs((2, 4, 16), 16, 9, 61, seed=3)
    before = kernel_calls()
    out = sess.run(None, x)[0]
    assert kernel_calls() == before + 1  # the kernel, not the function body, ran
    np.testing.assert_allclose(out, reference(x["hidden"], x["codebook_t"], x["map"], x["bias"]), atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("select", ["gather", "gather_elements"])
def test_fused_head_graph_equals_the_head(bias, select):
    """The fused head built by vqexport.head.graph: kernel = function body = the head's definition."""
    assert importlib.util.find_spec("onnxruntime_extensions"), "onnxruntime-extensions, a test dependency ('.[test]'), is missing"
    head = random_head(97, 32, 11, bias=bias, seed=4)
    proto = ir.to_proto(head_model(head, HeadForm(fused=True, select=select)))
    onnx.checker.check_model(proto, full_check=True)
    (node,) = proto.graph.node  # the whole head is one node
    assert node.op_type == OP_TYPE and node.domain == DOMAIN and node.name == FUSED_NODE
    assert list(node.input) == ["hidden_states", "head.codebook_t", "head.map", "head.bias"]
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits["head.map"].dtype == np.int32 and inits["head.map"].shape == (97,)
    if not bias:  # the op always takes a bias: zeros for a head without one
        np.testing.assert_array_equal(inits["head.bias"], 0)
    h = np.random.default_rng(5).standard_normal((2, 3, 32)).astype(np.float32)
    before = kernel_calls()
    with_kernel = _session(proto.SerializeToString(), kernel=True).run(None, {"hidden_states": h})[0]
    assert kernel_calls() == before + 1
    body = _session(proto.SerializeToString(), kernel=False).run(None, {"hidden_states": h})[0]
    assert kernel_calls() == before + 1
    np.testing.assert_allclose(with_kernel, head.logits(h), atol=1e-5)
    np.testing.assert_allclose(body, head.logits(h), atol=1e-5)


# -- fused artifacts -------------------------------------------------------------------------------------------------

def _profile(tmp_path, kernel="extensions", codebook="fp32", select="gather_elements"):
    f = tmp_path / f"fused-{kernel}-{codebook}-{select}.toml"
    tol = 'atol = 1e-4\nkl_max = 1e-6' if codebook == "fp32" else 'atol = 1.0\nkl_max = 1e-2\ntop1_agreement_min = 0.9\ngreedy_must_match = false'
    f.write_text(f'backend = "ort"\nname = "fused"\nhead = "fused"\ncodebook = "{codebook}"\nselect = "{select}"\n'
                 f'[ort]\nkernel = "{kernel}"\n[parity]\nsteps = 4\n{tol}\n')
    return f


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("fused") / "model")


def test_fused_artifact_with_kernel(model, tmp_path):
    assert importlib.util.find_spec("onnxruntime_extensions"), "onnxruntime-extensions, a test dependency ('.[test]'), is missing"
    before = kernel_calls()
    result = api.build(str(_profile(tmp_path)), model=model, out=tmp_path / "art")
    assert kernel_calls() > before  # parity ran the registered kernel
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    proto = load_graph(result.out / "model.onnx")
    (node,) = [n for n in proto.graph.node if n.op_type == OP_TYPE]
    assert node.domain == DOMAIN and node.name == FUSED_NODE
    assert node.input[0] == "hidden_states" and list(node.input[1:]) == ["head.codebook_t", "head.map", "head.bias"]
    attrs = {a.name: a.s.decode() for a in node.attribute}
    assert attrs == {"plugin_namespace": "vqexport", "plugin_version": "1"}
    assert [(f.domain, f.name) for f in proto.functions] == [(DOMAIN, OP_TYPE)]
    assert not [n for n in proto.graph.node if n.name.startswith("head/") and n.op_type != OP_TYPE]
    assert result.manifest["runtime"]["custom_ops"] == "onnxruntime-extensions"
    # verify and generate paths load the kernel from what the manifest records
    n = kernel_calls()
    assert run_cli("verify", "--artifact", result.out, "--steps", 2).exit_code == 0
    assert kernel_calls() > n


def test_fused_artifact_function_only(model, tmp_path):
    before = kernel_calls()
    result = api.build(str(_profile(tmp_path, kernel="function", select="gather")), model=model, out=tmp_path / "art")
    assert kernel_calls() == before  # ONNX Runtime inlined the function body
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    assert result.manifest["runtime"]["custom_ops"] is None
    proto = load_graph(result.out / "model.onnx")
    fn = proto.functions[0]
    assert [n.op_type for n in fn.node] == ["MatMul", "Gather", "Add"]  # the body for the profile's select


def test_fused_int8(model, tmp_path):
    assert importlib.util.find_spec("onnxruntime_extensions"), "onnxruntime-extensions, a test dependency ('.[test]'), is missing"
    result = api.build(str(_profile(tmp_path, codebook="int8")), model=model, out=tmp_path / "art")
    proto = load_graph(result.out / "model.onnx")
    producer = {o: n for n in proto.graph.node for o in n.output}
    fused = next(n for n in proto.graph.node if n.op_type == OP_TYPE)
    dq = producer[fused.input[1]]
    assert dq.op_type == "DequantizeLinear" and dq.input[0] == "head.codebook_q"
    assert next(t for t in proto.graph.initializer if t.name == "head.codebook_q").data_type == onnx.TensorProto.INT8
    assert "head.codebook_t" not in {t.name for t in proto.graph.initializer}
    assert result.parity.passed and result.parity.max_abs_diff > 0


def test_head_flag_on_the_cli(model, tmp_path):
    import json

    r = run_cli("build", "--model", model, "--out", tmp_path / "art", "--head", "fused", "--steps", 2, "--json")
    assert r.exit_code == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["target"] == "ort-fused" and manifest["profile"]["head"] == "fused"
    assert [n.op_type for n in load_graph(tmp_path / "art" / "model.onnx").graph.node].count(OP_TYPE) == 1
    r = run_cli("build", "--model", model, "--out", tmp_path / "std", "--target", "ort-fused", "--head", "standard", "--steps", 2)
    assert r.exit_code == 0, r.stderr
    assert OP_TYPE not in {n.op_type for n in load_graph(tmp_path / "std" / "model.onnx").graph.node}


# -- errors ----------------------------------------------------------------------------------------------------------

def test_fused_errors(model, tmp_path, monkeypatch):
    out = tmp_path / "o"
    dense = _copy_trunk(model, tmp_path / "dense")
    assert_user_error(run_cli("build", "--model", dense, "--head", "fused", "--out", out), "no VQ-Logits head")
    f = tmp_path / "topk.toml"
    f.write_text('backend = "ort"\nhead = "fused"\n[decode]\nmode = "topk"\n')
    assert_user_error(run_cli("build", "--target", f, "--model", model, "--out", out), "cannot be combined with decode.mode")
    f = tmp_path / "native.toml"
    f.write_text('backend = "ort"\ncodebook = "int8"\nhead = "fused"\n[int8]\nencoding = "native"\n')
    assert_user_error(run_cli("build", "--target", f, "--model", model, "--out", out), "cannot feed a fused VQLogits head")
    # the registered kernel computes the 4-input form only: a rank-r head needs the function body
    ranked = _copy_trunk(model, tmp_path / "ranked", head=random_head(97, 32, 11, rank=2))
    assert_user_error(run_cli("build", "--target", "ort-fused", "--model", ranked, "--out", out),
                      "4-input form only", "rank-2 correction", 'kernel = "function"')
    # a runtime with neither the kernel package nor (by request) the function body
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    monkeypatch.setattr(vqlogits, "_registered", [])
    assert_user_error(run_cli("build", "--model", model, "--head", "fused", "--out", out), "needs onnxruntime-extensions")
    assert not out.exists()

"""The TensorRT readiness check, on CPU: each reason it exists for, and the --check-only CLI (exit 2, nothing written)."""

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from vqexport.backends.trt.prepare import LOWRANK_OP_TYPE, prepare_for_trt
from vqexport.backends.trt.readiness import check, op_list
from vqexport.build import apply_passes
from vqexport.checkpoint import resolve_checkpoint
from vqexport.export import export_onnx
from vqexport.model import from_tensors
from vqexport.profiles import load_profile
from vqexport.target_options import ShapeRange

from .conftest import assert_user_error, make_checkpoint, run_cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return resolve_checkpoint(make_checkpoint(tmp_path_factory.mktemp("trt") / "ckpt", max_position=2048))


@pytest.fixture(scope="module")
def exported(ckpt):
    return export_onnx(from_tensors(ckpt.config, ckpt.tensors), opset=18)


def graph_for(exported, ckpt, target):
    profile = load_profile(target)
    return prepare_for_trt(apply_passes(exported, profile, ckpt)), profile


def edited(proto, fn):
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    fn(out.graph)
    return out


def one_reason(report, *fragments):
    hits = [r for r in report.reasons if all(f in r for f in fragments)]
    assert not report.passed and hits, report.reasons
    return hits[0]


def test_op_list_is_data_with_its_source():
    ops = op_list()
    assert ops["tensorrt"] and "onnx-tensorrt" in ops["source"] and ops["opset_min"] <= 18 <= ops["opset_max"]
    assert {"MatMul", "Gather", "GatherElements", "DequantizeLinear", "QuantizeLinear", "Softmax"} <= set(ops["supported"])
    assert not set(ops["supported"]) & set(ops["unsupported"])


@pytest.mark.parametrize("target", ["trt", "trt-int8", "triton-trt"])
def test_bundled_trt_targets_are_ready(exported, ckpt, target):
    graph, profile = graph_for(exported, ckpt, target)
    report = check(graph, profile, ckpt.config)
    assert report.passed, report.reasons
    assert report.largest["prefill"]["elements"] >= 8 * 512 * ckpt.config.vocab_size  # logits at the max shapes


def test_plugin_graph_has_no_function_body_and_keeps_the_parser_attributes(exported, ckpt):
    graph, _ = graph_for(exported, ckpt, "trt")
    node = next(n for n in graph.graph.node if n.op_type == "VQLogits")
    attrs = {a.name: a.s.decode() for a in node.attribute}
    assert attrs == {"plugin_namespace": "vqexport", "plugin_version": "1"}
    assert not [f for f in graph.functions if f.name == "VQLogits"]  # the parser would import the body, not the plugin


def test_six_input_node_becomes_the_lowrank_plugin():
    node = helper.make_node("VQLogits", ["h", "c", "m", "b", "p", "u"], ["y"], domain="ai.onnx.contrib", plugin_namespace="vqexport")
    model = helper.make_model(helper.make_graph([node], "g", [], []))
    assert prepare_for_trt(model).graph.node[0].op_type == LOWRANK_OP_TYPE


def test_unsupported_op_is_named(exported, ckpt):
    graph, profile = graph_for(exported, ckpt, "trt")

    def swap(g):
        n = next(n for n in g.node if n.op_type == "Sigmoid")
        n.op_type = "Unique"
    reason = one_reason(check(edited(graph, swap), profile, ckpt.config), "Unique", "not one TensorRT's ONNX parser supports")
    assert op_list()["tensorrt"] in reason


def test_non_plugin_custom_op_is_named(exported, ckpt):
    graph, profile = graph_for(exported, ckpt, "trt")

    def swap(g):
        n = next(n for n in g.node if n.op_type == "Sigmoid")
        n.op_type, n.domain = "FastSigmoid", "com.example"
    one_reason(check(edited(graph, swap), profile, ckpt.config), "com.example::FastSigmoid", "plugin_namespace")


def test_native_int8_matmulnbits_is_not_tensorrt_ready(exported, ckpt):
    from vqexport.passes.int8_codebook import native_codebook

    profile = load_profile("trt-int8")
    one_reason(check(native_codebook(exported), profile, ckpt.config), "MatMulNBits")


def test_int64_map_for_the_plugin_is_refused(exported, ckpt):
    graph, profile = graph_for(exported, ckpt, "trt")

    def widen(g):
        i = next(i for i, t in enumerate(g.initializer) if t.name == "head.map")
        g.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(g.initializer[i]).astype(np.int64), "head.map"))
    one_reason(check(edited(graph, widen), profile, ckpt.config), "head.map", "INT64", "int32")


def test_plugin_name_colliding_with_a_standard_op(exported, ckpt):
    graph, profile = graph_for(exported, ckpt, "trt")

    def rename(g):
        next(n for n in g.node if n.op_type == "VQLogits").op_type = "Gather"
    one_reason(check(edited(graph, rename), profile, ckpt.config), "plugin op Gather collides")


def test_tensor_over_2_pow_31_at_max_shapes(exported, ckpt):
    graph, profile = graph_for(exported, ckpt, "trt")
    big = dataclasses.replace(profile, trt=dataclasses.replace(profile.trt, prefill_batch=ShapeRange(1, 1, 100_000)))
    reason = one_reason(check(graph, big, ckpt.config), "2^31", "prefill")
    assert "'logits'" in " ".join(check(graph, big, ckpt.config).reasons) and "prefill.batch" in reason
    assert check(graph, profile, ckpt.config).passed  # the same graph at the bundled shapes


def test_quantize_without_dequantize(exported, ckpt):
    graph, profile = graph_for(exported, ckpt, "trt-int8")

    def orphan_q(g):
        g.initializer.extend([numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "z")])
        src = next(n for n in g.node if n.op_type == "Sigmoid").output[0]
        g.node.append(helper.make_node("QuantizeLinear", [src, "s", "z"], ["q_orphan"], name="orphan/Q"))
        g.node.append(helper.make_node("Relu", ["q_orphan"], ["r"], name="orphan/Relu"))
    one_reason(check(edited(graph, orphan_q), profile, ckpt.config), "orphan/Q", "not its DequantizeLinear")


def test_int8_gemm_needs_qdq_on_both_inputs(exported, ckpt):
    from vqexport.passes.int8_codebook import quantize_codebook

    profile = load_profile("trt-int8")
    weights_only = prepare_for_trt(quantize_codebook(exported))  # no Q/DQ on the hidden state
    one_reason(check(weights_only, profile, ckpt.config), "input 0", "Q/DQ on both inputs")


def test_nonzero_zero_point_and_large_topk(exported, ckpt):
    graph, profile = graph_for(exported, ckpt, "trt-int8")

    def zp(g):
        t = next(t for t in g.initializer if t.name == "head.hidden_zero_point")
        t.CopyFrom(numpy_helper.from_array(np.array(3, np.int8), t.name))
        g.initializer.append(numpy_helper.from_array(np.array([4000], np.int64), "k_big"))
        src = next(n for n in g.node if n.op_type == "Sigmoid").output[0]
        g.node.append(helper.make_node("TopK", [src, "k_big"], ["tv", "ti"], name="big/TopK", axis=-1))
    report = check(edited(graph, zp), profile, ckpt.config)
    one_reason(report, "zero point must be 0")
    one_reason(report, "big/TopK", "4000")


def test_check_only_cli_names_each_reason_exit_2(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from vqexport.profiles import bundled_dir

    toml = (bundled_dir() / "trt.toml").read_text().replace("batch = [1, 1, 8]\nsequence", "batch = [1, 1, 200000]\nsequence")
    (tmp_path / "huge.toml").write_text(toml.replace('name = "trt"', 'name = "huge"'))
    result = run_cli("build", "--target", tmp_path / "huge.toml", "--model", ckpt.path, "--check-only", "--json")
    assert_user_error(result, "not ready for TensorRT", "2^31", "'logits'")
    import json

    report = json.loads(result.stdout)  # --json: the readiness report on stdout, the one-line error on stderr
    assert report["passed"] is False and report["reasons"] and report["op_list"]["source"]
    assert report["largest"]["prefill"]["elements"] > 2**31
    assert not (tmp_path / "build").exists()


def test_check_only_refuses_a_non_trt_target(ckpt):
    assert_user_error(run_cli("build", "--target", "ort", "--model", ckpt.path, "--check-only"), "--check-only", "backend 'ort'")


def test_fp16_trunk_keeps_the_head_fp32(exported, ckpt):
    graph, profile = graph_for(exported, ckpt, "triton-trt")
    assert check(graph, profile, ckpt.config).passed
    types = {t.name: t.data_type for t in graph.graph.initializer}
    assert types["head.codebook_t"] == onnx.TensorProto.FLOAT and types["head.bias"] == onnx.TensorProto.FLOAT
    assert any(t == onnx.TensorProto.FLOAT16 for n, t in types.items() if n.startswith("layers."))


def test_a_head_left_in_fp16_is_named(exported, ckpt, monkeypatch):
    from vqexport.passes import fp16_trunk

    monkeypatch.setattr(fp16_trunk, "head_nodes", lambda proto: set())  # a cast that forgets the head
    graph, profile = graph_for(exported, ckpt, "triton-trt")
    one_reason(check(graph, profile, ckpt.config), "FLOAT16", "the head must compute in fp32")

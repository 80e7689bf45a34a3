"""The TensorRT readiness check, on CPU: each reason it exists for, and the --check-only CLI (exit 2, nothing written).

Graphs are the embedded demo's (``write_graph``, the trunk exported once per process) or standalone head graphs
(``head_model``), mutated where a test needs a graph the exporter would never write.
"""

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from vqexport import api
from vqexport.backends.trt.prepare import LOWRANK_OP_TYPE, prepare_for_trt
from vqexport.backends.trt.readiness import check, op_list
from vqexport.errors import VQExportError
from vqexport.graph_io import load_graph
from vqexport.head.graph import CODEBOOK_MATMUL, FUSED_NODE, HeadForm, head_model
from vqexport.head.spec import make_head
from vqexport.profiles import bundled_dir, load_profile
from vqexport.source import resolve_source
from vqexport.target_options import ShapeRange

from .conftest import assert_user_error, run_cli

GEO = resolve_source(None).geometry  # the embedded demo's
V = GEO.vocab_size


@pytest.fixture(scope="module")
def demo():
    from vqexport.build import reference_runner

    source = resolve_source(None)
    return source, reference_runner(source)


@pytest.fixture(scope="module")
def graph_of(demo, tmp_path_factory):
    """target -> (the graph TensorRT's parser would see, the profile, the graph as saved); each written once."""
    from vqexport.build import write_graph

    source, reference = demo
    cache = {}

    def get(target):
        if target not in cache:
            profile = load_profile(target)
            d = tmp_path_factory.mktemp(target)
            write_graph(d, profile, source, reference)
            saved = load_graph(d / "model.onnx")
            cache[target] = (prepare_for_trt(saved), profile, saved)
        return cache[target]
    return get


def edited(proto, fn):
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    fn(out.graph)
    return out


def node(g, name=None, op_type=None):
    return next(n for n in g.node if (name is None or n.name == name) and (op_type is None or n.op_type == op_type))


def replace_initializer(g, name, array):
    i = next(i for i, t in enumerate(g.initializer) if t.name == name)
    g.initializer[i].CopyFrom(numpy_helper.from_array(array, name))


def one_reason(report, *fragments):
    hits = [r for r in report.reasons if all(f in r for f in fragments)]
    assert not report.passed and hits, (fragments, report.reasons)
    return hits[0]


def test_op_list_is_data_with_its_source():
    ops = op_list()
    assert ops["tensorrt"] and "onnx-tensorrt" in ops["source"] and ops["opset_min"] <= 18 <= ops["opset_max"]
    assert {"MatMul", "Gather", "GatherElements", "DequantizeLinear", "QuantizeLinear", "Softmax", "TopK"} <= set(ops["supported"])
    assert "Unique" not in ops["supported"]
    assert not set(ops["supported"]) & set(ops.get("unsupported", []))
    assert ops["restrictions"]["topk_k_max"] > 0 and "DequantizeLinear" in ops["restrictions"]["zero_point_must_be_zero"]


@pytest.mark.parametrize("target", ["trt", "trt-int8", "triton-trt"])
def test_bundled_trt_targets_are_ready(target):
    report = api.check_readiness(target)  # the embedded demo, on CPU
    assert report.passed, report.reasons
    assert report.target == target and report.op_list["source"] == op_list()["source"]
    assert report.largest["prefill"]["elements"] == 8 * 512 * V  # the logits at the prefill profile's max shapes
    assert set(report.largest) == {"prefill", "decode"} and report.largest["decode"]["elements"] < 8 * 512 * V
    profile = load_profile(target)
    if profile.head == "fused":
        assert report.ops["ai.onnx.contrib::VQLogits"] == 1
    if profile.codebook == "int8":
        assert report.ops["QuantizeLinear"] >= 1 and report.ops["DequantizeLinear"] >= 2


def test_check_only_cli_reports_a_ready_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run_cli("build", "--target", "trt-int8", "--check-only")
    assert result.exit_code == 0, result.stderr
    assert "READY" in result.stdout and "NOT READY" not in result.stdout and op_list()["source"] in result.stdout
    assert list(tmp_path.iterdir()) == []  # --check-only writes nothing


def test_plugin_graph_has_no_function_body_and_keeps_the_parser_attributes(graph_of):
    graph, _, saved = graph_of("trt")
    n = node(graph.graph, FUSED_NODE)
    assert n.op_type == "VQLogits" and list(n.input) == ["hidden_states", "head.codebook_t", "head.map", "head.bias"]
    attrs = {a.name: a.s.decode() for a in n.attribute}
    assert attrs == {"plugin_namespace": "vqexport", "plugin_version": "1"}
    assert [f for f in saved.functions if f.name == "VQLogits"]  # the saved graph carries the body for other runtimes
    assert not [f for f in graph.functions if f.name == "VQLogits"]  # the parser would import the body, not the plugin


def _demo_head(rank=0):
    head = resolve_source(None).head
    t = {"codebook": head.codebook, "map": head.map, "bias": head.bias}
    if rank:
        rng = np.random.default_rng(0)
        t["lowrank_p"] = rng.standard_normal((rank, head.config.hidden_size)).astype(np.float32) * 0.1
        t["lowrank_u"] = rng.standard_normal((head.config.vocab_size, rank)).astype(np.float32)
    return make_head(t)


@pytest.mark.parametrize("rank,op_type", [(0, "VQLogits"), (4, LOWRANK_OP_TYPE)])
def test_a_six_input_fused_node_becomes_the_lowrank_plugin(rank, op_type):
    proto = ir.to_proto(head_model(_demo_head(rank), HeadForm(fused=True)))
    assert len(node(proto.graph, FUSED_NODE).input) == (6 if rank else 4)
    graph = prepare_for_trt(proto)
    n = node(graph.graph, FUSED_NODE)
    assert n.op_type == op_type and not [f for f in graph.functions if f.name == "VQLogits"]
    assert proto.graph.node[0].op_type == "VQLogits"  # the saved graph is left as it is
    report = check(graph, load_profile("trt"), GEO)
    assert report.passed, report.reasons  # a plugin vqexport provides, int32 map, fp32 head


def test_unsupported_op_is_named(graph_of):
    graph, profile, _ = graph_of("trt")

    def swap(g):
        node(g, op_type="Sigmoid").op_type = "Unique"
    reason = one_reason(check(edited(graph, swap), profile, GEO), "Unique", "not one TensorRT's ONNX parser supports")
    assert op_list()["tensorrt"] in reason


def test_non_plugin_custom_op_is_named(graph_of):
    graph, profile, _ = graph_of("trt")

    def swap(g):
        n = node(g, op_type="Sigmoid")
        n.op_type, n.domain = "FastSigmoid", "com.example"
    one_reason(check(edited(graph, swap), profile, GEO), "com.example::FastSigmoid", "plugin_namespace")


def test_native_int8_matmulnbits_is_not_tensorrt_ready():
    proto = ir.to_proto(head_model(_demo_head(), HeadForm(codebook="int8", int8_encoding="native")))
    report = check(prepare_for_trt(proto), load_profile("trt-int8"), GEO)
    one_reason(report, "com.microsoft::MatMulNBits", "neither a standard op nor a TensorRT plugin")
    one_reason(report, "must be a standard MatMul for TensorRT", "MatMulNBits")


def test_int64_map_for_the_plugin_is_refused(graph_of):
    graph, profile, _ = graph_of("trt")
    one_reason(check(edited(graph, lambda g: replace_initializer(g, "head.map", np.zeros(V, np.int64))), profile, GEO),
               "head.map", "INT64", "int32")


def test_plugin_name_colliding_with_a_standard_op(graph_of):
    graph, profile, _ = graph_of("trt")

    def rename(g):
        node(g, FUSED_NODE).op_type = "Gather"
    one_reason(check(edited(graph, rename), profile, GEO), "plugin op Gather collides")


def test_a_foreign_plugin_is_named(graph_of):
    graph, profile, _ = graph_of("trt")

    def rename(g):
        n = node(g, FUSED_NODE)
        n.op_type = "VQLogitsV2"
    one_reason(check(edited(graph, rename), profile, GEO), "VQLogitsV2", "not one vqexport provides")


def test_tensor_over_2_pow_31_at_max_shapes(graph_of):
    graph, profile, _ = graph_of("trt")
    big = dataclasses.replace(profile, trt=dataclasses.replace(profile.trt, prefill_batch=ShapeRange(1, 1, 100_000)))
    report = check(graph, big, GEO)
    reason = one_reason(report, "2^31", "prefill", "'logits'")
    assert "prefill.batch" in reason and "[100000, 512, 8192]" in reason
    assert not [r for r in report.reasons if "decode" in r]  # the decode profile is unchanged and fits
    assert check(graph, profile, GEO).passed  # the same graph at the bundled shapes


@pytest.mark.parametrize("mutation,fragments", [
    ("drop_dq", [("head/hidden/QuantizeLinear", "feeds MatMul", "not its DequantizeLinear"),
                 (CODEBOOK_MATMUL, "input 0", "Q/DQ on both inputs")]),
    ("drop_q", [("head/hidden/DequantizeLinear", "DequantizeLinear of activation", "has no QuantizeLinear")]),
    ("orphan_q", [("orphan/Q", "has no DequantizeLinear")]),
])
def test_quantize_and_dequantize_come_in_pairs(graph_of, mutation, fragments):
    graph, profile, _ = graph_of("trt-int8")

    def mutate(g):
        q, dq = node(g, "head/hidden/QuantizeLinear"), node(g, "head/hidden/DequantizeLinear")
        mm = node(g, CODEBOOK_MATMUL)
        if mutation == "drop_dq":  # the MatMul reads the int8 codes directly
            mm.input[0] = q.output[0]
            g.node.remove(dq)
        elif mutation == "drop_q":  # the DequantizeLinear reads the fp32 activation
            dq.input[0] = q.input[0]
            g.node.remove(q)
        else:
            src = node(g, op_type="Sigmoid").output[0]
            g.node.append(helper.make_node("QuantizeLinear", [src, q.input[1], q.input[2]], ["q_orphan"], name="orphan/Q"))
    report = check(edited(graph, mutate), profile, GEO)
    for f in fragments:
        one_reason(report, *f)


def test_int8_gemm_needs_qdq_on_both_inputs():
    weights_only = ir.to_proto(head_model(_demo_head(), HeadForm(codebook="int8", activations=False)))
    report = check(prepare_for_trt(weights_only), load_profile("trt-int8"), GEO)
    reason = one_reason(report, "input 0", "Q/DQ on both inputs")
    assert "'hidden_states'" in reason and not [r for r in report.reasons if "input 1" in r]  # the codebook has its DQ


def test_nonzero_zero_point_and_large_topk(graph_of):
    graph, profile, _ = graph_of("trt-int8")

    def zp(g):
        replace_initializer(g, "head.hidden_zero_point", np.array([3], np.int8))
        g.initializer.append(numpy_helper.from_array(np.array([4000], np.int64), "k_big"))
        src = node(g, op_type="Sigmoid").output[0]
        g.node.append(helper.make_node("TopK", [src, "k_big"], ["tv", "ti"], name="big/TopK", axis=2))
    report = check(edited(graph, zp), profile, GEO)
    one_reason(report, "head/hidden/QuantizeLinear", "zero point must be 0")
    one_reason(report, "head/hidden/DequantizeLinear", "zero point must be 0")
    one_reason(report, "big/TopK", "4000", f"k < {op_list()['restrictions']['topk_k_max']}")


def test_constants_stored_beside_the_graph_are_read_from_its_directory(tmp_path):
    """A rank-r head's int8 U has one zero point per token: V of them, which a saved graph keeps in its external
    data. The check reads them from the graph's directory (the graph itself is loaded without its weights)."""
    profile = load_profile("trt-int8")
    head = head_model(_demo_head(4), profile.head_form(), scales={"hidden": 0.05, "lowrank": 0.05})

    def saved(name, zero_point):
        proto = ir.to_proto(head)
        replace_initializer(proto.graph, "head.lowrank_u_zero_point", np.full(V, zero_point, np.int8))
        d = tmp_path / name
        d.mkdir()
        onnx.save(proto, str(d / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
        loaded = load_graph(d / "model.onnx")
        zp = next(t for t in loaded.graph.initializer if t.name == "head.lowrank_u_zero_point")
        assert zp.data_location == TensorProto.EXTERNAL
        return prepare_for_trt(loaded), d

    graph, d = saved("zero", 0)
    assert check(graph, profile, GEO, weights_dir=d).passed
    with pytest.raises(ValueError, match="no weights_dir"):
        check(graph, profile, GEO)
    graph, d = saved("three", 3)
    one_reason(check(graph, profile, GEO, weights_dir=d), "zero point must be 0")


def test_check_only_on_a_model_with_a_rank_r_head(tmp_path):
    import shutil

    from vqexport.head.spec import write_head

    model = shutil.copytree(resolve_source(None).path, tmp_path / "m")
    write_head(model, _demo_head(4))
    report = api.check_readiness("trt-int8", model=model)
    assert report.passed, report.reasons
    assert report.ops["DequantizeLinear"] >= 3  # the codebook's, P's and U's


def test_check_only_cli_names_each_reason_exit_2(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    toml = (bundled_dir() / "trt.toml").read_text()
    for table in ("sequence", "past"):  # both profiles far too large
        toml = toml.replace(f"batch = [1, 1, 8]\n{table}", f"batch = [1, 1, 200000]\n{table}")
    (tmp_path / "huge.toml").write_text(toml.replace('name = "trt"', 'name = "huge"'))
    result = run_cli("build", "--target", tmp_path / "huge.toml", "--check-only", "--json")
    assert_user_error(result, "target huge is not ready for TensorRT", "2^31", "'logits'", "prefill.batch", "decode.batch")
    report = json.loads(result.stdout)  # --json: the readiness report on stdout, the one-line error on stderr
    assert report["passed"] is False and len(report["reasons"]) >= 2 and report["op_list"]["source"]
    assert report["largest"]["prefill"]["elements"] > 2**31 and report["largest"]["decode"]["elements"] > 2**31
    line = result.stderr.strip()
    assert all(r in line for r in report["reasons"])  # every reason, in one line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.toml"]  # nothing written


def test_check_only_refuses_a_non_trt_target(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --check-only writes nothing, not even the default ./artifacts/ort
    assert_user_error(run_cli("build", "--target", "ort", "--check-only"), "--check-only", "backend 'ort'")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(VQExportError, match="backend 'ort'"):
        api.check_readiness("ort-int8")


def test_fp16_trunk_keeps_the_head_fp32(graph_of):
    graph, profile, _ = graph_of("triton-trt")
    assert profile.precision == "fp16" and check(graph, profile, GEO).passed
    types = {t.name: t.data_type for t in graph.graph.initializer}
    assert types["head.codebook_t"] == TensorProto.FLOAT and types["head.bias"] == TensorProto.FLOAT
    assert not [n for n, t in types.items() if n.startswith("head.") and t == TensorProto.FLOAT16]
    assert sum(t == TensorProto.FLOAT16 for n, t in types.items() if not n.startswith("head.")) >= 21


@pytest.mark.parametrize("target", ["triton-trt", "trt"])
def test_a_head_left_in_fp16_is_named(demo, tmp_path, target):
    """The fp16 pass run after the head is attached (it casts the head too): the check names the fp16 head."""
    from vqexport.build import export_trunk
    from vqexport.join import join, save
    from vqexport.trunk.fp16 import fp16_trunk

    source, reference = demo
    profile = load_profile(target)
    joined = join(export_trunk(profile, source, reference), source.head, profile.head_form())
    save(fp16_trunk(joined), tmp_path)
    graph = prepare_for_trt(load_graph(tmp_path / "model.onnx"))
    reason = one_reason(check(graph, profile, GEO), "FLOAT16", "the head must compute in fp32")
    assert ("logits" in reason) if profile.head == "fused" else (CODEBOOK_MATMUL in reason)

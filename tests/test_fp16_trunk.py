"""fp16 trunk with an fp32 head: the precision TensorRT builds strongly typed, proven on CPU with ONNX Runtime.

The pass (vqexport.trunk.fp16) runs on the exported trunk before the head is attached; these tests look at
what a real fp16 build of the embedded demo writes, and at the pass on small hand-made graphs.
"""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto

from vqexport.graph_io import HIDDEN, load_graph
from vqexport.head.graph import CODEBOOK_MATMUL
from vqexport.trunk.fp16 import KEEP_FP32, fp16_trunk
from vqexport.profiles import bundled_dir, load_profile

FP16_PARITY = """
[parity]
steps = 32
atol = 0.5
rtol = 0.0
top1_agreement_min = 0.98
top5_overlap_min = 0.9
kl_max = 5e-3
greedy_must_match = false
"""


def ort_fp16_toml(directory):
    """The bundled ort profile with precision = "fp16" and the fp16 tolerances of the trt targets."""
    text = (bundled_dir() / "ort.toml").read_text()
    assert 'precision = "fp32"' in text and "[parity]" in text
    text = text.replace('precision = "fp32"', 'precision = "fp16"').replace('name = "ort"', 'name = "ort-fp16"')
    text = text[:text.index("[parity]")] + FP16_PARITY
    path = directory / "ort-fp16.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def fp16_build(tmp_path_factory):
    """The embedded demo built with an fp16 trunk for ONNX Runtime (CPU); the build's parity check is against PyTorch."""
    from vqexport import api

    base = tmp_path_factory.mktemp("fp16")
    profile = load_profile(str(ort_fp16_toml(base)))
    result = api.build(profile, out=base / "art", steps=4)
    return result, profile


@pytest.fixture(scope="module")
def fp16_graph(fp16_build):
    result, _ = fp16_build
    return load_graph(result.out / "model.onnx")


def _types(proto):
    g = onnx.shape_inference.infer_shapes(proto).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return g, types


def test_trunk_weights_fp16_head_and_io_fp32(fp16_graph):
    proto = fp16_graph
    inits = {t.name: t.data_type for t in proto.graph.initializer}
    head = {n: t for n, t in inits.items() if n.startswith("head.")}
    assert head["head.codebook_t"] == TensorProto.FLOAT and head["head.bias"] == TensorProto.FLOAT
    assert head["head.map"] == TensorProto.INT32
    assert all(t != TensorProto.FLOAT16 for t in head.values()), head
    trunk_matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and not n.name.startswith("head/")]
    weights = [i for n in trunk_matmuls for i in n.input if i in inits]
    assert len(weights) >= 7 * 3  # q, k, v, o, gate, up, down in each of the demo's 3 layers
    assert all(inits[w] == TensorProto.FLOAT16 for w in weights), [(w, inits[w]) for w in weights]
    big_fp32 = [t.name for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT and not t.name.startswith("head.")
                and np.prod(t.dims) >= 1024]
    assert not big_fp32  # no fp32 copy of a trunk weight is left behind
    for vi in list(proto.graph.input) + list(proto.graph.output):
        want = TensorProto.INT64 if vi.name in ("input_ids", "attention_mask") else TensorProto.FLOAT
        assert vi.type.tensor_type.elem_type == want, vi.name
    assert [o.name for o in proto.graph.output][0] == "logits"


def test_the_head_reads_the_trunk_cast_back_to_fp32(fp16_graph):
    g, types = _types(fp16_graph)
    producer = {o: n for n in g.node for o in n.output}
    matmul = next(n for n in g.node if n.name == CODEBOOK_MATMUL)
    assert matmul.input[0] == HIDDEN
    cast = producer[HIDDEN]
    assert cast.op_type == "Cast" and types[cast.input[0]] == TensorProto.FLOAT16  # the trunk really ends in fp16
    assert types[HIDDEN] == types[matmul.input[1]] == types[matmul.output[0]] == types["logits"] == TensorProto.FLOAT
    for n in g.node:  # reductions, softmax and the rotary angles compute in fp32
        if n.op_type in KEEP_FP32:
            assert all(types.get(i) in (None, TensorProto.FLOAT) for i in n.input
                       if types.get(i) in (TensorProto.FLOAT, TensorProto.FLOAT16)), (n.name, n.op_type)


def test_the_fp16_graph_matches_pytorch_on_cpu_within_the_profile_tolerance(fp16_build):
    result, profile = fp16_build
    report = result.parity
    assert report.passed, report.failures
    assert report.steps == 4 and report.target == "ort-fp16"
    assert report.tolerances["atol"] == profile.parity.atol == 0.5
    assert 1e-4 < report.max_abs_diff <= profile.parity.atol  # really computed in fp16 (not fp32-exact), still close
    assert report.top1_agreement >= profile.parity.top1_agreement_min
    assert result.manifest["profile"]["precision"] == "fp16"


def _tiny(fill: float):
    """x [2, 4] -> MatMul(x, W) -> Add(fill) -> y: a weight read in fp16, and a float32 constant added in fp16."""
    x = ir.Value(name="x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    g = ir.Graph(inputs=[x], outputs=[], nodes=[], opset_imports={"": 18}, name="tiny")
    tape = ir.tape.Tape(g)
    w = tape.initializer(ir.tensor(np.arange(16, dtype=np.float32).reshape(4, 4) / 16, name="w"))
    c = tape.initializer(ir.tensor(np.array([0.0, fill, 1.0, fill], np.float32), name="fill"))
    mm = tape.op("MatMul", [x, w], name="mm")
    mm.dtype, mm.shape = ir.DataType.FLOAT, ir.Shape([2, 4])  # typed, as an exported graph's values are
    y = tape.op("Add", [mm, c], name="add")
    y.name, y.dtype, y.shape = "y", ir.DataType.FLOAT, ir.Shape([2, 4])
    g.outputs.append(y)
    return ir.Model(g, ir_version=10)


def test_a_float32_min_mask_fill_stays_finite_in_fp16():
    import onnxruntime as ort

    lo = float(np.finfo(np.float32).min)
    model = fp16_trunk(_tiny(lo))
    proto = ir.to_proto(model)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    half = [a for a in inits.values() if a.dtype == np.float16]
    assert len(half) == 2 and all(np.isfinite(a).all() for a in half)
    fill = next(a for a in half if a.shape == (4,))
    assert fill.tolist() == [0.0, -65504.0, 1.0, -65504.0]
    assert proto.graph.input[0].type.tensor_type.elem_type == proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.ones((2, 4), np.float32)
    (y,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert y.dtype == np.float32 and np.isfinite(y).all()
    np.testing.assert_allclose(y[:, 1], x @ (np.arange(16).reshape(4, 4) / 16)[:, 1] - 65504, rtol=1e-3)


def test_every_fp16_value_of_the_trunk_stays_finite(fp16_build, tmp_path):
    """The attention mask's finfo(float32).min fill reaches the fp16 attention scores as -65504, never -inf
    (a batch with left padding and a causal mask: masked positions in every layer)."""
    import onnxruntime as ort

    result, _ = fp16_build
    model = ir.load(result.out / "model.onnx")
    values = [o for n in model.graph for o in n.outputs if o.dtype == ir.DataType.FLOAT16 and not o.is_graph_output()]
    assert len(values) > 50
    model.graph.outputs.extend(values)
    ir.save(model, tmp_path / "probe.onnx", external_data="probe.onnx.data")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written, no fusions
    sess = ort.InferenceSession(str(tmp_path / "probe.onnx"), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": np.array([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]], np.int64),
             "attention_mask": np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], np.int64)}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            feeds[i.name] = np.zeros((2, i.shape[1], 0, i.shape[3]), np.float32)
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(None, feeds)))
    assert np.isfinite(outs["logits"][0]).all()
    bad = {n: (int(np.isinf(a).sum()), int(np.isnan(a).sum())) for n, a in outs.items()
           if a.dtype == np.float16 and not np.isfinite(a).all()}
    assert not bad, f"fp16 values with (inf, nan) entries: {bad}"


def test_the_fp16_pass_leaves_the_exported_fp32_trunk_alone(monkeypatch):
    """Targets built one after another in a process share one trunk export: casting a copy to fp16 must not
    retype the trunk the next (fp32) target gets. The cache starts empty and is filled first, so the pass works on
    what a cache hit returns whatever ran before."""
    from vqexport import build
    from vqexport.build import export_trunk, reference_runner
    from vqexport.source import resolve_source

    monkeypatch.setattr(build, "_TRUNKS", {})
    source = resolve_source(None)
    profile = load_profile("ort")
    reference = reference_runner(source)
    export_trunk(profile, source, reference)  # the export, kept in the cache
    assert len(build._TRUNKS) == 1

    def fp16_values(model):
        vals = [v for n in model.graph for v in n.outputs] + list(model.graph.initializers.values()) + list(model.graph.inputs)
        return sorted({v.name for v in vals if v.dtype == ir.DataType.FLOAT16})

    half = fp16_trunk(export_trunk(profile, source, reference))
    assert fp16_values(half)
    assert fp16_values(export_trunk(profile, source, reference)) == []


def test_fp16_is_a_profile_precision(tmp_path):
    assert load_profile(str(ort_fp16_toml(tmp_path))).precision == "fp16"
    assert load_profile("trt").precision == "fp16" and load_profile("triton-trt").precision == "fp16"
    assert load_profile("trt-int8").precision == "fp32" and load_profile("ort").precision == "fp32"
    assert load_profile("trt").head_form().codebook == "fp32"  # an fp16 target's head is still fp32

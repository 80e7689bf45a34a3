"""The portable trunk with int4 / int8 weights (vqexport/trunk/quantize.py): onnxruntime's MatMulNBits quantizer on
the torch.onnx graph, so every architecture the portable trunk builds (mixture-of-experts layers included) gets the
weights onnxruntime-genai's builder gives the few it builds."""

import hashlib
import json
import logging
import shutil
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner
from vqexport.bench.artifact import dense_twin, output_layer_bytes
from vqexport.graph_io import all_nodes, embedding_lookup, load_graph
from vqexport.head.graph import DENSE_MATMUL
from vqexport.head.spec import write_head
from vqexport.source import demo_dir
from vqexport.trunk.quantize import _quantizer, dequantized_rows, gemm_as_matmul

from .conftest import assert_user_error, run_cli
from .models import artifact_logits, genai_greedy, hf_config, identity_head, runner_greedy, save_hf
from .test_experts import MOE

TARGET = "ort-int4-portable"


def _profile(tmp_path, body: str, name: str = "p"):
    f = tmp_path / f"{name}.toml"
    f.write_text(f'backend = "ort"\nname = "{name}"\n' + body)
    return f


def _int8_profile(tmp_path):
    return _profile(tmp_path, 'opset = 21\nprecision = "int8"\ncodebook = "fp32"\n[parity]\natol = 1.0\n'
                    'top1_agreement_min = 0.9\nkl_max = 0.01\ngreedy_must_match = false\n', "int8")


def _weight_matmuls(proto) -> list[onnx.NodeProto]:
    """The trunk's MatMul / Gemm nodes (in subgraphs too) that read a float weight (an initializer)."""
    inits = {t.name for t in proto.graph.initializer}
    return [n for n in all_nodes(proto.graph) if n.op_type in ("MatMul", "Gemm") and not n.name.startswith("head/")
            and len(n.input) > 1 and n.input[1] in inits]


def _attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


@pytest.fixture(scope="module")
def int4_demo(tmp_path_factory):
    return api.build(TARGET, out=tmp_path_factory.mktemp("q") / "int4")


def test_every_weight_of_the_int4_trunk_is_quantized_and_parity_holds(int4_demo, demo_artifact):
    r = int4_demo.parity
    assert r.passed, r.failures
    assert r.max_abs_diff > 1e-3  # really quantized, compared with the fp32 reference
    proto = load_graph(int4_demo.out / "model.onnx")
    fp32 = load_graph(demo_artifact / "model.onnx")
    assert not _weight_matmuls(proto)  # no fp32 weight left in a MatMul
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and not n.name.startswith("head/")]
    assert len(nbits) == len(_weight_matmuls(fp32))
    assert {(_attr(n, "bits"), _attr(n, "block_size"), _attr(n, "accuracy_level")) for n in nbits} == {(4, 32, 4)}
    lookup = embedding_lookup(ir.from_proto(proto).graph)
    assert lookup.op_type == "GatherBlockQuantized"  # the embedding table too
    assert {o.domain: o.version for o in proto.opset_import}[""] == 21
    data = (int4_demo.out / "model.onnx.data").stat().st_size
    assert data < 0.3 * (demo_artifact / "model.onnx.data").stat().st_size
    # a packed byte holds two int4 values: the trunk's parameters are the fp32 trunk's plus one scale per 32
    fp32_params = json.loads((demo_artifact / "manifest.json").read_text())["sizes"]["trunk"]["params"]
    assert fp32_params < int4_demo.manifest["sizes"]["trunk"]["params"] < fp32_params * (1 + 1 / 32 + 0.005)
    assert int4_demo.manifest["profile"]["trunk"] == {"source": "portable", "block_size": 32, "accuracy_level": 4,
                                                      "quantize_embedding": True}


def test_int8_weights_are_closer_to_the_reference_than_int4(int4_demo, tmp_path, capfd):
    int8 = api.build(str(_int8_profile(tmp_path)), out=tmp_path / "int8")
    assert "ERROR" not in capfd.readouterr().err  # the quantizer is not handed a table it cannot take at 8 bits
    assert int8.parity.passed, int8.parity.failures
    assert 0 < int8.parity.max_abs_diff < int4_demo.parity.max_abs_diff / 4
    assert int8.parity.kl_divergence < int4_demo.parity.kl_divergence / 10
    proto = load_graph(int8.out / "model.onnx")
    assert {_attr(n, "bits") for n in proto.graph.node if n.op_type == "MatMulNBits"} == {8}
    lookup = embedding_lookup(ir.from_proto(proto).graph)  # GatherBlockQuantized takes 4 bits only
    assert lookup.op_type == "Gather" and int8.manifest["profile"]["trunk"]["quantize_embedding"] is False


def test_the_embedding_table_can_stay_fp32(tmp_path, demo_artifact):
    body = ('opset = 21\nprecision = "int4"\ncodebook = "int8"\n[int8]\nencoding = "native"\n[trunk]\n'
            'quantize_embedding = false\n[parity]\natol = 2.5\ntop1_agreement_min = 0.85\nkl_max = 0.05\n'
            'greedy_must_match = false\n')
    result = api.build(str(_profile(tmp_path, body)), out=tmp_path / "a")
    assert result.parity.passed, result.parity.failures
    lookup = embedding_lookup(ir.load(str(result.out / "model.onnx")).graph)
    assert lookup.op_type == "Gather" and lookup.inputs[0].dtype == ir.DataType.FLOAT


def test_the_quantizer_leaves_the_root_logger_as_it_was():
    """Importing onnxruntime's quantizer module calls logging.basicConfig(level=INFO): a user's process would then
    print every library's INFO lines."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.handlers[:] = []  # basicConfig acts only on a root logger without handlers
    try:
        sys.modules.pop("onnxruntime.quantization.matmul_nbits_quantizer", None)  # imported afresh
        _quantizer()
        assert root.handlers == [] and root.level == level
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_the_int4_artifact_is_byte_identical_across_builds(tmp_path):
    digests = []
    for i in range(2):
        out = api.build(TARGET, out=tmp_path / str(i)).out
        digests.append([hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("model.onnx", "model.onnx.data")])
    assert digests[0] == digests[1]


def test_onnxruntime_genai_generates_from_the_int4_artifact(int4_demo):
    prompt = [5, 17, 200, 33, 7]
    with OrtRunner.from_artifact(int4_demo.out) as runner:
        expected = runner_greedy(runner, prompt, 8)
    assert genai_greedy(int4_demo.out, prompt, 8) == expected


@pytest.mark.parametrize("arch", list(MOE))
def test_mixture_of_experts_weights_are_quantized_per_expert(tmp_path, arch):
    model = tmp_path / "model"
    # every expert weight at least one block (32) of inputs: smaller constant matrices are left fp32
    sizes = {"qwen3_moe": {"moe_intermediate_size": 32}, "gpt_oss": {}}[arch]  # gpt-oss: intermediate 48
    save_hf(model, hf_config(arch, vocab=101, hidden=64, layers=2, heads=4, kv_heads=2, **{**MOE[arch], **sizes}))
    write_head(model, identity_head(model))
    fp32 = api.build("ort", model=model, out=tmp_path / "fp32", steps=4)
    result = api.build(TARGET, model=model, out=tmp_path / "int4", steps=4)
    assert result.parity.passed, result.parity.failures
    proto = load_graph(result.out / "model.onnx")
    assert not _weight_matmuls(proto)
    nodes = list(all_nodes(proto.graph))  # each expert's nodes are in an If's branch
    assert "Gemm" not in {n.op_type for n in nodes}  # each expert's Gemm became MatMulNBits
    experts = [n for n in nodes if n.op_type == "MatMulNBits" and ".experts" in n.name]
    layers, per_layer = 2, 8 * 2  # 8 experts, gate/up and down each
    assert len(experts) == layers * per_layer
    assert len([n for n in nodes if n.op_type == "MatMulNBits" and not n.name.startswith("head/")]) == \
        len(_weight_matmuls(load_graph(fp32.out / "model.onnx")))


def test_bench_e2e_compares_the_portable_int4_artifact_with_the_builders_int4_model(tmp_path):
    work = tmp_path / "work"
    shutil.copytree(demo_dir(), tmp_path / "demo")
    result = run_cli("bench", "--e2e", "--target", TARGET, "--model", tmp_path / "demo", "--work", work, "--tokens", 4,
                     "--prompt-length", 8, "--repeats", 1, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["target"] == TARGET and out["precision"] == "int4" and out["parity"]["passed"]
    for side in ("vq", "dense", "dense_int8_head"):
        assert out[side]["tokens_per_s"] > 0
    ops = {n.op_type for n in load_graph(next(work.glob("demo-*-builder-int4")) / "model.onnx").graph.node}
    assert "GroupQueryAttention" in ops and "MatMulNBits" in ops  # the builder's own int4 model
    assert out["agreement_with_dense"]["positions"] == 1 + 4 and out["agreement_with_dense"]["kl_dense_to_vq"] > 0


def test_the_portable_int4_trunk_computes_what_the_builders_int4_trunk_computes(int4_demo, demo_artifact, tmp_path):
    """The same weights quantized the same way (onnxruntime's quantizer, blocks of 32, accuracy level 4) by both
    paths: at the first position, where attention sees one key and is the identity, the two artifacts agree to
    rounding; everywhere they agree far more closely than either agrees with the fp32 model. (How closely past the
    first position depends on the machine: the builder's GroupQueryAttention and our attention ops take different
    onnxruntime kernels, 1e-3 apart on some CPUs and up to 0.14 on others, against 0.5 to 1 from fp32.)"""
    builder = api.build("ort-int4", out=tmp_path / "builder")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 8192, size=(1, 20))  # one unpadded row: the builder's attention takes no left padding
    mask, nxt = np.ones_like(ids), rng.integers(0, 8192, size=(1, 1))
    ours, theirs, fp32 = (artifact_logits(a, ids, mask, nxt) for a in (int4_demo.out, builder.out, demo_artifact))
    assert np.abs(ours[0][:, 0] - theirs[0][:, 0]).max() < 1e-3
    for step in range(2):
        apart = np.abs(ours[step] - fp32[step]).max()
        assert apart > 0.1
        assert np.abs(ours[step] - theirs[step]).max() < apart / 4


def test_gpt2_conv1d_layers_are_quantized(tmp_path):
    """GPT-2's Conv1D layers export as Gemm of an untransposed weight: rewritten as MatMul, then quantized."""
    model = tmp_path / "gpt2"
    save_hf(model, hf_config("gpt2", vocab=101, hidden=64, layers=2, heads=4, ffn=128))
    write_head(model, identity_head(model))
    result = api.build(TARGET, model=model, out=tmp_path / "int4", steps=8)
    assert result.parity.passed, result.parity.failures
    proto = load_graph(result.out / "model.onnx")
    assert not _weight_matmuls(proto) and "Gemm" not in {n.op_type for n in proto.graph.node}
    layers, per_layer = 2, 4  # c_attn, c_proj, c_fc, mlp c_proj
    assert len([n for n in proto.graph.node if n.op_type == "MatMulNBits" and not n.name.startswith("head/")]) == layers * per_layer


def _gemm_model():
    """x [n, 4] through Gemm(transB) with a bias and without, sharing one weight, a Gemm of an untransposed weight,
    and one with alpha != 1 (left as it is)."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["n", 4]))

    def const(name, array):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(array.shape),
                        const_value=ir.tensor(array.astype(np.float32), name=name))

    w, b, w2 = const("w", rng.normal(size=(6, 4))), const("b", rng.normal(size=(6,))), const("w2", rng.normal(size=(4, 6)))
    nodes = [ir.node("Gemm", [x, w, b], {"transB": 1}, name="with_bias"),
             ir.node("Gemm", [x, w], {"transB": 1}, name="no_bias"),
             ir.node("Gemm", [x, w2], name="not_transposed"),
             ir.node("Gemm", [x, w, b], {"transB": 1, "alpha": 0.5}, name="scaled")]
    for i, n in enumerate(nodes):
        n.outputs[0].name, n.outputs[0].type = f"y{i}", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, initializers=[w, b, w2], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def _run(model, x):
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_gemm_with_a_bias_in_a_branch_keeps_names_unique():
    """A Gemm with a bias inside an If's branch: the MatMul's output is named from the node, not by the branch's own
    naming, which knows nothing of the outer graph's names (a clash there makes the graph invalid)."""
    model = _gemm_model()
    g = model.graph
    cond = ir.Value(name="cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    g.inputs.append(cond)
    gemm = next(n for n in g if n.name == "with_bias")
    out = gemm.outputs[0]
    placeholder = ir.Value(name="y_if", type=out.type)
    g.outputs[0] = placeholder  # y0 leaves the main graph's outputs for the branch's
    g.remove(gemm, safe=False)
    keep = ir.node("Identity", [g.inputs[0]], name="keep")
    keep.outputs[0].name, keep.outputs[0].type = "kept", out.type
    node = ir.node("If", [cond], {"then_branch": ir.Graph([], [out], nodes=[gemm], name="then"),
                                  "else_branch": ir.Graph([], [keep.outputs[0]], nodes=[keep], name="else")}, name="if")
    g.outputs[0] = node.outputs[0]
    node.outputs[0].name, node.outputs[0].type = "y_if", out.type
    g.append(node)
    assert gemm_as_matmul(model) == 3
    names = [v.name for n in ir.traversal.RecursiveGraphIterator(g) for v in n.outputs]
    assert len(names) == len(set(names)) and "with_bias/MatMul" in names
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["y_if"], {"x": x, "cond": np.array(True)})[0]
    w, b = (_gemm_model().graph.initializers[k].const_value.numpy() for k in ("w", "b"))
    np.testing.assert_allclose(got, x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_gemm_of_a_weight_becomes_matmul_with_the_same_result():
    x = np.random.default_rng(1).normal(size=(3, 4)).astype(np.float32)
    before = _run(_gemm_model(), x)
    model = _gemm_model()
    assert gemm_as_matmul(model) == 3
    ops = sorted(n.op_type for n in model.graph)
    assert ops == ["Add", "Gemm", "MatMul", "MatMul", "MatMul"]  # alpha != 1 is left alone
    # one transposed copy for the two transB Gemms; "scaled" still reads w; w2 is read as it is
    assert sorted(model.graph.initializers) == ["b", "w", "w.T", "w2"]
    after = _run(model, x)
    for a, b in zip(before, after):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_quantized_embedding_tables_rows_are_within_one_int4_step(int4_demo):
    model = ir.load(str(int4_demo.out / "model.onnx"))
    rows = dequantized_rows(embedding_lookup(model.graph))
    table = load_file(str(demo_dir() / "model.safetensors"))["model.embed_tokens.weight"]
    assert rows.shape == table.shape
    blocks = np.abs(table).reshape(table.shape[0], -1, 32).max(-1, keepdims=True)  # |w| max per block of 32
    err = np.abs(rows - table).reshape(blocks.shape[0], -1, 32)
    # a symmetric int4 block's step is max|w| / 8: half a step of rounding, a whole one where +max|w| clips to 7
    assert np.all(err <= blocks / 8 + 1e-6)
    assert 0 < err.mean() < (blocks / 32).mean()


def test_the_dense_twin_runs_at_the_trunks_precision(int4_demo, tmp_path):
    path = dense_twin(int4_demo.out, "model.onnx", tmp_path)
    twin = load_graph(path)
    head = [n for n in twin.graph.node if n.name.startswith(DENSE_MATMUL)]
    assert [n.op_type for n in head] == ["MatMulNBits"] and _attr(head[0], "bits") == 4
    assert not [n for n in twin.graph.node if n.op_type == "MatMul" and n.name.startswith("head/")]
    # the bytes bench's note gives for the twin's layer: int4 blocks and their scales, not the fp32 matrix's
    V, d, block = 8192, 128, _attr(head[0], "block_size")
    blocks = V * (d // block)
    stored = {i.name: i for i in twin.graph.initializer}
    expected = V * d // 2 + blocks * 4 + (blocks // 2 if len(head[0].input) > 3 and head[0].input[3] in stored else 0)
    assert output_layer_bytes(path) == expected < 4 * V * d // 6


@pytest.mark.parametrize("body, fragment", [
    ('precision = "int4"\n', "needs opset >= 21"),
    ('opset = 21\nprecision = "int4"\n[trunk]\nblock_size = 24\n', "trunk.block_size must be one of 16, 32, 64, 128, 256"),
    ('opset = 21\nprecision = "int4"\n[trunk]\naccuracy_level = 5\n', "trunk.accuracy_level must be an integer in [0, 4]"),
    ('opset = 21\n[trunk]\nblock_size = 64\n', "applies to precision 'int4' or 'int8'"),
    ('[trunk]\nsource = "genai"\nblock_size = 64\n', "applies to the portable trunk"),
    ('backend = "openvino"\nprecision = "int4"\n', "precision must be 'fp32'"),
    ('opset = 21\nprecision = "int8"\n[trunk]\nquantize_embedding = true\n', "quantize_embedding = true needs precision 'int4'"),
])
def test_a_quantized_trunk_profile_that_cannot_work_is_one_line(tmp_path, body, fragment):
    f = tmp_path / "p.toml"
    f.write_text(('' if body.startswith("backend") else 'backend = "ort"\n') + 'name = "p"\n' + body)
    out = tmp_path / "out"
    assert_user_error(run_cli("build", "--target", f, "-o", out), fragment)
    assert not out.exists()

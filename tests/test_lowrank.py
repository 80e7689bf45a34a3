"""The optional rank-r correction ``logits += (h·Pᵀ)·Uᵀ``: head files, head graphs in every form, every target,
exact decoding, conversion, and bad input."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner
from vqexport.backends.ort.session import session_options
from vqexport.graph_io import load_graph
from vqexport.head.decoding import LowRankSampler, cluster_tables, lowrank_logits, lowrank_tables, lowrank_topk, reference_topk
from vqexport.head.graph import CODEBOOK_MATMUL, HeadForm, head_model
from vqexport.head.module import VQLogitsHead
from vqexport.head.quant import dequantize_rows, quantize_rows
from vqexport.head.spec import HeadConfig, make_head, read_head, write_head
from vqexport.profiles import load_profile
from vqexport.safetensors_io import read_arrays, save_arrays

from .conftest import assert_user_error, run_cli, sample_text
from .models import make_model

RANK, V, D, K = 4, 300, 32, 11
LOWRANK_MATMULS = (CODEBOOK_MATMUL, "head/lowrank_p/MatMul", "head/lowrank_u/MatMul")


@pytest.fixture(scope="module")
def lr_model(tmp_path_factory, small_tokenizer):
    """One rank-4 model for the whole module (its trunk is exported once)."""
    return make_model(tmp_path_factory.mktemp("lr") / "model", vocab=V, k=K, rank=RANK, tokenizer=small_tokenizer)


@pytest.fixture(scope="module")
def lr_head(lr_model):
    return read_head(lr_model)


@pytest.fixture(scope="module")
def built(lr_model, tmp_path_factory):
    """Artifacts of the rank-4 model, built once per target."""
    cache = {}

    def get(target, steps=3):
        key = target.name if hasattr(target, "name") else target
        if key not in cache:
            profile = api.load_profile(target) if isinstance(target, str) else target
            if profile.codebook == "int8":
                # this random head's correction is large (U ~ 1.5): int8 P and U move more logits than on a trained
                # model, so the bundled 0.99 top-1 goal is relaxed here (the int8 error itself is tested elsewhere)
                profile = dataclasses.replace(profile, parity=dataclasses.replace(profile.parity, top1_agreement_min=0.9,
                                                                                  top5_overlap_min=0.8))
            cache[key] = api.build(profile, model=lr_model, out=tmp_path_factory.mktemp("built") / "art", steps=steps)
        return cache[key]

    return get


def _hidden(seed=0, shape=(2, 5, D)):
    return (np.random.default_rng(seed).standard_normal(shape) * 2).astype(np.float32)


def _run_head(head, form, h, level="all"):
    proto = ir.to_proto(head_model(head, form))
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), session_options(level, 1), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"hidden_states": h})))


def _plain(head):
    return make_head({k: v for k, v in head.tensors.items() if not k.startswith("lowrank")})


def _copy_model(src: Path, dst: Path, head_files=True) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if head_files or not f.name.startswith("vq_head"):
            shutil.copyfile(f, dst / f.name)
    return dst


# -- the head graph --------------------------------------------------------------------------------------------------

def test_rank_zero_is_the_plain_head(lr_head):
    plain = _plain(lr_head)
    assert plain.config.rank == 0 and plain.lowrank is None and HeadConfig(V, D, K).to_dict()["rank"] == 0
    module = VQLogitsHead.from_head(plain)
    assert module.lowrank_p is None and module.lowrank_u is None
    p_graph = ir.to_proto(head_model(plain, HeadForm()))
    r_graph = ir.to_proto(head_model(lr_head, HeadForm()))
    assert not [t.name for t in p_graph.graph.initializer if "lowrank" in t.name]
    # the rank-4 graph is the plain graph plus exactly the correction's MatMul, MatMul, Add at the end
    plain_nodes = [(n.name, n.op_type) for n in p_graph.graph.node]
    lr_nodes = [(n.name, n.op_type) for n in r_graph.graph.node]
    assert lr_nodes[: len(plain_nodes)] == plain_nodes
    assert lr_nodes[len(plain_nodes):] == [("head/lowrank_p/MatMul", "MatMul"), ("head/lowrank_u/MatMul", "MatMul"),
                                           ("head/lowrank/Add", "Add")]
    assert ({t.name for t in r_graph.graph.initializer} - {t.name for t in p_graph.graph.initializer}
            == {"head.lowrank_p_t", "head.lowrank_u_t"})
    # the top-k outputs: cluster log-probs exist only for the plain head (the correction breaks the cluster bound)
    assert HeadForm(decode="topk").outputs(plain) == ["topk_ids", "topk_logprobs", "cluster_logprobs"]
    assert HeadForm(decode="topk").outputs(lr_head) == ["topk_ids", "topk_logprobs"]


@pytest.mark.parametrize("select", ["gather", "gather_elements"])
def test_lowrank_graph_matches_the_torch_module(lr_head, select):
    proto = ir.to_proto(head_model(lr_head, HeadForm(select=select)))
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    assert inits["head.lowrank_p_t"] == [D, RANK] and inits["head.lowrank_u_t"] == [RANK, V]
    h = _hidden()
    got = _run_head(lr_head, HeadForm(select=select), h)["logits"]
    module = VQLogitsHead.from_head(lr_head)
    with torch.no_grad():
        ref = module(torch.from_numpy(h)).numpy()
        correction = module.correction(torch.from_numpy(h)).numpy()
    assert np.abs(got - ref).max() < 1e-4
    np.testing.assert_allclose(got, lr_head.logits(h), atol=1e-4)
    assert np.abs(correction).max() > 0.5  # the term is really there (a dropped term would fail the match above)


def test_topk_graph_is_exact_with_the_correction(lr_head):
    h = _hidden(1)
    full = _run_head(lr_head, HeadForm(), h)["logits"].astype(np.float64)
    out = _run_head(lr_head, HeadForm(decode="topk", k=7), h)
    assert set(out) == {"topk_ids", "topk_logprobs"}
    ref_ids, ref_lp = reference_topk(full, 7)
    np.testing.assert_allclose(out["topk_logprobs"], ref_lp, atol=1e-4)
    np.testing.assert_array_equal(out["topk_ids"], ref_ids)  # random weights: no ties, so the order is the reference's
    ref_ids, _ = reference_topk(lr_head.logits(h), 7)
    np.testing.assert_array_equal(out["topk_ids"], ref_ids)  # and it is the top-k of the head's definition


def test_last_position_and_int8_with_the_correction(lr_head):
    h = _hidden(2)
    full = _run_head(lr_head, HeadForm(), h)["logits"]
    last = _run_head(lr_head, HeadForm(last_position_only=True), h)["logits"]
    assert last.shape == (2, 1, V) and np.abs(last[:, 0] - full[:, -1]).max() < 1e-4
    form = HeadForm(codebook="int8")
    proto = ir.to_proto(head_model(lr_head, form))
    names = {t.name: t for t in proto.graph.initializer}
    for base in ("head.codebook", "head.lowrank_p", "head.lowrank_u"):  # P and U quantized like the codebook
        assert names[base + "_q"].data_type == onnx.TensorProto.INT8 and base + "_t" not in names
    q = _run_head(lr_head, form, h, level="disable")["logits"]  # exact QDQ semantics
    deq = {}
    for name, w in (("codebook", lr_head.codebook), ("lowrank_p", lr_head.lowrank[0].T), ("lowrank_u", lr_head.lowrank[1])):
        deq[name] = dequantize_rows(*quantize_rows(w if name != "lowrank_p" else w.T)).astype(np.float64)
    h64 = h.astype(np.float64)
    ref = (h64 @ deq["codebook"].T)[..., lr_head.map] + lr_head.bias + (h64 @ deq["lowrank_p"].T) @ deq["lowrank_u"].T
    np.testing.assert_allclose(q, ref, atol=1e-4)  # one scale per output column of every weight
    assert 0 < np.abs(q - full).max() < 0.05 * np.abs(full).max()
    last_q = _run_head(lr_head, dataclasses.replace(form, last_position_only=True), h, level="disable")["logits"]
    np.testing.assert_allclose(last_q[:, 0], q[:, -1], atol=1e-5)


# -- every target ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["ort", "ort-int8", "ort-int8-native", "ort-topk"])
def test_targets_build_and_pass_parity(built, target):
    result = built(target)
    assert result.parity.passed, result.parity.failures
    assert result.manifest["config"]["head"]["rank"] == RANK
    proto = load_graph(result.out / "model.onnx")
    names = {t.name: t for t in proto.graph.initializer}
    nodes = {n.name: n for n in proto.graph.node}
    if target == "ort":
        assert list(names["head.lowrank_p_t"].dims) == [D, RANK] and list(names["head.lowrank_u_t"].dims) == [RANK, V]
        assert "head/lowrank/Add" in nodes
    if target in ("ort-int8", "ort-topk"):  # P and U quantized like the codebook: int8, one scale per output column
        for base in ("head.lowrank_p", "head.lowrank_u", "head.codebook"):
            assert names[base + "_q"].data_type == onnx.TensorProto.INT8
        assert "head.lowrank_u_t" not in names and "head.lowrank_p_t" not in names
    if target == "ort-int8-native":
        assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == 3
        assert {"head/codebook/MatMulNBits", "head/lowrank_p/MatMulNBits", "head/lowrank_u/MatMulNBits"} <= set(nodes)
    if target == "ort-topk":
        outs = [o.name for o in proto.graph.output]
        assert "topk_ids" in outs and "cluster_logprobs" not in outs and "logits" not in outs
        assert result.parity.compared == "topk"


def test_int8_activations_on_every_head_matmul(built, tmp_path):
    # The static scales come from the calibration prompts, not the parity prompts. On this random rank-4 model h·Pᵀ
    # reaches 3.67 on the parity prompts against 3.07 on the calibration ones, and the clipped correction moves
    # logits by up to 2.3: hence atol 3 (the trained embedded model's hidden states stay within their calibrated
    # range on the parity prompts: max |h| 9.3 against 10.0).
    f = tmp_path / "act.toml"
    f.write_text('backend = "ort"\nname = "act"\ncodebook = "int8"\n[int8]\nactivations = true\n'
                 '[parity]\natol = 3.0\ntop1_agreement_min = 0.8\nkl_max = 1e-2\ngreedy_must_match = false\n')
    result = built(str(f), steps=4)
    assert result.parity.passed, result.parity.failures
    proto = load_graph(result.out / "model.onnx", load_weights=True)
    producer = {o: n for n in proto.graph.node for o in n.output}
    nodes = {n.name: n for n in proto.graph.node}
    for name in LOWRANK_MATMULS:  # both inputs of each MatMul come out of a DequantizeLinear
        assert [producer[i].op_type for i in nodes[name].input] == ["DequantizeLinear", "DequantizeLinear"], name
    # h feeds the codebook and the projection through one Q/DQ pair; h·Pᵀ has its own calibrated scale
    assert nodes[CODEBOOK_MATMUL].input[0] == nodes["head/lowrank_p/MatMul"].input[0]
    arrays = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.startswith("head.")}
    assert arrays["head.hidden_scale"] > 0 and arrays["head.lowrank_proj_scale"] > 0
    for base in ("head.codebook", "head.lowrank_p", "head.lowrank_u"):  # reduce_range: 7-bit weight codes
        assert np.abs(arrays[base + "_q"].astype(np.int32)).max() <= 63


def test_fused_op_takes_the_factors(built, lr_model, tmp_path):
    prof = load_profile("ort-fused")
    assert_user_error(run_cli("build", "--target", "ort-fused", "--model", lr_model, "--out", tmp_path / "x"), "4-input", "kernel")
    assert not (tmp_path / "x").exists()
    prof = dataclasses.replace(prof, ort=dataclasses.replace(prof.ort, kernel="function"))
    result = built(prof)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    proto = load_graph(result.out / "model.onnx")
    node = next(n for n in proto.graph.node if n.op_type == "VQLogits")
    assert list(node.input[4:]) == ["head.lowrank_p_t", "head.lowrank_u_t"]
    assert len(proto.functions) == 1 and list(proto.functions[0].input)[4:] == ["lowrank_p_t", "lowrank_u_t"]


def test_fused_reference_and_function_body_agree():
    from onnx import TensorProto, helper

    from vqexport.ops.vqlogits import DOMAIN, OP_TYPE, function_proto, reference

    rng = np.random.default_rng(0)
    d, k, v, r = 16, 5, 40, 3
    h = rng.standard_normal((2, 3, d)).astype(np.float32)
    ct, m, b = rng.standard_normal((d, k)).astype(np.float32), rng.integers(0, k, v).astype(np.int32), rng.standard_normal(v).astype(np.float32)
    p, u = rng.standard_normal((d, r)).astype(np.float32), rng.standard_normal((r, v)).astype(np.float32)
    ref = reference(h, ct, m, b, p, u)
    assert np.allclose(ref, reference(h, ct, m, b) + h @ p @ u, atol=1e-5)
    with pytest.raises(ValueError, match="come together"):
        reference(h, ct, m, b, p, None)
    node = helper.make_node(OP_TYPE, ["h", "ct", "m", "b", "p", "u"], ["y"], domain=DOMAIN, plugin_namespace="vqexport", plugin_version="1")
    inits = [numpy_helper.from_array(a, n) for a, n in ((ct, "ct"), (m, "m"), (b, "b"), (p, "p"), (u, "u"))]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, v])], inits)
    for select in ("gather", "gather_elements"):
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                                  functions=[function_proto(select, lowrank=True)])
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]
        assert np.allclose(got, ref, atol=1e-4)


def test_dense_twin_folds_the_correction(built, tmp_path):
    from vqexport.bench.artifact import dense_twin

    art = built("ort").out
    twin = dense_twin(art, "model.onnx", tmp_path)
    proto = load_graph(twin)
    names = {t.name for t in proto.graph.initializer}
    assert "head.weight_t" in names and not {n for n in names if "lowrank" in n or n.startswith("head.codebook")}
    assert "head/dense/MatMul" in {n.name for n in proto.graph.node}
    ids = np.array([[2, 7, 1, 250]], np.int64)
    outs = []
    for path in (art / "model.onnx", twin):
        with OrtRunner(path) as r:
            outs.append(r.step(ids, np.ones_like(ids), r.empty_past(1)).logits)
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


def test_generate_on_a_rank_r_topk_artifact(built, lr_model):
    from vqexport.backends.torch_ref import TorchRunner
    from vqexport.source import load_source

    fp32_topk = dataclasses.replace(load_profile("ort-topk"), codebook="fp32", name="topk-fp32")  # int8 would flip near-ties
    art = built(fp32_topk, steps=2).out
    assert built(fp32_topk).parity.passed
    greedy = api.generate(art, "def main(", max_new_tokens=4)
    assert not greedy.stopped_at_eos and len(greedy.new_ids) == 4  # the model has no eos token
    with TorchRunner.from_source(load_source(lr_model)) as ref:  # transformers' model + the rank-4 head, greedy
        x = np.asarray([greedy.prompt_ids])
        mask = np.ones_like(x)
        out = ref.step(x, mask, ref.empty_past(1))
        expected = []
        for _ in range(4):
            expected.append(int(out.logits[0, -1].argmax()))
            mask = np.concatenate([mask, [[1]]], axis=1)
            out = ref.step(np.asarray([[expected[-1]]]), mask, out.present)
    assert greedy.new_ids == expected
    drawn = api.generate(art, "def main(", max_new_tokens=4, sample=True, top_k=5, seed=1)  # the graph's exact top-k
    assert all(0 <= t < V for t in drawn.new_ids)
    assert drawn.new_ids == api.generate(art, "def main(", max_new_tokens=4, sample=True, top_k=5, seed=1).new_ids
    assert api.generate(art, "def main(", max_new_tokens=4, sample=True, top_k=1, seed=5).new_ids == greedy.new_ids
    # sampling over all V needs every token's correction: the logits, which this top-k graph does not output
    assert_user_error(run_cli("generate", "--artifact", art, "--prompt", "x", "--sample"), "rank-4 correction", "keep_logits")
    keep = dataclasses.replace(fp32_topk, name="topk-keep", decode=dataclasses.replace(fp32_topk.decode, keep_logits=True))
    art = built(keep, steps=2).out
    sampled = api.generate(art, "def main(", max_new_tokens=4, sample=True, seed=2)
    assert len(sampled.new_ids) == 4 and len(drawn.new_ids) == 4
    assert sampled.new_ids == api.generate(art, "def main(", max_new_tokens=4, sample=True, seed=2).new_ids


# -- exact decoding with the correction (numpy) ----------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_exact_topk_and_logprobs_with_correction(seed):
    rng = np.random.default_rng(seed)
    for trial in range(40):
        v = int(rng.integers(5, 200))
        k_codes = int(rng.integers(1, min(v, 30) + 1))
        r, k = int(rng.integers(1, 5)), int(rng.integers(1, min(v, 10) + 1))
        m = rng.integers(0, k_codes, v)
        b = None if trial % 3 == 0 else rng.standard_normal(v)
        u = rng.standard_normal((v, r)) * rng.choice([0.01, 1.0, 5.0])
        z, q = rng.standard_normal(k_codes) * 3, rng.standard_normal(r)
        temp = float(rng.choice([1.0, 0.5, 2.0]))
        if trial % 4 == 0:  # exact ties everywhere
            u, z, q, temp = np.round(u), np.round(z), np.round(q), 1.0
            b = None if b is None else np.round(b)
        t = cluster_tables(m, b, k_codes, width=1, temperature=temp)
        lr = lowrank_tables(m, b, u, t)
        full = z[m] + (0 if b is None else b) + u @ q
        ids, lp, stats = lowrank_topk(z, q, t, lr, k)
        ref_ids, ref_lp = reference_topk(full, k, temp)
        assert (ids == ref_ids).all() and np.allclose(lp, ref_lp, atol=1e-9)
        assert np.allclose(lowrank_logits(z, q, t, lr), full / temp)
        assert stats["tokens_scored"] <= v


def test_bounds_prune_clusters():
    rng = np.random.default_rng(1)
    v, k_codes, r = 5000, 200, 8
    m = rng.permutation(np.concatenate([np.arange(k_codes), rng.integers(0, k_codes, v - k_codes)]))
    t = cluster_tables(m, None, k_codes, width=1)
    lr = lowrank_tables(m, None, rng.standard_normal((v, r)) * 0.01, t)
    ids, _, stats = lowrank_topk(rng.standard_normal(k_codes) * 3, rng.standard_normal(r), t, lr, 5, logprobs=False)
    assert stats["tokens_scored"] < v / 4  # most clusters are never touched


def test_sampler_matches_the_softmax():
    rng = np.random.default_rng(2)
    v, k_codes, r = 12, 4, 2
    m, b, u = rng.integers(0, k_codes, v), rng.standard_normal(v), rng.standard_normal((v, r))
    z, q = rng.standard_normal(k_codes), rng.standard_normal(r)
    s = LowRankSampler(m, b, k_codes, u, temperature=0.8, seed=0)
    draws = np.bincount([s.sample(z, q) for _ in range(20000)], minlength=v) / 20000
    x = (z[m] + b + u @ q) / 0.8
    p = np.exp(x - x.max())
    assert np.abs(draws - p / p.sum()).max() < 0.015


def test_sampler_top_k_draws_only_the_top_k():
    rng = np.random.default_rng(3)
    v, k_codes, r = 40, 6, 3
    m, b, u = rng.integers(0, k_codes, v), rng.standard_normal(v), rng.standard_normal((v, r))
    z, q = rng.standard_normal(k_codes), rng.standard_normal(r)
    top, _ = reference_topk(z[m] + b + u @ q, 3)
    s = LowRankSampler(m, b, k_codes, u, top_k=3, seed=0)
    assert set(s.sample(z, q) for _ in range(300)) == set(top.tolist())


# -- the head files and conversion -----------------------------------------------------------------------------------

def test_lowrank_init_keeps_the_dense_logits_at_the_mean_hidden_state():
    from vqexport.convert.clustering import kmeans
    from vqexport.convert.convert import _init_head, init_lowrank

    torch.manual_seed(0)
    weight, dense_bias, mean_h = torch.randn(120, 32), torch.randn(120), torch.randn(32) * 3
    cfg = HeadConfig(vocab_size=120, hidden_size=32, codebook_size=10, bias=True, rank=4)
    vq = _init_head(cfg, weight, dense_bias, kmeans(weight, 10, seed=0)[1], mean_h)
    plain = vq(mean_h).detach().clone()  # U = 0: a fresh correction is the plain head
    report = init_lowrank(vq, weight, mean_h)
    with torch.no_grad():
        dense_at_mean = weight @ mean_h + dense_bias
        assert torch.allclose(plain, dense_at_mean, atol=1e-4)  # the bias rule: exact at h̄ ...
        assert torch.allclose(vq(mean_h), dense_at_mean, atol=1e-3)  # ... and still exact with the correction
        h = torch.randn(64, 32)
        closer = (vq(h) - (h @ weight.T + dense_bias)).pow(2).mean()
        vq.lowrank_u.zero_()
        assert closer < (vq(h) - (h @ weight.T + dense_bias)).pow(2).mean()  # and closer elsewhere
    assert report["residual_after_lowrank_vs_weight"] < report["residual_vs_weight"]


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c.update(rank=99), "rank must be in [0, min(vocab_size, hidden_size) = 32], got 99"),
    (lambda c: c.update(rank=-1), "rank must be in"),
    (lambda c: c.update(rank=2.0), "rank must be an integer, got float 2.0"),
    (lambda c: c.update(rank=True), "rank must be an integer"),
    (lambda c: c.update(rank=2), "tensor lowrank_p has shape [4, 32], vq_head.json implies [2, 32]"),
    (lambda c: c.update(rank=0), "unexpected tensor(s) lowrank_p, lowrank_u"),
    (lambda c: c.update(type="dense"), "type must be one of vq"),
])
def test_bad_rank_in_vq_head_json(lr_model, tmp_path, change, fragment):
    model = _copy_model(lr_model, tmp_path / "m")
    cfg = json.loads((model / "vq_head.json").read_text())
    change(cfg)
    (model / "vq_head.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("build", "--model", model, "--out", tmp_path / "o"), "vq_head", fragment)
    assert not (tmp_path / "o").exists()


def _with_tensors(lr_model, dst, edit):
    model = _copy_model(lr_model, dst)
    tensors, _ = read_arrays(model / "vq_head.safetensors")
    edit(tensors)
    save_arrays(model / "vq_head.safetensors", tensors)
    return model


def test_bad_factors(lr_model, tmp_path):
    out = tmp_path / "o"

    def build(model):
        return run_cli("build", "--model", model, "--out", out)

    def wrong_shape(t):
        t["lowrank_u"] = np.zeros((V, 3), np.float32)

    def nan(t):
        t["lowrank_p"][1, 3] = np.nan

    def integer(t):
        t["lowrank_p"] = t["lowrank_p"].astype(np.int32)

    assert_user_error(build(_with_tensors(lr_model, tmp_path / "shape", wrong_shape)), "lowrank_u", "[300, 3]", "[300, 4]")
    assert_user_error(build(_with_tensors(lr_model, tmp_path / "nan", nan)), "lowrank_p", "non-finite", "[1, 3]")
    assert_user_error(build(_with_tensors(lr_model, tmp_path / "missing", lambda t: t.pop("lowrank_p"))),
                      "missing tensor", "lowrank_p")
    assert_user_error(build(_with_tensors(lr_model, tmp_path / "int", integer)), "lowrank_p", "dtype I32", "floating-point")
    assert not out.exists()


def test_inspect_reports_each_term(lr_model, built):
    dense = V * D + V
    for info in (api.inspect(lr_model), api.inspect(built("ort").out)):
        terms = info["sizes"]["head"]["terms"]
        assert terms["lowrank"]["params"] == RANK * (V + D)
        assert terms["codebook"]["params"] == K * D and terms["bias"]["params"] == V and terms["map"]["params"] == V
        assert terms["lowrank"]["params_vs_dense"] == pytest.approx(RANK * (V + D) / dense)
    assert api.inspect(lr_model)["config"]["head"]["rank"] == RANK


@pytest.fixture(scope="module")
def dense_src(lr_model, tmp_path_factory):
    """The rank-4 model's trunk and tokenizer without a head: a dense model to convert."""
    return _copy_model(lr_model, tmp_path_factory.mktemp("dense") / "model", head_files=False)


def test_convert_rank_bad_input(dense_src, tmp_path):
    assert_user_error(run_cli("convert", "--from", dense_src, "-k", 8, "--rank", 33, "--out", tmp_path / "o"),
                      "--rank must be in [0, min(vocab size, hidden size) = 32], got 33")
    assert_user_error(run_cli("convert", "--from", dense_src, "-k", 8, "--rank", "-1", "--out", tmp_path / "o"), "--rank must be in")
    assert not (tmp_path / "o").exists()


def test_convert_with_rank_fits_the_residual_and_builds(dense_src, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(sample_text())
    res = run_cli("convert", "--from", dense_src, "-k", 16, "--rank", 8, "--distill-text", text, "--steps", 20,
                  "--clustering", "euclidean", "--out", tmp_path / "vq", "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    init = report["lowrank_init"]
    assert init["residual_after_lowrank_vs_weight"] < init["residual_vs_weight"]  # the fit explains part of W - C[M]
    head = read_head(tmp_path / "vq")
    assert head.config.rank == 8 and head.lowrank[1].shape == (V, 8) and head.lowrank[0].shape == (8, D)
    assert "rank 8" in (tmp_path / "vq" / "MODEL_CARD.md").read_text()
    assert (tmp_path / "vq" / "model.safetensors").read_bytes() == (dense_src / "model.safetensors").read_bytes()
    assert api.build("ort", model=tmp_path / "vq", out=tmp_path / "art", steps=3).parity.passed
    # the correction, fitted before distillation, brings the VQ head closer to the dense one than rank 0 does
    plain = run_cli("convert", "--from", dense_src, "-k", 16, "--distill-text", text, "--steps", 0,
                    "--clustering", "euclidean", "--out", tmp_path / "vq0", "--json")
    assert plain.exit_code == 0, plain.stderr
    assert report["before_distillation"]["kl_to_dense"] < json.loads(plain.stdout)["before_distillation"]["kl_to_dense"]


def test_write_head_round_trips_the_factors(lr_head, tmp_path):
    write_head(tmp_path, lr_head)
    again = read_head(tmp_path)
    assert again.config == lr_head.config
    for name in ("lowrank_p", "lowrank_u"):
        np.testing.assert_array_equal(again.tensors[name], lr_head.tensors[name])

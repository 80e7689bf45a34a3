"""The optional rank-r correction ``logits += (h·Pᵀ)·Uᵀ``: config, checkpoint, export, every pass, exact decoding,
conversion, and bad input."""

import json

import numpy as np
import onnx
import pytest
import torch

from vqexport import api
from vqexport.checkpoint import save_checkpoint
from vqexport.decoding import (LowRankSampler, cluster_tables, lowrank_logits, lowrank_tables, lowrank_topk,
                               reference_topk)
from vqexport.export import export_onnx
from vqexport.graph import find_head
from vqexport.model import from_tensors

from .conftest import assert_user_error, make_checkpoint, make_config, make_tensors, run_cli

RANK = 4


@pytest.fixture(scope="module")
def lr_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("lr") / "ckpt", make_config(rank=RANK))


@pytest.fixture(scope="module")
def lr_proto(lr_ckpt):
    ckpt = api.load_checkpoint(lr_ckpt)
    return export_onnx(from_tensors(ckpt.config, ckpt.tensors))


def _logits(proto, ids, cfg, basic=False):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if basic:  # no QDQ -> MatMulNBits rewrite (its default accuracy level quantizes activations too)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in sess.get_inputs()[2:]:
        feeds[i.name] = np.zeros((ids.shape[0], cfg.n_kv_heads, 0, cfg.head_dim), np.float32)
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_rank_zero_is_the_plain_head(lr_proto):
    cfg = make_config()
    assert "rank" not in json.loads(cfg.to_json())["head"]  # config.json unchanged for the plain head
    model = from_tensors(cfg, make_tensors(cfg))
    assert model.head.lowrank_p is None and model.head.lowrank_u is None
    proto = export_onnx(model)
    assert find_head(proto).lowrank is None
    assert not [t.name for t in proto.graph.initializer if "lowrank" in t.name]
    # the rank-4 graph is the plain graph plus exactly the correction's MatMul, MatMul, Add at the end
    plain, lowrank = [n.op_type for n in proto.graph.node], [n.op_type for n in lr_proto.graph.node]
    assert lowrank[: len(plain)] == plain and lowrank[len(plain):] == ["MatMul", "MatMul", "Add"]
    assert {t.name for t in lr_proto.graph.initializer} - {t.name for t in proto.graph.initializer} == {"head.lowrank_p_t", "head.lowrank_u_t"}


def test_a_dense_head_has_no_correction(tmp_path):
    cfg = make_config(head="dense")
    head = find_head(export_onnx(from_tensors(cfg, make_tensors(cfg))))
    assert head.kind == "dense" and head.lowrank is None


def test_export_names_and_matches_torch(lr_ckpt, lr_proto):
    ckpt = api.load_checkpoint(lr_ckpt)
    model = from_tensors(ckpt.config, ckpt.tensors)
    head = find_head(lr_proto)
    assert head.lowrank is not None
    inits = {t.name: list(t.dims) for t in lr_proto.graph.initializer}
    V, d = ckpt.config.vocab_size, ckpt.config.d_model
    assert inits["head.lowrank_p_t"] == [d, RANK] and inits["head.lowrank_u_t"] == [RANK, V]
    ids = np.array([[1, 5, 9, 2]], np.int64)
    got = _logits(lr_proto, ids, ckpt.config)["logits"]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.ones(1, 4, dtype=torch.int64), *model.empty_cache(1))[0].numpy()
        h = model.hidden(torch.from_numpy(ids), torch.ones(1, 4, dtype=torch.int64), *model.empty_cache(1))[0]
        correction = model.head.correction(h).numpy()
    assert np.abs(got - ref).max() < 1e-4
    assert np.abs(correction).max() > 0.5  # the term is really there (a dropped term would fail the parity above)


@pytest.mark.parametrize("target", ["ort", "ort-int8", "ort-int8-native", "ort-topk"])
def test_targets_build_and_pass_parity(lr_ckpt, tmp_path, target):
    result = api.build(target, model=lr_ckpt, out=tmp_path / target, steps=3)
    assert result.parity.passed, result.parity.failures
    proto = onnx.load(str(tmp_path / target / "model.onnx"))
    names = {t.name: t for t in proto.graph.initializer}
    if target == "ort-int8":  # P and U quantized like the codebook: int8 with one scale per output column
        for base in ("head.lowrank_p", "head.lowrank_u", "head.codebook"):
            assert names[base + "_q"].data_type == onnx.TensorProto.INT8
        assert "head.lowrank_u_t" not in names and "head.lowrank_p_t" not in names
    if target == "ort-int8-native":
        assert [n.op_type for n in proto.graph.node].count("MatMulNBits") == 3
    if target == "ort-topk":
        outs = [o.name for o in proto.graph.output]
        assert "topk_ids" in outs and "cluster_logprobs" not in outs


def test_topk_graph_is_exact(lr_ckpt, lr_proto):
    from vqexport.passes.topk_decode import add_topk_outputs

    ckpt = api.load_checkpoint(lr_ckpt)
    ids = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int64)
    full = _logits(lr_proto, ids, ckpt.config)["logits"].astype(np.float64)
    out = _logits(add_topk_outputs(lr_proto, 7, keep_logits=False), ids, ckpt.config)
    assert "logits" not in out
    ref_ids, ref_lp = reference_topk(full, 7)
    assert np.allclose(out["topk_logprobs"], ref_lp, atol=1e-4)
    assert (out["topk_ids"] == ref_ids).all()  # random weights: no ties, so the order is the reference's


def test_last_position_and_int8_twin_with_correction(lr_ckpt, lr_proto):
    from vqexport.passes.dense_twin import dense_twin
    from vqexport.passes.int8_codebook import quantize_codebook
    from vqexport.passes.last_position import last_position_only

    ckpt = api.load_checkpoint(lr_ckpt)
    ids = np.array([[3, 1, 4, 1, 5]], np.int64)
    full = _logits(lr_proto, ids, ckpt.config)["logits"]
    last = _logits(last_position_only(lr_proto), ids, ckpt.config)["logits"]
    assert last.shape[1] == 1 and np.abs(last[:, 0] - full[:, -1]).max() < 1e-4
    q = quantize_codebook(lr_proto)
    twin = dense_twin(q)
    assert np.abs(_logits(twin, ids, ckpt.config)["logits"] - _logits(q, ids, ckpt.config, basic=True)["logits"]).max() < 1e-3


def test_lowrank_init_keeps_the_dense_logits_at_the_mean_hidden_state():
    from vqexport.convert import _init_head, _vq_model, init_lowrank
    from vqexport.vq_init import kmeans

    cfg = make_config(vocab=120, head="dense", d=32, layers=1)
    torch.manual_seed(0)
    weight, dense_bias, mean_h = torch.randn(120, 32), torch.randn(120), torch.randn(32) * 3
    vq = _vq_model(cfg, 10, True, {}, rank=4)
    _init_head(vq, weight, dense_bias, kmeans(weight, 10, seed=0)[1], mean_h)
    plain = vq.head(mean_h).detach().clone()
    report = init_lowrank(vq, weight, mean_h)
    with torch.no_grad():
        dense_at_mean = weight @ mean_h + dense_bias
        assert torch.allclose(plain, dense_at_mean, atol=1e-4)  # the bias rule: exact at h̄ ...
        assert torch.allclose(vq.head(mean_h), dense_at_mean, atol=1e-3)  # ... and still exact with the correction
        h = torch.randn(64, 32)
        closer = (vq.head(h) - (h @ weight.T + dense_bias)).pow(2).mean()
        vq.head.lowrank_u.zero_()
        assert closer < (vq.head(h) - (h @ weight.T + dense_bias)).pow(2).mean()  # and closer elsewhere
    assert report["residual_after_lowrank_vs_weight"] < report["residual_vs_weight"]


def test_fused_op_takes_the_factors(lr_ckpt, tmp_path):
    import dataclasses

    from vqexport.profiles import load_profile

    prof = load_profile("ort-fused")
    assert_user_error(run_cli("build", "--target", "ort-fused", "--model", lr_ckpt, "--out", tmp_path / "x"), "4-input", "kernel")
    assert not (tmp_path / "x").exists()
    prof = dataclasses.replace(prof, ort=dataclasses.replace(prof.ort, kernel="function"))
    result = api.build(prof, model=lr_ckpt, out=tmp_path / "fused", steps=3)
    assert result.parity.passed
    proto = onnx.load(str(tmp_path / "fused" / "model.onnx"))
    node = next(n for n in proto.graph.node if n.op_type == "VQLogits")
    assert list(node.input[4:]) == ["head.lowrank_p_t", "head.lowrank_u_t"]
    assert len(proto.functions) == 1 and list(proto.functions[0].input)[4:] == ["lowrank_p_t", "lowrank_u_t"]


def test_fused_reference_and_function_body_agree():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vqexport.ops.vqlogits import DOMAIN, OP_TYPE, function_proto, reference

    rng = np.random.default_rng(0)
    d, K, V, r = 16, 5, 40, 3
    h = rng.standard_normal((2, 3, d)).astype(np.float32)
    ct, m, b = rng.standard_normal((d, K)).astype(np.float32), rng.integers(0, K, V).astype(np.int32), rng.standard_normal(V).astype(np.float32)
    p, u = rng.standard_normal((d, r)).astype(np.float32), rng.standard_normal((r, V)).astype(np.float32)
    ref = reference(h, ct, m, b, p, u)
    assert np.allclose(ref, reference(h, ct, m, b) + h @ p @ u, atol=1e-5)
    node = helper.make_node(OP_TYPE, ["h", "ct", "m", "b", "p", "u"], ["y"], domain=DOMAIN, plugin_namespace="vqexport", plugin_version="1")
    inits = [numpy_helper.from_array(a, n) for a, n in ((ct, "ct"), (m, "m"), (b, "b"), (p, "p"), (u, "u"))]
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, 3, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, V])], inits)
    for select in ("gather", "gather_elements"):
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)],
                                  functions=[function_proto(select, lowrank=True)])
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h": h})[0]
        assert np.allclose(got, ref, atol=1e-4)


def test_dense_twin_folds_the_correction(lr_proto, lr_ckpt):
    from vqexport.passes.dense_twin import dense_twin

    ckpt = api.load_checkpoint(lr_ckpt)
    ids = np.array([[2, 7, 1]], np.int64)
    twin = dense_twin(lr_proto)
    assert find_head(twin).kind == "dense"
    assert np.abs(_logits(twin, ids, ckpt.config)["logits"] - _logits(lr_proto, ids, ckpt.config)["logits"]).max() < 1e-4


@pytest.mark.parametrize("seed", range(6))
def test_exact_topk_and_logprobs_with_correction(seed):
    rng = np.random.default_rng(seed)
    for trial in range(40):
        V = int(rng.integers(5, 200))
        K = int(rng.integers(1, min(V, 30) + 1))
        r, k = int(rng.integers(1, 5)), int(rng.integers(1, min(V, 10) + 1))
        m = rng.integers(0, K, V)
        b = None if trial % 3 == 0 else rng.standard_normal(V)
        u = rng.standard_normal((V, r)) * rng.choice([0.01, 1.0, 5.0])
        z, q = rng.standard_normal(K) * 3, rng.standard_normal(r)
        temp = float(rng.choice([1.0, 0.5, 2.0]))
        if trial % 4 == 0:  # exact ties everywhere
            u, z, q, temp = np.round(u), np.round(z), np.round(q), 1.0
            b = None if b is None else np.round(b)
        t = cluster_tables(m, b, K, width=1, temperature=temp)
        lr = lowrank_tables(m, b, u, t)
        full = z[m] + (0 if b is None else b) + u @ q
        ids, lp, stats = lowrank_topk(z, q, t, lr, k)
        ref_ids, ref_lp = reference_topk(full, k, temp)
        assert (ids == ref_ids).all() and np.allclose(lp, ref_lp, atol=1e-9)
        assert np.allclose(lowrank_logits(z, q, t, lr), full / temp)
        assert stats["tokens_scored"] <= V


def test_bounds_prune_clusters():
    rng = np.random.default_rng(1)
    V, K, r = 5000, 200, 8
    m = rng.permutation(np.concatenate([np.arange(K), rng.integers(0, K, V - K)]))
    t = cluster_tables(m, None, K, width=1)
    lr = lowrank_tables(m, None, rng.standard_normal((V, r)) * 0.01, t)
    ids, _, stats = lowrank_topk(rng.standard_normal(K) * 3, rng.standard_normal(r), t, lr, 5, logprobs=False)
    assert stats["tokens_scored"] < V / 4  # most clusters are never touched


def test_sampler_matches_the_softmax():
    rng = np.random.default_rng(2)
    V, K, r = 12, 4, 2
    m, b, u = rng.integers(0, K, V), rng.standard_normal(V), rng.standard_normal((V, r))
    z, q = rng.standard_normal(K), rng.standard_normal(r)
    s = LowRankSampler(m, b, K, u, temperature=0.8, seed=0)
    draws = np.bincount([s.sample(z, q) for _ in range(20000)], minlength=V) / 20000
    x = (z[m] + b + u @ q) / 0.8
    p = np.exp(x - x.max())
    assert np.abs(draws - p / p.sum()).max() < 0.015


@pytest.mark.parametrize("change, fragment", [
    (lambda c: c["head"].update(rank=99), "head.rank must be in [0, min(vocab_size, d_model) = 32]"),
    (lambda c: c["head"].update(rank=-1), "head.rank must be in"),
    (lambda c: c["head"].update(rank=2.0), "head.rank must be an integer"),
    (lambda c: c.update(head={"type": "dense", "bias": True, "rank": 2}), "vq head only"),
])
def test_bad_rank_in_config(tmp_path, change, fragment):
    ckpt = make_checkpoint(tmp_path / "c", make_config(rank=2))
    cfg = json.loads((ckpt / "config.json").read_text())
    change(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("build", "--model", ckpt, "--out", tmp_path / "o"), fragment)
    assert not (tmp_path / "o").exists()


def test_bad_factors(tmp_path):
    cfg = make_config(rank=2)
    tensors = make_tensors(cfg)
    wrong = dict(tensors, **{"head.lowrank_u": np.zeros((cfg.vocab_size, 3), np.float32)})
    save_checkpoint(tmp_path / "shape", cfg, wrong)
    assert_user_error(run_cli("build", "--model", tmp_path / "shape", "--out", tmp_path / "o"), "head.lowrank_u", "[97, 3]", "[97, 2]")
    bad = dict(tensors)
    bad["head.lowrank_p"] = bad["head.lowrank_p"].copy()
    bad["head.lowrank_p"][1, 3] = np.nan
    save_checkpoint(tmp_path / "nan", cfg, bad)
    assert_user_error(run_cli("build", "--model", tmp_path / "nan", "--out", tmp_path / "o"), "head.lowrank_p", "non-finite", "[1, 3]")
    missing = {k: v for k, v in tensors.items() if k != "head.lowrank_p"}
    save_checkpoint(tmp_path / "missing", cfg, missing)
    assert_user_error(run_cli("build", "--model", tmp_path / "missing", "--out", tmp_path / "o"), "missing tensor", "head.lowrank_p")
    assert not (tmp_path / "o").exists()


def test_inspect_reports_each_term(lr_ckpt):
    info = api.inspect(lr_ckpt)
    terms = info["sizes"]["head"]["terms"]
    V, d = 97, 32
    assert terms["lowrank"]["params"] == RANK * (V + d)
    assert terms["codebook"]["params"] == 11 * d and terms["bias"]["params"] == V and terms["map"]["params"] == V
    assert terms["lowrank"]["params_vs_dense"] == pytest.approx(RANK * (V + d) / (V * d + V))


@pytest.fixture(scope="module")
def dense_src(tmp_path_factory, small_tokenizer):
    return make_checkpoint(tmp_path_factory.mktemp("dsrc") / "ckpt", make_config(vocab=300, head="dense", d=32, layers=1),
                           tokenizer=small_tokenizer)


def test_convert_with_rank_fits_the_residual_and_builds(dense_src, tmp_path):
    from pathlib import Path

    text = tmp_path / "t.txt"
    text.write_text("".join(p.read_text() for p in sorted(Path(__file__).parent.glob("test_*.py"))))
    res = run_cli("convert", "--from", dense_src, "-k", 16, "--rank", 8, "--distill-text", text, "--steps", 20,
                  "--out", tmp_path / "vq", "--json")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    init = report["lowrank_init"]
    assert init["residual_after_lowrank_vs_weight"] < init["residual_vs_weight"]  # the SVD explains part of W - C[M]
    ckpt = api.load_checkpoint(tmp_path / "vq")
    assert ckpt.config.head.rank == 8 and ckpt.tensors["head.lowrank_u"].shape == (300, 8)
    assert "rank 8" in (tmp_path / "vq" / "MODEL_CARD.md").read_text()
    assert api.build("ort", model=tmp_path / "vq", out=tmp_path / "art", steps=3).parity.passed
    # the correction, fitted before distillation, brings the VQ head closer to the dense one than rank 0 does
    plain = json.loads(run_cli("convert", "--from", dense_src, "-k", 16, "--distill-text", text, "--steps", 0,
                               "--out", tmp_path / "vq0", "--json").stdout)
    assert report["before_distillation"]["kl_to_dense"] < plain["before_distillation"]["kl_to_dense"]


def test_convert_finetune_trunk(dense_src, tmp_path):
    from pathlib import Path

    text = tmp_path / "t.txt"
    text.write_text("".join(p.read_text() for p in sorted(Path(__file__).parent.glob("test_*.py"))))
    report = api.convert(dense_src, 16, tmp_path / "ft", distill_text=text, steps=5, rank=2, finetune_trunk=True).report
    assert report["finetune_trunk"]
    dense = api.load_checkpoint(dense_src).tensors
    tuned = api.load_checkpoint(tmp_path / "ft").tensors
    assert not np.array_equal(dense["layers.0.mlp.gate_proj.weight"], tuned["layers.0.mlp.gate_proj.weight"])  # the trunk trained
    assert "end-to-end" in (tmp_path / "ft" / "MODEL_CARD.md").read_text()


def test_convert_rank_bad_input(dense_src, lr_ckpt, tmp_path):
    assert_user_error(run_cli("convert", "--from", dense_src, "-k", 8, "--rank", 33, "--out", tmp_path / "o"),
                      "--rank must be in [0, min(vocab size, d_model) = 32]")
    assert_user_error(run_cli("convert", "--from", lr_ckpt, "-k", 8, "--rank", 2, "--out", tmp_path / "o"),
                      "--rank has no dense head")
    assert_user_error(run_cli("convert", "--from", dense_src, "-k", 8, "--finetune-trunk", "--out", tmp_path / "o"),
                      "--distill-text")
    assert_user_error(run_cli("convert", "--from", dense_src, "-k", 8, "--rank", "-1", "--out", tmp_path / "o"), "--rank must be in")
    assert not (tmp_path / "o").exists()


def test_generate_on_a_rank_r_topk_artifact(tmp_path, small_tokenizer):
    import dataclasses

    from vqexport.profiles import load_profile

    ckpt = make_checkpoint(tmp_path / "c", make_config(vocab=300, rank=4), tokenizer=small_tokenizer)
    art = tmp_path / "topk"
    fp32_topk = dataclasses.replace(load_profile("ort-topk"), codebook="fp32")  # random weights: int8 would flip near-ties
    assert api.build(fp32_topk, model=ckpt, out=art, steps=2).parity.passed
    greedy = api.generate(art, "def main(", max_new_tokens=4)
    assert len(greedy.new_ids) + greedy.stopped_at_eos >= 1
    drawn = api.generate(art, "def main(", max_new_tokens=4, sample=True, top_k=5, seed=1)  # the graph's exact top-k
    assert all(0 <= t < 300 for t in drawn.new_ids)
    # sampling over all V needs every token's correction: the logits, which this top-k graph does not output
    assert_user_error(run_cli("generate", "--artifact", art, "--prompt", "x", "--sample"), "rank-4 correction", "keep_logits")


def test_int8_with_activation_qdq_on_every_head_matmul(lr_ckpt, lr_proto):
    from vqexport.passes.calibrate import head_amax
    from vqexport.passes.int8_codebook import quantize_codebook

    ckpt = api.load_checkpoint(lr_ckpt)
    amax = head_amax(lr_proto, ckpt)
    assert set(amax) == {"hidden", "lowrank"} and all(v > 0 for v in amax.values())
    q = quantize_codebook(lr_proto, amax["hidden"] / 127, amax["lowrank"] / 127)
    head = find_head(q)
    producer = {o: n for n in q.graph.node for o in n.output}
    for node in (head.matmul, head.lowrank.p, head.lowrank.u):  # both inputs of each MatMul come out of a DequantizeLinear
        assert [producer[i].op_type for i in node.input] == ["DequantizeLinear", "DequantizeLinear"], node.name
    ids = np.array([[4, 8, 15, 16, 23, 42]], np.int64)
    ref = _logits(lr_proto, ids, ckpt.config)["logits"]
    got = _logits(q, ids, ckpt.config)["logits"]
    assert np.abs(got - ref).max() < 0.1 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.8

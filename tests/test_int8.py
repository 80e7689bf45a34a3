"""int8 heads: the quantizer, the QDQ and MatMulNBits head graphs, int8 activations, and parity of int8 artifacts."""

import shutil

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from vqexport import api
from vqexport.backends.ort.session import session_options
from vqexport.errors import VQExportError
from vqexport.graph_io import load_graph
from vqexport.head.graph import CODEBOOK_MATMUL, HeadForm, head_model
from vqexport.head.quant import dequantize_rows, quantize_rows
from vqexport.profiles import load_profile, parse_profile

from .conftest import assert_user_error, run_cli
from .models import make_model, random_head

QDQ_LEVEL_0 = {"session.qdq_matmulnbits_accuracy_level": "0"}


def _run_head(head, form, h, level="all", config=None, scales=None, save_as=None):
    """The head alone (head_model) in onnxruntime; ``save_as``: also write the graph ORT actually ran."""
    proto = ir.to_proto(head_model(head, form, scales=scales))
    onnx.checker.check_model(proto, full_check=True)
    so = session_options(level, 1, config)
    if save_as is not None:
        so.optimized_model_filepath = str(save_as)
    sess = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"hidden_states": h})))


def _inits(path, weights=False):
    proto = load_graph(path, load_weights=weights)
    return proto, {t.name: t for t in proto.graph.initializer}


# -- the quantizer ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,qmax", [(8, 127), (7, 63)])
def test_per_row_symmetric_quantization_error_is_bounded(bits, qmax):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((33, 17)).astype(np.float32) * rng.uniform(0.01, 10, size=(33, 1)).astype(np.float32)
    q, scale = quantize_rows(w, bits=bits)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and scale.shape == (33,)
    np.testing.assert_allclose(scale, np.abs(w).max(1) / qmax, rtol=1e-6)
    assert (np.abs(dequantize_rows(q, scale) - w) <= scale[:, None] / 2 + 1e-6 * np.abs(w)).all()
    assert np.abs(q).max() == qmax and (np.abs(q).max(1) == qmax).all()  # every row uses its full range


def test_only_4_7_and_8_bit_codes():
    q, _ = quantize_rows(np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16), bits=4)
    assert q.min() == -7 and q.max() == 7
    for bits in (2, 6, 16):
        with pytest.raises(ValueError, match="bits must be 4, 7 or 8"):
            quantize_rows(np.ones((2, 2), np.float32), bits=bits)


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


# -- profiles: which weight codes a target gets ------------------------------------------------------------------------

@pytest.mark.parametrize("backend,int8,bits", [
    ("ort", {"activations": True}, 7),  # reduce_range defaults on: ORT's int8 x int8 kernel on CPUs without VNNI
    ("ort", {"activations": True, "reduce_range": False}, 8),
    ("ort", {}, 8),
    ("ort", {"reduce_range": True}, 7),
    ("ort", {"encoding": "native"}, 8),  # MatMulNBits codes are always 8-bit (reduce_range there is refused)
    ("trt", {"activations": True}, 8),
])
def test_weight_bits_follow_reduce_range(backend, int8, bits):
    raw = {"backend": backend, "codebook": "int8", "int8": int8}
    if backend == "trt":
        raw["precision"] = "fp16"
    profile = parse_profile(raw, "test")
    assert profile.head_form().weight_bits == bits
    again = parse_profile(profile.to_dict(), "roundtrip", recorded=True)  # the manifest's profile: the same form
    assert again.head_form() == profile.head_form()
    assert ("reduce_range" in profile.to_dict()["int8"]) == ("reduce_range" in int8)


def test_bad_reduce_range(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\ncodebook = "int8"\n[int8]\nreduce_range = "yes"\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "int8.reduce_range must be true or false")


# -- the head graph: QDQ and MatMulNBits encodings --------------------------------------------------------------------

def test_qdq_head_graph_reads_an_int8_codebook():
    head = random_head(120, 48, 9, seed=1)
    proto = ir.to_proto(head_model(head, HeadForm(codebook="int8")))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert inits["head.codebook_q"].dtype == np.int8 and inits["head.codebook_q"].shape == (48, 9)
    assert inits["head.codebook_scale"].shape == (9,) and inits["head.codebook_zero_point"].dtype == np.int8
    assert "head.codebook_t" not in inits
    (dq,) = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert list(dq.input) == ["head.codebook_q", "head.codebook_scale", "head.codebook_zero_point"]
    assert next(a.i for a in dq.attribute if a.name == "axis") == 1
    matmul = next(n for n in proto.graph.node if n.name == CODEBOOK_MATMUL)
    assert matmul.input[1] == dq.output[0]
    # dequantized, the codes are the codebook up to half a step per row
    deq = inits["head.codebook_q"].astype(np.float32) * inits["head.codebook_scale"]
    assert (np.abs(deq.T - head.codebook) <= inits["head.codebook_scale"][:, None] / 2 + 1e-6).all()


def test_native_and_qdq_decode_to_the_same_codebook():
    head = random_head(120, 48, 9, seed=2)  # d = 48: MatMulNBits pads the second block of 32
    h = np.random.default_rng(0).standard_normal((2, 5, 48)).astype(np.float32)
    qdq = _run_head(head, HeadForm(codebook="int8", int8_encoding="qdq"), h, config=QDQ_LEVEL_0)["logits"]
    native = _run_head(head, HeadForm(codebook="int8", int8_encoding="native", accuracy_level=0), h)["logits"]
    np.testing.assert_allclose(qdq, native, atol=1e-4)
    q, scale = quantize_rows(head.codebook)
    ref = (h.astype(np.float64) @ dequantize_rows(q, scale).T.astype(np.float64))[..., head.map] + head.bias
    np.testing.assert_allclose(native, ref, atol=1e-4)  # both are exactly the dequantized codebook
    assert np.abs(ref - head.logits(h)).max() > 1e-4  # and that codebook is really quantized


def test_native_head_graph_is_matmulnbits():
    head = random_head(120, 48, 9, seed=2)
    proto = ir.to_proto(head_model(head, HeadForm(codebook="int8", int8_encoding="native", accuracy_level=0)))
    (node,) = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in node.attribute}
    assert node.domain == "com.microsoft" and node.name == "head/codebook/MatMulNBits"
    assert attrs["bits"] == 8 and attrs["K"] == 48 and attrs["N"] == 9 and attrs["block_size"] == 32 and attrs["accuracy_level"] == 0
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits["head.codebook_q"].data_type == onnx.TensorProto.UINT8 and list(inits["head.codebook_q"].dims) == [9, 2, 32]
    assert not any(n.op_type == "DequantizeLinear" for n in proto.graph.node)


# -- int8 activations ------------------------------------------------------------------------------------------------

def _act_form(bits):
    return HeadForm(codebook="int8", activations=True, weight_bits=bits)


def test_int8_activations_need_calibrated_scales():
    head = random_head(50, 16, 5)
    for scales in (None, {"hidden": 0.0}, {"hidden": float("nan")}):
        with pytest.raises(ValueError, match="activation scale 'hidden' must be calibrated"):
            head_model(head, _act_form(7), scales=scales)


def test_7_bit_weights_keep_onnxruntime_fusion_exact(tmp_path):
    """Why reduce_range is on for ORT with int8 activations: at level "all" ORT fuses Q/DQ + MatMul into
    MatMulIntegerToFloat, whose u8 x s8 kernel on x86 CPUs without VNNI sums pairs of products in int16. With 7-bit
    weight codes no pair can saturate, so the fused kernel computes exactly what the Q/DQ graph says."""
    head = random_head(211, 64, 13, seed=3)
    h = (np.random.default_rng(1).standard_normal((3, 9, 64)) * 2).astype(np.float32)
    scales = {"hidden": float(np.abs(h).max()) / 127}
    exact = _run_head(head, _act_form(7), h, "disable", scales=scales, save_as=tmp_path / "disable.onnx")["logits"]
    fused = _run_head(head, _act_form(7), h, "all", scales=scales, save_as=tmp_path / "all.onnx")["logits"]
    ran = {n.op_type for n in onnx.load(str(tmp_path / "all.onnx")).graph.node}
    assert "MatMulIntegerToFloat" in ran and "MatMul" not in ran  # the fused integer kernel really ran
    assert "MatMul" in {n.op_type for n in onnx.load(str(tmp_path / "disable.onnx")).graph.node}
    np.testing.assert_allclose(fused, exact, atol=1e-4)
    # level "disable" is the graph's exact Q/DQ semantics: quantized activations times dequantized 7-bit weights
    s = np.float32(scales["hidden"])
    hq = np.clip(np.rint(h / s), -128, 127) * s
    q, wscale = quantize_rows(head.codebook, bits=7)
    ref = (hq.astype(np.float64) @ dequantize_rows(q, wscale).T.astype(np.float64))[..., head.map] + head.bias
    np.testing.assert_allclose(exact, ref, atol=1e-4)
    assert np.abs(q).max() == 63


@pytest.fixture(scope="module")
def act_model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("act") / "model", vocab=211, k=13, hidden=64, heads=4, kv_heads=4)


@pytest.fixture(scope="module")
def act_artifact(act_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("act_art")
    profile = tmp / "act.toml"
    profile.write_text('backend = "ort"\nname = "act"\ncodebook = "int8"\n[int8]\nactivations = true\n'
                       '[ort]\nsession_optimization_level = "all"\n'
                       '[parity]\nsteps = 4\natol = 1.0\ntop1_agreement_min = 0.9\nkl_max = 1e-2\ngreedy_must_match = false\n')
    return api.build(str(profile), model=act_model, out=tmp / "art")


def test_int8_activations_artifact_passes_parity(act_artifact):
    r = act_artifact.parity
    assert r.passed, r.failures
    assert r.max_abs_diff <= 1.0 and r.kl_divergence <= 1e-2 and r.top1_agreement >= 0.9
    assert r.max_abs_diff > 0  # really quantized
    assert "reduce_range" not in act_artifact.manifest["profile"]["int8"]  # the default decided the codes


def test_int8_activations_artifact_graph(act_artifact):
    proto, inits = _inits(act_artifact.out / "model.onnx", weights=True)
    head_nodes = [n for n in proto.graph.node if n.name.startswith("head/")]
    ops = [n.op_type for n in head_nodes]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 2
    arrays = {k: numpy_helper.to_array(v) for k, v in inits.items() if k.startswith("head.")}
    assert arrays["head.hidden_scale"] > 0 and arrays["head.hidden_zero_point"].dtype == np.int8
    codes = arrays["head.codebook_q"]
    assert codes.dtype == np.int8 and codes.shape == (64, 13)
    assert np.abs(codes.astype(np.int32)).max() == 63  # 7-bit weight codes: [-63, 63], the full 7-bit range used
    producer = {o: n for n in proto.graph.node for o in n.output}
    matmul = next(n for n in proto.graph.node if n.name == CODEBOOK_MATMUL)
    assert [producer[i].op_type for i in matmul.input] == ["DequantizeLinear", "DequantizeLinear"]


# -- the embedded demo: int8 targets ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def int8_demo(tmp_path_factory):
    return api.build("ort-int8", out=tmp_path_factory.mktemp("int8") / "ort-int8", steps=8)


def test_genai_config_carries_the_session_settings_parity_was_checked_with(int8_demo):
    """onnxruntime-genai runs the directory with the profile's session config entries and optimization level, so
    its logits are those parity measured (the int8 MatMul's accuracy level changes them)."""
    import json

    import onnxruntime_genai as og

    options = json.loads((int8_demo.out / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    assert options["session.qdq_matmulnbits_accuracy_level"] == "4"
    assert options["graph_optimization_level"] == "ORT_ENABLE_ALL"
    prompt = [5, 17, 200, 33, 7]
    model = og.Model(str(int8_demo.out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    genai = np.asarray(gen.get_output("logits"))[0]
    runtime = int8_demo.manifest["runtime"]

    def ort_logits(config):
        so = session_options(runtime["session_optimization_level"], 1, config)
        sess = ort.InferenceSession(str(int8_demo.out / "model.onnx"), so, providers=["CPUExecutionProvider"])
        feeds = {"input_ids": np.asarray([prompt]), "attention_mask": np.ones((1, len(prompt)), np.int64)}
        for i in sess.get_inputs()[2:]:
            feeds[i.name] = np.zeros([1 if k == 0 else (0 if isinstance(n, str) else n) for k, n in enumerate(i.shape)],
                                     np.float32)
        return sess.run(["logits"], feeds)[0][0]

    assert np.abs(genai - ort_logits(runtime["session_config"])).max() <= 1e-5
    assert np.abs(genai - ort_logits({"session.qdq_matmulnbits_accuracy_level": "0"})).max() > 1e-3


def test_int8_artifact_stores_an_int8_codebook(int8_demo):
    proto, inits = _inits(int8_demo.out / "model.onnx", weights=True)
    geo = int8_demo.manifest["config"]
    K, d = geo["head"]["codebook_size"], geo["hidden_size"]
    q = inits["head.codebook_q"]
    assert q.data_type == onnx.TensorProto.INT8 and list(q.dims) == [d, K]
    assert "head.codebook_t" not in inits
    scale = numpy_helper.to_array(inits["head.codebook_scale"])
    assert scale.shape == (K,) and scale.dtype == np.float32
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and dq[0].input[0] == "head.codebook_q"
    assert next(a.i for a in dq[0].attribute if a.name == "axis") == 1
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)


def test_int8_parity_meets_the_goal(int8_demo):
    r = int8_demo.parity
    assert r.passed, r.failures
    assert r.top1_agreement >= 0.99 and r.kl_divergence <= 1e-3
    assert r.max_abs_diff > 0  # it is really quantized
    assert int8_demo.manifest["runtime"]["session_config"] == {"session.qdq_matmulnbits_accuracy_level": "4"}


def test_int8_head_bytes_shrink(int8_demo, demo_artifact):
    int8_head = api.inspect(int8_demo.out)["sizes"]["head"]
    fp32_head = api.inspect(demo_artifact)["sizes"]["head"]
    assert int8_head["tensors"]["head.codebook_q"]["bytes"] * 4 == fp32_head["tensors"]["head.codebook_t"]["bytes"]
    assert int8_head["bytes"] < fp32_head["bytes"]


def test_verify_uses_the_recorded_runtime_settings(int8_demo, tmp_path):
    import json

    def verify(artifact):
        result = run_cli("verify", "--artifact", artifact, "--steps", 8, "--json")
        assert result.exit_code == 0, result.stderr
        return json.loads(result.stdout)

    report = verify(int8_demo.out)
    assert report["passed"]
    assert report["max_abs_diff"] == pytest.approx(int8_demo.parity.max_abs_diff, rel=1e-6)
    # the manifest's session settings are what verify runs with: float activations (accuracy level 0) differ
    copy = tmp_path / "copy"
    shutil.copytree(int8_demo.out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["runtime"]["session_config"] = {"session.qdq_matmulnbits_accuracy_level": "0"}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    level0 = verify(copy)
    assert abs(level0["max_abs_diff"] - report["max_abs_diff"]) > 1e-3


def test_native_encoding_is_matmulnbits_and_meets_the_goal(tmp_path):
    result = api.build("ort-int8-native", out=tmp_path / "art", steps=8)
    proto, inits = _inits(result.out / "model.onnx")
    (node,) = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in node.attribute}
    assert node.domain == "com.microsoft" and attrs["bits"] == 8 and attrs["accuracy_level"] == 4
    assert list(node.input[1:3]) == ["head.codebook_q", "head.codebook_scale"]
    assert inits["head.codebook_q"].data_type == onnx.TensorProto.UINT8
    assert not any(n.op_type == "DequantizeLinear" for n in proto.graph.node)
    r = result.parity
    assert r.passed and r.top1_agreement >= 0.99 and r.kl_divergence <= 1e-3


# -- bad input -------------------------------------------------------------------------------------------------------

def test_int8_needs_a_vq_head(act_model, tmp_path):
    dense = tmp_path / "dense"
    dense.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(act_model / name, dense / name)
    assert_user_error(run_cli("build", "--target", "ort-int8", "--model", dense, "--out", tmp_path / "o"), "no VQ-Logits head")
    assert not (tmp_path / "o").exists()


def test_unknown_int8_encoding(tmp_path, monkeypatch):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\ncodebook = "int8"\n[int8]\nencoding = "magic"\n')
    monkeypatch.chdir(tmp_path)  # no --out: the default ./artifacts/<name> would be here
    assert_user_error(run_cli("build", "--target", f), "int8.encoding must be")
    assert [p.name for p in tmp_path.iterdir()] == ["p.toml"]


def test_native_encoding_errors(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\ncodebook = "int8"\n[int8]\nencoding = "native"\nactivations = true\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "QDQ encoding only")
    f.write_text('backend = "ort"\ncodebook = "int8"\n[int8]\naccuracy_level = 9\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "int8.accuracy_level must be")
    assert not (tmp_path / "o").exists()
    assert load_profile("ort-int8-native").head_form().int8_encoding == "native"


def test_activation_scales_come_from_calibration_prompts_not_parity_prompts():
    """The int8 activation scale is max |h| / 127 over the calibration prompts' states, which are not the states the
    parity check then measures (a scale fitted on those would make parity optimistic)."""
    from vqexport.backends.torch_ref import TorchRunner
    from vqexport.calibrate import activation_scales, calibration_ids
    from vqexport.source import resolve_source
    from vqexport.prompts import left_pad, prompt_ids

    source = resolve_source(None)
    calibration = calibration_ids(source.tokenizer_path, source.geometry.vocab_size)
    parity = prompt_ids(source.tokenizer_path, source.geometry.vocab_size)
    assert not {tuple(p) for p in calibration} & {tuple(p) for p in parity}
    assert sum(map(len, calibration)) > 2 * sum(map(len, parity))
    with TorchRunner.from_source(source) as ref:
        def amax(prompts):
            ids, mask = left_pad(prompts)
            h, _ = ref.hidden(ids, mask, ref.empty_past(ids.shape[0]))
            return float(np.abs(h.numpy()[mask.astype(bool)]).max())

        scale = activation_scales(ref, source)["hidden"]
        assert scale == pytest.approx(amax(calibration) / 127, rel=1e-6)
        assert scale != pytest.approx(amax(parity) / 127, rel=1e-6)

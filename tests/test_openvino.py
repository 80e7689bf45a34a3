"""OpenVINO: the portable graph converted with OpenVINO's own API, verified and benchmarked like every target; and the
ort target's standard-op model.onnx running unchanged in OpenVINO."""

import importlib.util
import json
import shutil

import numpy as np
import openvino as ov  # a test dependency ('.[test]'): missing, this module fails
import pytest

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner

from .conftest import assert_user_error, generate_in_a_fresh_process, run_cli


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    return api.build("openvino", out=tmp_path_factory.mktemp("ov") / "fp32")


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    return api.build("openvino-int4", out=tmp_path_factory.mktemp("ov") / "int4")


def test_openvino_artifact_matches_pytorch(fp32):
    r = fp32.parity
    assert r.passed and r.max_abs_diff <= 1e-4 and r.greedy_match_steps == r.steps == 32
    files = set(fp32.manifest["files"])
    assert {"model.xml", "model.bin", "vq_head.json"} <= files and not files & {"model.onnx", "model.onnx.data"}
    assert not (fp32.out / "model.onnx").exists() and "onnx_file" not in fp32.manifest["runtime"]  # the IR alone
    rt = fp32.manifest["runtime"]
    assert rt["backend"] == "openvino" and rt["device"] == "CPU" and fp32.manifest["versions"]["openvino"]
    model = ov.Core().read_model(str(fp32.out / "model.xml"))
    assert [p.any_name for p in model.inputs][:2] == ["input_ids", "attention_mask"]
    assert {p.get_element_type().get_type_name() for p in model.outputs} == {"f32"}


def test_build_says_the_sizes_are_the_onnx_graphs(fp32, capsys):
    from vqexport.cli import _print_built

    _print_built(fp32)
    out = capsys.readouterr().out
    assert "params in the ONNX graph the runtime's model.xml was made from (not kept)" in out
    assert "model.bin" in out


def test_verify_and_bench_run_the_ir(fp32):
    v = run_cli("verify", "--artifact", fp32.out, "--steps", 4, "--json")
    assert v.exit_code == 0, v.stderr
    assert json.loads(v.stdout)["passed"] is True
    b = run_cli("bench", "--artifact", fp32.out, "--tokens", 4, "--prompt-length", 8, "--repeats", 1, "--json")
    assert b.exit_code == 0, b.stderr
    out = json.loads(b.stdout)
    assert out["vq"]["tokens_per_s"] > 0 and out["target"] == "openvino" and out["backend"] == "openvino"
    assert "end-to-end latency (OpenVINO)" in run_cli("bench", "--artifact", fp32.out, "--tokens", 4, "--prompt-length", 8,
                                                      "--repeats", 1).stdout
    b = run_cli("bench", "--artifact", fp32.out, "--vs-dense", "--tokens", 4, "--prompt-length", 8, "--repeats", 1, "--json")
    assert b.exit_code == 0, b.stderr
    out = json.loads(b.stdout)  # the dense twin, converted to IR like the artifact: a V x d output layer instead of the head
    V, d = fp32.manifest["config"]["vocab_size"], fp32.manifest["config"]["hidden_size"]
    assert out["dense"]["tokens_per_s"] > 0 and out["ratios"]["tokens_per_s"] > 0
    assert out["dense"]["model_bytes"] - out["vq"]["model_bytes"] > 0.5 * V * d * 4


def test_keep_onnx_keeps_the_graph_the_ir_was_made_from(fp32, tmp_path):
    """[openvino] keep_onnx = true: the same IR, verified and recorded as without it, and model.onnx + data beside
    it, which inspect then reads; the IR alone (the default) is inspected through OpenVINO, with the sizes the build
    recorded from that graph."""
    profile = tmp_path / "openvino.toml"  # the bundled profile's name: the IR's metadata names the target
    profile.write_text('name = "openvino"\nbackend = "openvino"\n[openvino]\nkeep_onnx = true\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nbackend = "openvino"\n[openvino]\nkeep_onnx = "yes"\n')
    assert_user_error(run_cli("build", "--target", bad, "--out", tmp_path / "bad"), "openvino.keep_onnx must be true or false")
    assert not (tmp_path / "bad").exists()
    kept = api.build(profile, out=tmp_path / "kept")
    m, lean = kept.manifest, fp32.manifest
    assert set(m["files"]) == set(lean["files"]) | {"model.onnx", "model.onnx.data"}
    assert m["runtime"]["onnx_file"] == "model.onnx" and m["runtime"]["model_file"] == "model.xml"
    assert m["files"]["model.bin"] == lean["files"]["model.bin"]  # the xml too, but for the names OpenVINO numbers per process
    assert m["sizes"] == lean["sizes"] and m["opset"] == lean["opset"]  # the graph's, recorded before it was dropped
    assert kept.parity.passed and kept.parity.max_abs_diff == fp32.parity.max_abs_diff

    graph, ir_only = api.inspect(kept.out), api.inspect(fp32.out)
    assert graph["sizes"] == ir_only["sizes"] == lean["sizes"]
    assert "Parameter" not in graph["ops"] and ir_only["ops"]["Parameter"] == len(ir_only["inputs"])  # OpenVINO's ops
    assert [v["name"] for v in ir_only["inputs"]][:2] == ["input_ids", "attention_mask"]
    assert ir_only["outputs"][0]["name"] == "logits" and ir_only["ops"]["MatMul"] > 0
    assert ir_only["deployed"]["files"] == {n: lean["files"][n]["bytes"] for n in ("model.xml", "model.bin")}
    assert "does not keep it" in ir_only["deployed"]["note"] and "model.onnx" in graph["deployed"]["note"]
    shown = run_cli("inspect", fp32.out)
    assert shown.exit_code == 0 and "the ONNX graph the IR was made from" in shown.stdout, shown.stderr
    b = run_cli("bench", "--artifact", kept.out, "--vs-dense", "--tokens", 2, "--prompt-length", 4, "--repeats", 1, "--json")
    assert b.exit_code == 0 and json.loads(b.stdout)["dense"]["tokens_per_s"] > 0, b.stderr


def test_the_dense_twin_is_the_irs_trunk_with_the_dense_layer(fp32, int4, tmp_path):
    """bench --vs-dense's twin: the IR's own trunk, the head replaced by W[v] = C[M[v]] and the head's bias, so with
    fp32 weights it gives the artifact's logits; with int4 weights its layer is compressed as a dense model's last
    MatMul (int8), the trunk's weights left as the build compressed them."""
    from vqexport.backends.openvino.runner import OvRunner
    from vqexport.backends.openvino.twin import dense_twin_ir
    from vqexport.head.spec import read_head

    cfg = fp32.manifest["config"]
    V, d = cfg["vocab_size"], cfg["hidden_size"]
    ids = np.array([[5, 77, 300, 12, 9, 1000], [8, 41, 8, 600, 7, 3]], np.int64)
    (tmp_path / "fp32").mkdir()
    twin, layer = dense_twin_ir(fp32.out, fp32.manifest["runtime"], read_head(fp32.out), None, False, tmp_path / "fp32")
    assert layer == V * d * 4
    names = {op.get_friendly_name() for op in ov.Core().read_model(str(twin)).get_ops()}
    assert "head/dense/MatMul" in names and not any(n.startswith("head/codebook") or n.startswith("head.") for n in names)
    with OvRunner(fp32.out / "model.xml") as art, OvRunner(twin) as dense:
        want = art.step(ids, np.ones_like(ids), art.empty_past(2))
        got = dense.step(ids, np.ones_like(ids), dense.empty_past(2))
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4)
    np.testing.assert_allclose(got.present[0], want.present[0], atol=1e-6)
    (tmp_path / "int4").mkdir()
    twin4, layer4 = dense_twin_ir(int4.out, int4.manifest["runtime"], read_head(int4.out), None, False, tmp_path / "int4")
    assert V * d <= layer4 < 1.1 * V * d  # int8 codes, with a scale and zero point per row
    consts = [op for op in ov.Core().read_model(str(twin4)).get_ops() if op.get_type_name() == "Constant"]
    assert sum(op.get_element_type().get_type_name() == "u4" for op in consts) == 2 * 3 * 7  # the trunk's, as built


def test_a_soft_capped_models_twin_caps_its_logits(tmp_path, small_tokenizer):
    """Gemma 2 caps its logits (final_logit_softcapping): its twin's logits are the artifact's, capped the same way."""
    from vqexport.backends.openvino.runner import OvRunner
    from vqexport.backends.openvino.twin import dense_twin_ir
    from vqexport.head.spec import read_head

    from .models import make_model

    model = make_model(tmp_path / "gemma2", arch="gemma2", vocab=320, hidden=64, heads=4, kv_heads=2, k=20,
                       max_position=512, tokenizer=small_tokenizer, final_logit_softcapping=3.0, sliding_window=4)
    art = api.build("openvino", model=model, out=tmp_path / "art", steps=2)
    cap = art.manifest["config"]["logit_softcap"]
    assert cap == 3.0
    (tmp_path / "twin").mkdir()
    twin, _ = dense_twin_ir(art.out, art.manifest["runtime"], read_head(art.out), cap, False, tmp_path / "twin")
    ids = np.array([[5, 77, 300, 12, 9, 100]], np.int64)
    with OvRunner(art.out / "model.xml") as vq, OvRunner(twin) as dense:
        want = vq.step(ids, np.ones_like(ids), vq.empty_past(1)).logits
        got = dense.step(ids, np.ones_like(ids), dense.empty_past(1)).logits
    assert np.abs(want).max() > 2.0  # the cap bites
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_generate_runs_the_ir_without_torch(fp32, demo_artifact):
    """The artifact ships the model's tokenizer; generate decodes with OpenVINO, the greedy tokens of ONNX Runtime."""
    assert (fp32.out / "tokenizer.json").read_bytes() == (demo_artifact / "tokenizer.json").read_bytes()
    assert "tokenizer.json" in fp32.manifest["files"]
    got = generate_in_a_fresh_process(fp32.out, "def main(", 12, absent=("torch", "onnxruntime"))
    assert len(got["new"]) == 12 or got["stopped_at_eos"], got  # all 12 tokens unless the model's eos came first
    assert got["new"] == api.generate(demo_artifact, "def main(", max_new_tokens=12).new_ids
    result = run_cli("generate", "--artifact", fp32.out, "--prompt", "def main(", "--max-new-tokens", 4, "--sample", "--seed", 3)
    assert result.exit_code == 0 and result.stdout.startswith("def main(") and len(result.stdout) > len("def main("), result.stderr


def test_the_ort_graph_runs_unchanged_in_openvino(demo_artifact):
    """OpenVINO compiles the ort target's model.onnx itself; prefill and a decode step give ONNX Runtime's logits."""
    compiled = ov.Core().compile_model(str(demo_artifact / "model.onnx"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    ids = np.array([[5, 77, 300, 12, 9, 1000], [0, 0, 41, 8, 600, 7]], np.int64)
    mask = (np.arange(6)[None] >= np.array([[0], [2]])).astype(np.int64)
    with OrtRunner.from_artifact(demo_artifact) as ort_runner:
        past = ort_runner.empty_past(2)
        feeds = {"input_ids": ids, "attention_mask": mask, **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": p
                                                               for i, p in enumerate(past)}}
        got = request.infer(feeds)
        want = ort_runner.step(ids, mask, past)
        np.testing.assert_allclose(np.array(got["logits"]), want.logits, atol=1e-4)
        mask2 = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        nxt = np.array([[3], [4]])
        feeds = {"input_ids": nxt, "attention_mask": mask2,
                 **{f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}": np.array(got[f"present.{i // 2}.{('key', 'value')[i % 2]}"])
                    for i in range(len(past))}}
        got2 = request.infer(feeds)
        want2 = ort_runner.step(nxt, mask2, want.present)
    np.testing.assert_allclose(np.array(got2["logits"]), want2.logits, atol=1e-4)


def test_int8_weights_meet_their_measured_goal(tmp_path, fp32):
    assert importlib.util.find_spec("nncf"), "nncf, a test dependency ('.[test]'), is missing"
    result = api.build("openvino-int8", out=tmp_path / "int8")
    r = result.parity
    assert r.passed, r.failures
    assert r.max_abs_diff > 1e-4  # really compressed
    assert result.manifest["files"]["model.bin"]["bytes"] < 0.5 * fp32.manifest["files"]["model.bin"]["bytes"]
    types = {op.get_element_type().get_type_name() for op in ov.Core().read_model(str(result.out / "model.xml")).get_ops()
             if op.get_type_name() == "Constant"}
    assert types & {"u8", "i8"}
    info = api.inspect(result.out)  # the sizes read from the ONNX graph are fp32's: inspect says what OpenVINO loads
    deployed = info["deployed"]
    assert deployed["files"] == {n: result.manifest["files"][n]["bytes"] for n in ("model.xml", "model.bin")}
    assert deployed["files"]["model.bin"] < 0.5 * (info["sizes"]["head"]["bytes"] + info["sizes"]["trunk"]["bytes"])


def test_int4_weights_meet_their_measured_goal(int4, fp32):
    """NNCF's INT4_ASYM in groups of 128; the demo's MLP input (352) takes groups of 32 (NNCF's ADJUST fallback)."""
    result = int4
    r = result.parity
    assert r.passed, r.failures
    assert r.max_abs_diff > 1e-2  # really compressed to int4
    assert result.manifest["files"]["model.bin"]["bytes"] < 0.3 * fp32.manifest["files"]["model.bin"]["bytes"]
    consts = [op for op in ov.Core().read_model(str(result.out / "model.xml")).get_ops() if op.get_type_name() == "Constant"]
    big = {}
    for op in consts:
        if op.get_element_type().get_type_name() in ("u4", "u8") and op.get_output_partial_shape(0).is_static:
            big.setdefault(op.get_element_type().get_type_name(), []).append(op)
    layers = 3 * 7  # q, k, v, o, gate, up, down per layer: weights and zero points in u4
    assert len(big["u4"]) == 2 * layers
    assert len(big["u8"]) == 2 * 2  # the embedding table and the head's codebook stay int8 (NNCF's rule)


def test_int8_weights_meet_their_goal_with_a_two_stage_head(tmp_path):
    """A two-stage head gives its probed tokens the output layer's exact logits, which NNCF compresses with the
    embedding table: the dense model's own int8 error, near-ties and all, within the profile's tolerances."""
    import torch
    from safetensors.torch import load_file

    from vqexport.convert.clustering import EQUAL, cluster
    from vqexport.convert.init import head_from_assignment
    from vqexport.head.spec import make_head, write_head
    from vqexport.source import resolve_source

    assert importlib.util.find_spec("nncf"), "nncf, a test dependency ('.[test]'), is missing"
    demo = resolve_source(None)
    model = shutil.copytree(demo.path, tmp_path / "model")
    weight = load_file(str(model / "model.safetensors"))["model.embed_tokens.weight"]
    codebook, mapping, bias = head_from_assignment(weight, None, cluster(weight, 512, EQUAL), 512, torch.zeros(weight.shape[1]))
    write_head(model, make_head({"codebook": codebook.numpy(), "map": mapping.numpy(), "bias": bias.numpy()}, probes=32))
    result = api.build("openvino-int8", model=model, out=tmp_path / "int8")
    r = result.parity
    assert r.passed, r.failures
    assert r.max_abs_diff > 1e-4 and result.manifest["config"]["head"]["type"] == "two-stage"


def test_openvino_missing_is_one_line_with_the_hint(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    assert_user_error(run_cli("build", "--target", "openvino", "--out", tmp_path / "o"), "OpenVINO", "pip install 'vqexport[openvino]'")
    assert not (tmp_path / "o").exists()


def test_a_device_openvino_does_not_find_is_one_line(tmp_path):
    f = tmp_path / "npu.toml"
    f.write_text('backend = "openvino"\nname = "npu"\n[openvino]\ndevice = "NPU"\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "OpenVINO finds no NPU device here")
    assert not (tmp_path / "o").exists()
    f.write_text('backend = "ort"\nname = "x"\n[openvino]\ndevice = "CPU"\n')
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), "[openvino] applies to backend = 'openvino' only")


def test_an_ir_modified_after_the_build_is_refused(fp32, tmp_path):
    copy = shutil.copytree(fp32.out, tmp_path / "art")
    xml = (copy / "model.xml").read_text()
    (copy / "model.xml").write_text(xml.replace("<layers>", "<layers>\n", 1))
    assert_user_error(run_cli("verify", "--artifact", copy, "--steps", 1), "model.xml", "modified since the build")
    assert_user_error(run_cli("bench", "--artifact", copy, "--tokens", 2, "--repeats", 1), "model.xml", "modified since the build")


def test_generate_checks_the_ir_files_sizes(fp32, tmp_path):
    """generate, the app-side path, checks each file's size against the manifest (not its hash): a changed size is one
    line naming the file, and nothing is generated."""
    for name in ("model.xml", "model.bin"):
        copy = shutil.copytree(fp32.out, tmp_path / name)
        with open(copy / name, "ab") as f:
            f.write(b"\n")
        result = run_cli("generate", "--artifact", copy, "--prompt", "def main(", "--max-new-tokens", 2)
        assert_user_error(result, str(copy / name), "modified since the build")
        assert result.stdout == ""


def test_doctor_reports_openvino():
    d = api.doctor()
    assert d["machine"]["openvino"] and "CPU" in d["machine"]["openvino_devices"]
    assert d["targets"]["openvino"]["build"] is True

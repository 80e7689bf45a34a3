"""Triton Inference Server layout: the repository on disk, config.pbtxt parsed with Triton's own ModelConfig schema."""

import json

import pytest

from vqexport.errors import VQExportError
from vqexport.graph_io import load_graph
from vqexport.profiles import bundled_dir, load_profile
from vqexport.serving.triton import config_text, validate_config

from .conftest import assert_user_error, run_cli


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The embedded demo built for triton-ort (the CLI, --json)."""
    out = tmp_path_factory.mktemp("triton") / "repo"
    result = run_cli("build", "--target", "triton-ort", "--out", out, "--steps", "4", "--json")
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.fixture(scope="module")
def model(repo):
    out, _ = repo
    return load_graph(out / "vqlogits" / "1" / "model.onnx")


def test_repository_layout(repo):
    out, manifest = repo
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "manifest.json", "tokenizer.json", "tokenizer_config.json", "vq_head.json", "vq_head.safetensors",
        "vqlogits", "vqlogits/1", "vqlogits/1/model.onnx", "vqlogits/1/model.onnx.data", "vqlogits/config.pbtxt"]
    assert manifest["runtime"]["model_file"] == "vqlogits/1/model.onnx"
    assert manifest["runtime"]["triton"] == {"model_name": "vqlogits", "config": "vqlogits/config.pbtxt", "platform": "onnxruntime_onnx"}
    assert set(manifest["files"]) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert "genai_config.json" not in manifest["files"] and manifest["runtime"]["optimized_file"] is None


def test_the_graph_finds_its_weights_beside_it(repo):
    import onnx

    out, _ = repo
    proto = onnx.load(str(out / "vqlogits" / "1" / "model.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}  # relative to model.onnx: the two files moved together
    onnx.load_external_data_for_model(proto, str(out / "vqlogits" / "1"))
    assert onnx.numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "head.bias")).shape == (8192,)


def test_config_parses_with_tritons_schema_and_declares_the_cache(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out, _ = repo
    cfg = text_format.Parse((out / "vqlogits" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "vqlogits" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8] and cfg.dynamic_batching.max_queue_delay_microseconds == 100
    inputs = {i.name: list(i.dims) for i in cfg.input}
    outputs = {o.name: list(o.dims) for o in cfg.output}
    assert set(inputs) == {"input_ids", "attention_mask"} | {f"past_key_values.{i}.{k}" for i in range(3) for k in ("key", "value")}
    assert set(outputs) == {"logits"} | {f"present.{i}.{k}" for i in range(3) for k in ("key", "value")}
    assert inputs["input_ids"] == [-1] and inputs["attention_mask"] == [-1]
    assert inputs["past_key_values.2.value"] == [4, -1, 32] and outputs["present.0.key"] == [4, -1, 32]
    assert outputs["logits"] == [-1, 8192]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert cfg.input[0].data_type == model_config_pb2.TYPE_INT64 and cfg.output[0].data_type == model_config_pb2.TYPE_FP32


def test_the_repository_artifact_verifies(repo):
    from vqexport import api

    out, _ = repo
    report = api.verify(out, steps=2)
    assert report.passed, report.failures
    assert report.steps == 2 and report.max_abs_diff <= load_profile("triton-ort").parity.atol


@pytest.mark.parametrize("old,new,fragment", [
    ('dims: [ -1, 8192 ]', 'dims: [ -1, 8191 ]', "output 'logits' is TYPE_FP32 [-1, 8191], the graph has TYPE_FP32 [-1, 8192]"),
    ('name: "input_ids" data_type: TYPE_INT64', 'name: "input_ids" data_type: TYPE_INT32', "input 'input_ids' is TYPE_INT32"),
    ('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"', "platform 'tensorrt_plan'"),
    ('name: "vqlogits"', 'name: "other"', "name 'other' is not the model directory 'vqlogits'"),
    ("max_batch_size: 8", "max_batch_size: 8\nmax_batch_sizes: 8", "not a valid Triton model config"),
    ("preferred_batch_size: [ 4, 8 ]", "preferred_batch_size: [ 4, 16 ]", "preferred batch sizes [16] exceed max_batch_size 8"),
    ('{ name: "present.2.value"', '{ name: "present.9.value"', "output 'present.9.value' is not in the graph"),
])
def test_a_wrong_config_is_refused(model, old, new, fragment):
    profile = load_profile("triton-ort")
    text = config_text(model, profile)
    assert old in text
    validate_config(text, model, profile)  # the written form passes
    with pytest.raises(VQExportError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        validate_config(text.replace(old, new), model, profile)


def test_undeclared_kv_input_is_refused(model):
    profile = load_profile("triton-ort")
    text = "\n".join(ln for ln in config_text(model, profile).splitlines() if "past_key_values.1.value" not in ln)
    with pytest.raises(VQExportError, match=r"input 'past_key_values.1.value' is not declared"):
        validate_config(text, model, profile)


def test_trt_config_lists_both_optimization_profiles(tmp_path_factory):
    """The triton-trt config, written from the graph the engine is built from (fp16 trunk): no GPU needed."""
    from vqexport.build import reference_runner, write_graph
    from vqexport.source import resolve_source

    profile = load_profile("triton-trt")
    source = resolve_source(None)
    d = tmp_path_factory.mktemp("triton-trt")
    write_graph(d, profile, source, reference_runner(source))
    graph = load_graph(d / "model.onnx")
    text = config_text(graph, profile)
    assert 'platform: "tensorrt_plan"' in text and 'profile: [ "0", "1" ]' in text and "kind: KIND_GPU" in text
    cfg = validate_config(text, graph, profile)
    assert [list(g.profile) for g in cfg.instance_group] == [["0", "1"]]
    assert {o.name: list(o.dims) for o in cfg.output}["logits"] == [-1, 8192]  # the fp16 trunk's graph keeps fp32 I/O
    from tritonclient.grpc import model_config_pb2

    fp32 = [x.name for x in list(cfg.input) + list(cfg.output) if x.data_type == model_config_pb2.TYPE_FP32]
    assert len(fp32) == 6 + 7  # the KV cache in, logits and the KV cache out


def test_bad_triton_table(tmp_path):
    text = (bundled_dir() / "triton-ort.toml").read_text().replace('model_name = "vqlogits"', 'model_name = "../up"')
    (tmp_path / "t.toml").write_text(text)
    assert_user_error(run_cli("build", "--target", tmp_path / "t.toml", "--out", tmp_path / "o"), "triton.model_name must be")
    text = text.replace('model_name = "../up"', 'model_name = "m"').replace("max_batch_size = 8", "max_batch_size = 2")
    (tmp_path / "t.toml").write_text(text)
    assert_user_error(run_cli("build", "--target", tmp_path / "t.toml", "--out", tmp_path / "o"),
                      "preferred_batch_sizes [4, 8] exceed max_batch_size 2")
    text = text.replace("max_batch_size = 2", "max_batch_size = 8").replace('instance_kind = "KIND_CPU"', 'instance_kind = "KIND_TPU"')
    (tmp_path / "t.toml").write_text(text)
    assert_user_error(run_cli("build", "--target", tmp_path / "t.toml", "--out", tmp_path / "o"), "triton.instance_kind must be")
    assert not (tmp_path / "o").exists()


def test_missing_schema_package_is_one_line(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def no_tritonclient(name, *a, **k):
        if name.startswith("tritonclient"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tritonclient)
    result = run_cli("build", "--target", "triton-ort", "--out", tmp_path / "o")
    assert_user_error(result, "tritonclient", "vqexport[triton]")
    assert not (tmp_path / "o").exists()

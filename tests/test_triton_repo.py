"""Triton Inference Server layout: the repository on disk, config.pbtxt parsed with Triton's own ModelConfig schema."""

import json

import onnx
import pytest

from vqexport.errors import VQExportError
from vqexport.profiles import load_profile
from vqexport.serving.triton import config_text, validate_config

from .conftest import assert_user_error, make_checkpoint, run_cli

pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient (its model-config schema) is not installed")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    base = tmp_path_factory.mktemp("triton")
    ckpt = make_checkpoint(base / "ckpt")
    out = base / "repo"
    result = run_cli("build", "--target", "triton-ort", "--model", ckpt, "--out", out, "--steps", "4", "--json")
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def test_repository_layout(repo):
    out, manifest = repo
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "manifest.json", "vqlogits", "vqlogits/1", "vqlogits/1/model.onnx", "vqlogits/config.pbtxt"]
    assert manifest["runtime"]["model_file"] == "vqlogits/1/model.onnx"
    assert manifest["runtime"]["triton"] == {"model_name": "vqlogits", "config": "vqlogits/config.pbtxt", "platform": "onnxruntime_onnx"}
    assert set(manifest["files"]) == {"vqlogits/1/model.onnx", "vqlogits/config.pbtxt"}


def test_config_parses_with_tritons_schema_and_declares_the_cache(repo):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    out, _ = repo
    cfg = text_format.Parse((out / "vqlogits" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert cfg.name == "vqlogits" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 8
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8] and cfg.dynamic_batching.max_queue_delay_microseconds == 100
    inputs = {i.name: list(i.dims) for i in cfg.input}
    outputs = {o.name: list(o.dims) for o in cfg.output}
    assert inputs["input_ids"] == [-1] and inputs["attention_mask"] == [-1]
    assert inputs["past_key_values.1.value"] == [2, -1, 8] and outputs["present.0.key"] == [2, -1, 8]
    assert outputs["logits"] == [-1, 97]
    assert cfg.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert cfg.input[0].data_type == model_config_pb2.TYPE_INT64


def test_the_repository_artifact_verifies(repo):
    out, _ = repo
    result = run_cli("verify", "--artifact", out, "--steps", "2", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["passed"]


def _model(repo):
    out, _ = repo
    return onnx.load(str(out / "vqlogits" / "1" / "model.onnx"))


@pytest.mark.parametrize("old,new,fragment", [
    ('dims: [ -1, 97 ]', 'dims: [ -1, 96 ]', "output 'logits' is TYPE_FP32 [-1, 96], the graph has TYPE_FP32 [-1, 97]"),
    ('name: "input_ids" data_type: TYPE_INT64', 'name: "input_ids" data_type: TYPE_INT32', "input 'input_ids' is TYPE_INT32"),
    ('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"', "platform 'tensorrt_plan'"),
    ("max_batch_size: 8", "max_batch_size: 8\nmax_batch_sizes: 8", "not a valid Triton model config"),
    ("preferred_batch_size: [ 4, 8 ]", "preferred_batch_size: [ 4, 16 ]", "preferred batch sizes [16] exceed max_batch_size 8"),
])
def test_a_wrong_config_is_refused(repo, old, new, fragment):
    profile = load_profile("triton-ort")
    model = _model(repo)
    text = config_text(model, profile)
    assert old in text
    validate_config(text, model, profile)  # the written form passes
    with pytest.raises(VQExportError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        validate_config(text.replace(old, new), model, profile)


def test_undeclared_kv_input_is_refused(repo):
    profile = load_profile("triton-ort")
    model = _model(repo)
    text = "\n".join(ln for ln in config_text(model, profile).splitlines() if "past_key_values.1.value" not in ln)
    text = text.replace("dims: [ 2, -1, 8 ] },\n]", "dims: [ 2, -1, 8 ] }\n]")
    with pytest.raises(VQExportError, match="input 'past_key_values.1.value' is not declared"):
        validate_config(text, model, profile)


def test_trt_config_lists_both_optimization_profiles(repo):
    profile = load_profile("triton-trt")
    text = config_text(_model(repo), profile)
    assert 'platform: "tensorrt_plan"' in text and 'profile: [ "0", "1" ]' in text and "KIND_GPU" in text
    validate_config(text, _model(repo), profile)


def test_bad_triton_table(tmp_path):
    from vqexport.profiles import bundled_dir

    text = (bundled_dir() / "triton-ort.toml").read_text().replace('model_name = "vqlogits"', 'model_name = "../up"')
    (tmp_path / "t.toml").write_text(text)
    assert_user_error(run_cli("build", "--target", tmp_path / "t.toml"), "triton.model_name must be")
    text = text.replace('model_name = "../up"', 'model_name = "m"').replace("max_batch_size = 8", "max_batch_size = 2")
    (tmp_path / "t.toml").write_text(text)
    assert_user_error(run_cli("build", "--target", tmp_path / "t.toml"), "preferred_batch_sizes [4, 8] exceed max_batch_size 2")


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

"""TensorRT target pieces that must hold on CPU: profile validation, shapes, the missing-TensorRT/GPU refusal,
engine compatibility on verify / bench, and the profiles' round trip through the manifest."""

import json

import pytest

from vqexport.artifact import write_manifest
from vqexport.backends.trt import env
from vqexport.backends.trt.env import check_engine_runs_here
from vqexport.backends.trt.shapes import check_fits_run, input_shapes
from vqexport.build import fingerprint, source_record
from vqexport.checkpoint import resolve_checkpoint
from vqexport.errors import VQExportError
from vqexport.profiles import bundled_dir, load_profile, parse_profile

from .conftest import assert_user_error, make_checkpoint, make_config, run_cli

HAS_TRT_AND_GPU = env.probe()["tensorrt"] is not None and env.probe()["gpu"] is not None


def user_toml(tmp_path, base="trt", **replace):
    text = (bundled_dir() / f"{base}.toml").read_text()
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("target", ["trt", "trt-fp16", "trt-int8", "triton-ort", "triton-trt"])
def test_profiles_round_trip_through_the_manifest(target):
    p = load_profile(target)
    assert parse_profile(json.loads(json.dumps(p.to_dict())), "manifest").to_dict() == p.to_dict()


def test_trt_is_trt_fp16():
    a, b = load_profile("trt").to_dict(), load_profile("trt-fp16").to_dict()
    assert a.pop("name") == "trt" and b.pop("name") == "trt-fp16"
    assert a == b and a["precision"] == "fp16"


@pytest.mark.parametrize("old,new,fragment", [
    ("batch = [1, 1, 8]\nsequence", "batch = [8, 4, 2]\nsequence", "trt.prefill.batch = [8, 4, 2]: inconsistent shapes"),
    ("past = [1, 128, 1023]", "past = [1, 2000, 1023]", "trt.decode.past = [1, 2000, 1023]: inconsistent shapes"),
    ("sequence = [1, 64, 512]", "sequence = [1, 64]", "trt.prefill.sequence must be [min, opt, max]"),
    ("sequence = [1, 64, 512]", "sequence = [0, 64, 512]", "min 0 must be >= 1"),
    ("past = [1, 128, 1023]", "past = [1, 128, 1023]\nbeam = 2", "unknown key(s) in [trt.decode]: beam"),
    ('hardware_compatibility = "none"', 'hardware_compatibility = "any"', "trt.hardware_compatibility must be"),
    ('precision = "fp16"', 'precision = "int4"', "precision must be 'fp32' or 'fp16'"),
])
def test_bad_trt_profile_is_one_line(tmp_path, old, new, fragment):
    result = run_cli("build", "--target", user_toml(tmp_path, **{old: new}), "--out", tmp_path / "out")
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_trt_table_on_an_ort_profile(tmp_path):
    path = user_toml(tmp_path, "ort", **{"[parity]": "[trt]\ntiming_cache = true\n\n[parity]"})
    assert_user_error(run_cli("build", "--target", path), "[trt] applies to backend = 'trt' only")


def test_unknown_precision(tmp_path):
    path = user_toml(tmp_path, "ort", **{'precision = "fp32"': 'precision = "bf16"'})
    assert_user_error(run_cli("build", "--target", path), "precision must be 'fp32' or 'fp16'", "ort backend")


@pytest.mark.parametrize("old,new,fragment", [
    ("sequence = [1, 64, 512]", "sequence = [1, 64, 4096]", "exceeds the model's max_position"),
    ("activations = true", "activations = false", "explicit Q/DQ on both MatMul inputs"),
])
def test_profile_that_does_not_fit_the_model(tmp_path, old, new, fragment):
    ckpt = make_checkpoint(tmp_path / "ckpt", max_position=2048)
    path = user_toml(tmp_path, "trt-int8", **{old: new})
    result = run_cli("build", "--target", path, "--model", ckpt, "--out", tmp_path / "out", "--check-only")
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_triton_batch_beyond_the_engine(tmp_path):
    path = user_toml(tmp_path, "triton-trt", **{"max_batch_size = 8": "max_batch_size = 16", "[4, 8]": "[4, 16]"})
    result = run_cli("build", "--target", path, "--check-only", "--model", make_checkpoint(tmp_path / "c", max_position=2048))
    assert_user_error(result, "triton.max_batch_size 16 exceeds the engine's largest batch 8")


@pytest.mark.skipif(HAS_TRT_AND_GPU, reason="this machine has TensorRT and a GPU")
@pytest.mark.parametrize("target", ["trt", "trt-int8", "triton-trt"])
def test_no_tensorrt_or_gpu_is_one_line_and_nothing_written(tmp_path, target):
    result = run_cli("build", "--target", target, "--out", tmp_path / "out")
    missing = env.probe()
    fragments = (["TensorRT", "vqexport[trt]"] if missing["tensorrt"] is None else []) + (["GPU"] if missing["gpu"] is None else [])
    assert_user_error(result, f"target {target} needs", *fragments)
    assert list(tmp_path.iterdir()) == []


def test_input_shapes_cover_prefill_and_decode():
    p = load_profile("trt")
    cfg = make_config(layers=1, kv_heads=2, d=32, heads=4)
    prefill, decode = input_shapes(p.trt, cfg)
    assert prefill["input_ids"] == ((1, 1), (1, 64), (8, 512))
    assert prefill["past_key_values.0.key"] == ((1, 2, 0, 8), (1, 2, 0, 8), (8, 2, 0, 8))
    assert decode["input_ids"] == ((1, 1), (1, 1), (8, 1))
    assert decode["attention_mask"] == ((1, 2), (1, 129), (8, 1024))
    assert decode["past_key_values.0.value"] == ((1, 2, 1, 8), (1, 2, 128, 8), (8, 2, 1023, 8))
    check_fits_run(p.trt, 3, 20, 32, "x")
    with pytest.raises(VQExportError, match=r"decode.past = 1100 is outside the engine's range \[1, 1023\]"):
        check_fits_run(p.trt, 1, 100, 1001, "x")


HERE = {"tensorrt": "10.15.1", "tensorrt_error": None, "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}, "gpu_error": None}
ENGINE = {"tensorrt": "10.15.1", "gpu": "NVIDIA H100", "compute_capability": "9.0", "hardware_compatibility": "none",
          "version_compatible": False}


@pytest.mark.parametrize("engine,here,fragment", [
    ({}, {}, None),
    ({"tensorrt": "10.13.0"}, {}, "built with TensorRT 10.13.0, this machine has TensorRT 10.15.1"),
    ({"tensorrt": "10.13.0", "version_compatible": True}, {}, None),  # a later TensorRT of the same major runs it
    ({"tensorrt": "11.0.0", "version_compatible": True}, {}, "built with TensorRT 11.0.0"),
    ({"compute_capability": "8.9", "gpu": "NVIDIA L4"}, {}, "compute capability 8.9 (NVIDIA L4), this GPU (NVIDIA H100) is 9.0"),
    ({"compute_capability": "8.9", "hardware_compatibility": "ampere_plus"}, {}, None),
    ({"compute_capability": "8.0", "hardware_compatibility": "ampere_plus"}, {"gpu": {"name": "T4", "compute_capability": "7.5"}}, "compute capability 8.0"),
    ({}, {"tensorrt": None, "tensorrt_error": "not installed"}, "needs TensorRT"),
    ({}, {"gpu": None, "gpu_error": "torch sees no CUDA device"}, "needs an NVIDIA GPU"),
])
def test_engine_compatibility_rule(engine, here, fragment):
    e, h = {**ENGINE, **engine}, {**HERE, **here}
    if fragment is None:
        check_engine_runs_here(e, h, "a.plan")
    else:
        with pytest.raises(VQExportError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            check_engine_runs_here(e, h, "a.plan")


@pytest.fixture
def fake_trt_artifact(tmp_path):
    """A TensorRT artifact as a build on another machine would leave it (the engine bytes are not needed to refuse it)."""
    ckpt = resolve_checkpoint(make_checkpoint(tmp_path / "ckpt", max_position=2048))
    profile = load_profile("trt-int8")
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.plan").write_bytes(b"not an engine")
    source = source_record(ckpt)
    write_manifest(art, {"fingerprint": fingerprint(source, profile), "target": profile.name, "profile": profile.to_dict(),
                         "source": source, "config": ckpt.config.to_dict(), "opset": 18, "versions": {},
                         "runtime": {"backend": "trt", "model_file": "model.plan", "plugins": [], "engine": ENGINE}})
    return art


def test_verify_refuses_an_engine_for_another_gpu_or_version(fake_trt_artifact, monkeypatch):
    from vqexport.backends.trt import runner

    monkeypatch.setattr(runner, "probe", lambda: {**HERE, "tensorrt": "10.13.0"})
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--steps", "2"),
                      "built with TensorRT 10.15.1, this machine has TensorRT 10.13.0", "rebuild it here")
    monkeypatch.setattr(runner, "probe", lambda: {**HERE, "gpu": {"name": "NVIDIA A10", "compute_capability": "8.6"}})
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--steps", "2"), "compute capability 9.0", "is 8.6")


@pytest.mark.skipif(HAS_TRT_AND_GPU, reason="this machine has TensorRT and a GPU")
def test_verify_and_bench_without_tensorrt(fake_trt_artifact):
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--steps", "2"), "running a TensorRT engine needs")
    assert_user_error(run_cli("bench", "--artifact", fake_trt_artifact, "--repeats", "1", "--tokens", "2"), "running a TensorRT engine needs")
    assert_user_error(run_cli("bench", "--artifact", fake_trt_artifact, "--vs-dense"), "--vs-dense", "TensorRT artifact")
    assert_user_error(run_cli("generate", "--artifact", fake_trt_artifact, "--prompt", "x"), "generate runs ONNX Runtime artifacts")


def test_rebuild_reuses_the_previous_timing_cache(fake_trt_artifact, tmp_path):
    from vqexport.build import _previous_timing_cache

    assert _previous_timing_cache(fake_trt_artifact) is None  # the artifact recorded no cache
    manifest = json.loads((fake_trt_artifact / "manifest.json").read_text())
    (fake_trt_artifact / "timing.cache").write_bytes(b"\x01cache")
    manifest["runtime"]["timing_cache"] = "timing.cache"
    manifest.pop("files")
    manifest.pop("format"), manifest.pop("format_version")
    write_manifest(fake_trt_artifact, manifest)
    assert _previous_timing_cache(fake_trt_artifact) == b"\x01cache"
    assert _previous_timing_cache(tmp_path / "nothing-here") is None

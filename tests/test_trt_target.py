"""TensorRT target pieces that must hold on CPU: profile validation, shapes, the missing-TensorRT/GPU refusal,
engine compatibility on verify / bench, the profiles' round trip through the manifest, and the timing cache."""

import json

import pytest

from vqexport.artifact import write_manifest
from vqexport.backends.trt import env
from vqexport.backends.trt.env import check_engine_runs_here
from vqexport.backends.trt.shapes import check_fits_run, input_shapes, profile_for
from vqexport.build import fingerprint, source_record
from vqexport.errors import VQExportError
from vqexport.profiles import bundled_dir, load_profile, parse_profile
from vqexport.source import resolve_source

from .conftest import assert_user_error, run_cli

_HERE = env.probe()
HAS_TRT_AND_GPU = _HERE["tensorrt"] is not None and _HERE["gpu"] is not None
NO_TRT_REASON = f"needs TensorRT and an NVIDIA GPU ({_HERE['tensorrt_error'] or _HERE['gpu_error']})"


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
    back = parse_profile(json.loads(json.dumps(p.to_dict())), "manifest", recorded=True)
    assert back.to_dict() == p.to_dict() and back.trt == p.trt and back.triton == p.triton
    if p.backend == "trt":
        assert p.to_dict()["trt"]["prefill"] == {"batch": [1, 1, 8], "sequence": [1, 64, 512]}


def test_trt_is_trt_fp16():
    a, b = load_profile("trt").to_dict(), load_profile("trt-fp16").to_dict()
    assert a.pop("name") == "trt" and b.pop("name") == "trt-fp16"
    assert a == b and a["precision"] == "fp16" and a["head"] == "fused"


@pytest.mark.parametrize("old,new,fragment", [
    ("batch = [1, 1, 8]\nsequence", "batch = [8, 4, 2]\nsequence", "trt.prefill.batch = [8, 4, 2]: inconsistent shapes"),
    ("past = [1, 128, 1023]", "past = [1, 2000, 1023]", "trt.decode.past = [1, 2000, 1023]: inconsistent shapes"),
    ("sequence = [1, 64, 512]", "sequence = [1, 64]", "trt.prefill.sequence must be [min, opt, max]"),
    ("sequence = [1, 64, 512]", "sequence = [0, 64, 512]", "min 0 must be >= 1"),
    ("past = [1, 128, 1023]", "past = [1, 128, 1023]\nbeam = 2", "unknown key(s) in [trt.decode]: beam"),
    ("timing_cache = true ", "timing_cache = 1 ", "trt.timing_cache must be true or false"),
    ("builder_optimization_level = 3", "builder_optimization_level = 9", "trt.builder_optimization_level must be an integer in [0, 5]"),
    ('hardware_compatibility = "none"', 'hardware_compatibility = "any"', "trt.hardware_compatibility must be"),
    ('precision = "fp16"', 'precision = "int4"', "precision must be 'fp32' or 'fp16'"),
])
def test_bad_trt_profile_is_one_line(tmp_path, old, new, fragment):
    result = run_cli("build", "--target", user_toml(tmp_path, **{old: new}), "--out", tmp_path / "out")
    assert_user_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_trt_table_on_an_ort_profile(tmp_path):
    path = user_toml(tmp_path, "ort", **{"[parity]": "[trt]\ntiming_cache = true\n\n[parity]"})
    assert_user_error(run_cli("build", "--target", path, "--out", tmp_path / "out"), "[trt] applies to backend = 'trt' only")
    assert not (tmp_path / "out").exists()


def test_unknown_precision(tmp_path, monkeypatch):
    path = user_toml(tmp_path, "ort", **{'precision = "fp32"': 'precision = "bf16"'})
    monkeypatch.chdir(tmp_path)  # no --out: the default ./artifacts/<name> would be here
    assert_user_error(run_cli("build", "--target", path), "precision must be 'fp32' or 'fp16'", "ort backend")
    assert [p.name for p in tmp_path.iterdir()] == ["mine.toml"]


@pytest.mark.parametrize("base,old,new,fragment", [
    ("trt-int8", "sequence = [1, 64, 512]", "sequence = [1, 64, 4096]",
     "trt.prefill.sequence max 4096 exceeds the model's max_position 2048"),
    ("trt-int8", "past = [1, 128, 1023]", "past = [1, 128, 2048]", "trt.decode.past max 2048 + 1 exceeds the model's max_position 2048"),
    ("trt-int8", "activations = true", "activations = false", "explicit Q/DQ on both MatMul inputs"),
    ("trt-int8", 'head = "standard"', 'head = "fused"', "the int8 head runs as a standard MatMul"),
    ("triton-trt", 'head = "standard"', 'head = "fused"', "Triton's TensorRT backend cannot load"),
])
def test_profile_that_does_not_fit_the_model(tmp_path, monkeypatch, base, old, new, fragment):
    path = user_toml(tmp_path, base, **{old: new})
    monkeypatch.chdir(tmp_path)
    result = run_cli("build", "--target", path, "--check-only")  # the embedded demo
    assert_user_error(result, fragment)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing written beside the target file


def test_triton_batch_beyond_the_engine(tmp_path):
    path = user_toml(tmp_path, "triton-trt", **{"max_batch_size = 8": "max_batch_size = 16", "[4, 8]": "[4, 16]"})
    result = run_cli("build", "--target", path, "--check-only")
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
    geo = resolve_source(None).geometry  # the embedded demo: 3 layers, 4 KV heads of 32
    assert (geo.n_layers, geo.n_kv_heads, geo.head_dim) == (3, 4, 32)
    prefill, decode = input_shapes(p.trt, geo)
    names = {"input_ids", "attention_mask"} | {f"past_key_values.{i}.{k}" for i in range(3) for k in ("key", "value")}
    assert set(prefill) == set(decode) == names
    assert prefill["input_ids"] == ((1, 1), (1, 64), (8, 512))
    assert prefill["attention_mask"] == ((1, 1), (1, 64), (8, 512))
    assert prefill["past_key_values.0.key"] == ((1, 4, 0, 32), (1, 4, 0, 32), (8, 4, 0, 32))
    assert decode["input_ids"] == ((1, 1), (1, 1), (8, 1))
    assert decode["attention_mask"] == ((1, 2), (1, 129), (8, 1024))
    assert decode["past_key_values.2.value"] == ((1, 4, 1, 32), (1, 4, 128, 32), (8, 4, 1023, 32))
    assert profile_for(0) == 0 and profile_for(7) == 1
    check_fits_run(p.trt, 3, 20, 32, "x")
    with pytest.raises(VQExportError, match=r"decode.past = 1100 is outside the engine's range \[1, 1023\]"):
        check_fits_run(p.trt, 1, 100, 1001, "x")
    with pytest.raises(VQExportError, match=r"prefill.batch = 9 is outside the engine's range \[1, 8\]"):
        check_fits_run(p.trt, 9, 10, 1, "x")


HERE = {"tensorrt": "10.15.1", "tensorrt_error": None, "gpu": {"name": "NVIDIA H100", "compute_capability": "9.0"}, "gpu_error": None}
ENGINE = {"tensorrt": "10.15.1", "gpu": "NVIDIA H100", "compute_capability": "9.0", "hardware_compatibility": "none",
          "version_compatible": False}


@pytest.mark.parametrize("engine,here,fragment", [
    ({}, {}, None),
    ({"tensorrt": "10.13.0"}, {}, "built with TensorRT 10.13.0, this machine has TensorRT 10.15.1"),
    ({"tensorrt": "10.13.0", "version_compatible": True}, {}, None),  # a later TensorRT of the same major runs it
    ({"tensorrt": "10.16.0", "version_compatible": True}, {}, "built with TensorRT 10.16.0"),  # not an older one
    ({"tensorrt": "11.0.0", "version_compatible": True}, {}, "built with TensorRT 11.0.0"),
    ({"compute_capability": "8.9", "gpu": "NVIDIA L4"}, {}, "compute capability 8.9 (NVIDIA L4), this GPU (NVIDIA H100) is 9.0"),
    ({"compute_capability": "8.9", "hardware_compatibility": "ampere_plus"}, {}, None),
    ({"compute_capability": "9.0", "hardware_compatibility": "same_compute_capability", "gpu": "NVIDIA H200"}, {}, None),
    ({"compute_capability": "8.0", "hardware_compatibility": "ampere_plus"}, {"gpu": {"name": "T4", "compute_capability": "7.5"}},
     "compute capability 8.0"),
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
    """A trt-int8 artifact of the embedded demo as a build on another machine would leave it (the engine bytes are
    not needed to refuse it)."""
    source = resolve_source(None)
    profile = load_profile("trt-int8")
    art = tmp_path / "art"
    art.mkdir()
    (art / "model.plan").write_bytes(b"not an engine")
    (art / "model.onnx").write_bytes(b"not a graph")  # the graph the engine was built from, kept beside it
    record = source_record(source)
    write_manifest(art, {"fingerprint": fingerprint(record, profile), "target": profile.name, "profile": profile.to_dict(),
                         "source": record, "config": {**source.geometry.to_dict(), "head": source.head.config.to_dict()},
                         "opset": 18, "versions": {},
                         "runtime": {"backend": "trt", "model_file": "model.plan", "onnx_file": "model.onnx",
                                     "timing_cache": None, "plugins": [], "engine": ENGINE}})
    return art


def test_verify_refuses_an_engine_for_another_gpu_or_version(fake_trt_artifact, monkeypatch):
    from vqexport.backends.trt import runner

    monkeypatch.setattr(runner, "probe", lambda: {**HERE, "tensorrt": "10.13.0"})
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--steps", "2"),
                      "built with TensorRT 10.15.1, this machine has TensorRT 10.13.0", "rebuild it here")
    monkeypatch.setattr(runner, "probe", lambda: {**HERE, "gpu": {"name": "NVIDIA A10", "compute_capability": "8.6"}})
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--steps", "2"), "compute capability 9.0", "is 8.6")


def test_bench_refuses_an_engine_for_another_version_or_a_run_beyond_its_profiles(fake_trt_artifact, monkeypatch):
    monkeypatch.setattr(env, "probe", lambda: {**HERE, "tensorrt": "10.13.0"})
    assert_user_error(run_cli("bench", "--artifact", fake_trt_artifact, "--repeats", "1", "--tokens", "2"),
                      "built with TensorRT 10.15.1, this machine has TensorRT 10.13.0")
    assert_user_error(run_cli("bench", "--artifact", fake_trt_artifact, "--repeats", "1", "--tokens", "2", "--prompt-length", "600"),
                      "prefill.sequence = 600 is outside the engine's range [1, 512]",
                      "keep the run within it, or rebuild with a wider [trt] prefill.sequence")


def test_verify_refuses_prompts_beyond_the_engines_profiles_before_any_work(fake_trt_artifact, tmp_path):
    """The engine is built: prompts it cannot take are refused from its ranges before the reference is loaded."""
    (tmp_path / "nine.json").write_text(json.dumps([[5, 6, 7]] * 9))
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--prompts", tmp_path / "nine.json"),
                      "the prompts given: prefill.batch = 9 is outside the engine's range [1, 8]", "keep the run within it")
    (tmp_path / "long.json").write_text(json.dumps([[5] * 600]))
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--prompts", tmp_path / "long.json", "--steps", 2),
                      "prefill.sequence = 600 is outside the engine's range [1, 512]")


@pytest.mark.skipif(HAS_TRT_AND_GPU, reason="this machine has TensorRT and a GPU")
def test_verify_and_bench_without_tensorrt(fake_trt_artifact):
    need = "running a TensorRT engine needs"
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--steps", "2"), need)
    assert_user_error(run_cli("bench", "--artifact", fake_trt_artifact, "--repeats", "1", "--tokens", "2"), need)
    assert_user_error(run_cli("bench", "--artifact", fake_trt_artifact, "--vs-dense"), "--vs-dense", "TensorRT artifact")
    assert_user_error(run_cli("generate", "--artifact", fake_trt_artifact, "--prompt", "x"), "generate runs ONNX Runtime and OpenVINO artifacts", "trt engine")


def test_a_rebuild_finds_the_previous_timing_cache(fake_trt_artifact, tmp_path):
    from vqexport.build import _previous_timing_cache

    assert _previous_timing_cache(fake_trt_artifact) is None  # the artifact recorded no cache
    manifest = json.loads((fake_trt_artifact / "manifest.json").read_text())
    (fake_trt_artifact / "timing.cache").write_bytes(b"\x01cache")
    manifest["runtime"]["timing_cache"] = "timing.cache"
    for key in ("files", "format", "format_version"):
        manifest.pop(key)
    write_manifest(fake_trt_artifact, manifest)
    assert _previous_timing_cache(fake_trt_artifact) == b"\x01cache"
    (fake_trt_artifact / "timing.cache").unlink()
    assert _previous_timing_cache(fake_trt_artifact) is None  # recorded but gone: a fresh cache
    assert _previous_timing_cache(tmp_path / "nothing-here") is None


@pytest.mark.skipif(not HAS_TRT_AND_GPU, reason=NO_TRT_REASON)
def test_a_rebuild_reuses_the_previous_timing_cache(tmp_path, monkeypatch):
    from vqexport import api
    from vqexport.backends.trt import builder

    seen = []
    real = builder.build_trt

    def spy(out, profile, source, timing_cache=None, graph=None):
        seen.append(timing_cache)
        return real(out, profile, source, timing_cache=timing_cache, graph=graph)

    monkeypatch.setattr(builder, "build_trt", spy)
    out = tmp_path / "art"
    first = api.build("trt-int8", out=out, steps=2)
    assert first.manifest["runtime"]["timing_cache"] == "timing.cache" and "timing.cache" in first.manifest["files"]
    cache = (out / "timing.cache").read_bytes()
    assert seen == [None] and cache
    again = api.build("trt-int8", out=out, steps=2, force=True)
    assert len(seen) == 2 and seen[1] == cache  # the engine build started from the replaced artifact's measurements
    assert again.parity.passed and (out / "timing.cache").is_file()


def test_verify_refuses_decode_steps_beyond_the_engines_profiles_before_any_work(fake_trt_artifact):
    """The built-in prompts too: more decode steps than the built engine's past range are refused from its ranges, with
    the advice for an engine that exists (not 'widen the profile', which would not change this engine)."""
    assert_user_error(run_cli("verify", "--artifact", fake_trt_artifact, "--steps", 1500),
                      "the parity check: decode.past = ", "is outside the engine's range [1, 1023]", "keep the run within it")


def test_a_build_whose_parity_check_exceeds_the_profiles_ranges_is_refused_before_any_work(tmp_path, monkeypatch):
    """Refused from the profile's ranges before the model is exported or an engine built (it used to be refused
    after both, when parity began)."""
    import vqexport.build as build_module

    monkeypatch.setattr(build_module, "check_machine", lambda profile: None)  # as on a machine with TensorRT
    monkeypatch.setattr(build_module, "reference_runner", lambda *a: pytest.fail("the model was loaded"))
    short = tmp_path / "short.toml"
    short.write_text('name = "short"\nbackend = "trt"\n[trt.decode]\nbatch = [1, 1, 8]\npast = [1, 16, 32]\n')
    out = tmp_path / "out"
    assert_user_error(run_cli("build", "--target", short, "--out", out, "--steps", 40),
                      "target short parity check: decode.past = ", "is outside the engine's range [1, 32]",
                      "widen [trt] decode.past in the profile")
    assert not out.exists()

"""A built artifact's manifest and files are checked before they are read or run, and a benchmark worker's user
error reaches the user as one line."""

import hashlib
import json
import shutil
import subprocess

import pytest

from .conftest import assert_user_error, run_cli


def _copy(demo_artifact, tmp_path):
    copy = tmp_path / "art"
    shutil.copytree(demo_artifact, copy)
    return copy


def _edit_manifest(artifact, edit):
    path = artifact / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


CORRUPTIONS = {
    "files-not-an-object": (lambda m: m.update(files="x"), "files must be an object"),
    "runtime-not-an-object": (lambda m: m.update(runtime="x"), "runtime must be an object"),
    "config-not-an-object": (lambda m: m.update(config="x"), "config must be an object"),
    "target-not-a-string": (lambda m: m.update(target={"name": "ort"}), "target must be a string"),
    "no-model-file": (lambda m: m["runtime"].pop("model_file"), "runtime.model_file"),
    "no-providers": (lambda m: m["runtime"].pop("providers"), "runtime.providers"),
    "file-without-bytes": (lambda m: m["files"]["model.onnx"].pop("bytes"), "files['model.onnx']"),
    "file-sha256-not-a-string": (lambda m: m["files"]["model.onnx"].update(sha256=1), "files['model.onnx']"),
    "vocab-size-a-string": (lambda m: m["config"].update(vocab_size="8192"), "config.vocab_size"),
    "head-not-an-object": (lambda m: m["config"].update(head=None), "config.head"),
    "decode-not-an-object": (lambda m: m["profile"].update(decode="x"), "profile.decode"),
    "source-model-missing": (lambda m: m["source"].pop("model"), "source"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_malformed_manifest_is_one_line(demo_artifact, tmp_path, case):
    edit, fragment = CORRUPTIONS[case]
    art = _copy(demo_artifact, tmp_path)
    _edit_manifest(art, edit)
    for args in (["verify", "--artifact", art, "--steps", 1], ["generate", "--artifact", art, "--prompt", "x"],
                 ["inspect", art], ["bench", "--artifact", art, "--repeats", 1, "--tokens", 2, "--prompt-length", 4]):
        assert_user_error(run_cli(*args), "manifest.json", "malformed manifest", fragment)


def test_bench_checks_the_weights_hashes(demo_artifact, tmp_path):
    art = _copy(demo_artifact, tmp_path)
    data = art / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[100:400] = bytes(b ^ 0xFF for b in blob[100:400])  # same size: only the sha256 tells
    data.write_bytes(bytes(blob))
    assert_user_error(run_cli("bench", "--artifact", art, "--repeats", 1, "--tokens", 2, "--prompt-length", 4),
                      "model.onnx.data", "modified since the build")


def test_a_worker_user_error_is_one_line(demo_artifact, tmp_path):
    """A model.onnx onnxruntime cannot load, with a manifest that agrees with it: the worker's own error, exit 2."""
    art = _copy(demo_artifact, tmp_path)
    model = art / "model.onnx"
    blob = bytearray(model.read_bytes())
    blob[100:400] = bytes(b ^ 0xFF for b in blob[100:400])
    model.write_bytes(bytes(blob))
    _edit_manifest(art, lambda m: m["files"]["model.onnx"].update(sha256=hashlib.sha256(blob).hexdigest()))
    assert_user_error(run_cli("bench", "--artifact", art, "--repeats", 1, "--tokens", 2, "--prompt-length", 4),
                      "onnxruntime could not load the model")


def test_a_worker_bug_keeps_runtime_error():
    from vqexport.bench.artifact import worker_failed
    from vqexport.errors import VQExportError

    user = subprocess.CompletedProcess([], 1, "", "Traceback ...\nvqexport.errors.VQExportError: bad input\n")
    with pytest.raises(VQExportError, match="^bad input$"):
        worker_failed(user)
    bug = subprocess.CompletedProcess([], 1, "", "Traceback ...\nZeroDivisionError: division by zero\n")
    with pytest.raises(RuntimeError, match="benchmark worker failed: ZeroDivisionError"):
        worker_failed(bug)
    with pytest.raises(RuntimeError, match="benchmark worker failed: -9"):
        worker_failed(subprocess.CompletedProcess([], -9, "", ""))


def test_bench_e2e_leaves_no_work_dir_on_bad_input(tmp_path):
    work = tmp_path / "x" / "deep"
    assert_user_error(run_cli("bench", "--e2e", "--model", tmp_path / "nonexistent", "--work", work),
                      "model directory does not exist")
    assert not (tmp_path / "x").exists()
    a_file = tmp_path / "f.txt"
    a_file.write_text("")
    assert_user_error(run_cli("bench", "--e2e", "--model", "demo", "--work", a_file), "--work must be a directory")
    assert a_file.read_text() == ""


def test_bench_e2e_text_is_checked_before_any_work(tmp_path):
    work, short = tmp_path / "w", tmp_path / "short.txt"
    short.write_text("x = 1\n")
    assert_user_error(run_cli("bench", "--e2e", "--model", "demo", "--text", short, "--work", work),
                      "short.txt: too short for agreement", "need at least 128")
    assert_user_error(run_cli("bench", "--e2e", "--model", "demo", "--text", tmp_path / "none.txt", "--work", work),
                      "none.txt: cannot read the agreement text")
    assert_user_error(run_cli("bench", "--e2e", "--shape", "qwen2.5-0.5b", "--text", short, "--work", work),
                      "--text applies to --model")
    assert_user_error(run_cli("bench", "--artifact", tmp_path, "--text", short), "--text does not apply to --artifact")
    assert not work.exists()


def test_bench_e2e_refuses_what_onnxruntime_genai_cannot_run_before_any_work(tmp_path):
    work = tmp_path / "w"
    assert_user_error(run_cli("bench", "--e2e", "--model", "demo", "--target", "ort-topk", "--work", work),
                      "target ort-topk outputs the top-k only", "bench --e2e takes a target with logits")
    assert_user_error(run_cli("bench", "--e2e", "--model", "demo", "--prompt-length", 2000, "--tokens", 100, "--work", work),
                      "--prompt-length 2000 + --tokens 100 exceed the model's maximum positions 2048")
    assert not work.exists()


def test_bench_e2e_keeps_another_models_work_apart_even_under_the_same_name(tmp_path):
    """--work keeps conversions and the builder's baselines between runs: a model of the same directory name with
    other weights must not be timed against the first one's."""
    from vqexport.bench.e2e import work_stem
    from vqexport.source import demo_dir, load_source

    a, b = tmp_path / "a" / "m", tmp_path / "b" / "m"
    for d in (a, b):
        shutil.copytree(demo_dir(), d)
    stems = [work_stem(load_source(d, need_head=False)) for d in (a, b)]
    assert stems[0] == stems[1] and stems[0].startswith("m-")  # the same files: the same work
    weights = b / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert work_stem(load_source(b, need_head=False)) != stems[0]


def test_inspect_notices_a_truncated_weights_file(demo_artifact, tmp_path):
    """inspect reads headers only, and still says when a file is shorter than the build left it (an artifact) or
    than the graph's own offsets need (a bare .onnx beside its data), instead of describing what cannot run."""
    art = _copy(demo_artifact, tmp_path)
    data = art / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    assert_user_error(run_cli("inspect", art), "model.onnx.data", "modified since the build")
    assert_user_error(run_cli("inspect", art / "model.onnx"), "model.onnx.data", "truncated", "weights reach byte")
    data.unlink()
    assert_user_error(run_cli("inspect", art / "model.onnx"), "model.onnx.data: missing", "keeps its weights there")
    assert run_cli("inspect", demo_artifact / "model.onnx").exit_code == 0

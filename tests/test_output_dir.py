"""The output directory: refused unless safe, replaced atomically, never left half-written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from vqexport import api
from vqexport.artifact import read_manifest, sha256_file

from .conftest import assert_user_error, run_cli
from .models import make_model


def test_rebuild_same_inputs_is_allowed_and_different_model_is_refused(tmp_path):
    a = make_model(tmp_path / "a", seed=1)
    b = make_model(tmp_path / "b", seed=2)
    out = tmp_path / "out"
    assert run_cli("build", "--model", a, "--out", out, "--steps", 2).exit_code == 0
    manifest = read_manifest(out)
    for name, info in manifest["files"].items():
        assert sha256_file(out / name) == info["sha256"]
    assert run_cli("build", "--model", a, "--out", out, "--steps", 2).exit_code == 0
    (out / "notes").mkdir()
    (out / "notes" / "mine.txt").write_text("mine")  # beside the same artifact: a rebuild would delete it
    assert_user_error(run_cli("build", "--model", a, "--out", out, "--steps", 2), "holds files its artifact does not list",
                      "notes/mine.txt", "--force")
    assert (out / "notes" / "mine.txt").read_text() == "mine"
    (out / "notes" / "mine.txt").unlink()
    (out / "notes").rmdir()
    before = (out / "model.onnx").read_bytes()
    assert_user_error(run_cli("build", "--model", b, "--out", out, "--steps", 2), "already holds a different artifact", "--force")
    assert (out / "model.onnx").read_bytes() == before
    result = run_cli("build", "--model", b, "--out", out, "--steps", 2, "--force")
    assert result.exit_code == 0, result.stderr
    assert (out / "model.onnx").read_bytes() != before
    assert read_manifest(out)["source"]["model"] == str(b.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def test_directory_with_other_files_is_refused(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_user_error(run_cli("build", "--model", tiny_model, "--out", out), "already holds")
    assert (out / "notes.txt").read_text() == "mine"


def test_output_location_not_writable(tmp_path, tiny_model):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run_cli("build", "--model", tiny_model, "--out", blocker / "sub" / "out"), "cannot create output directory")
    assert_user_error(run_cli("build", "--model", tiny_model, "--out", blocker), "exists and is not a directory")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent(tmp_path, tiny_model):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert_user_error(run_cli("build", "--model", tiny_model, "--out", ro / "out"), "not writable")
    finally:
        ro.chmod(0o755)


def test_read_only_parent_refused_by_the_permission_check(tmp_path, tiny_model, monkeypatch):
    """The same refusal where directory permissions do not stop this user (root): the check the build makes, told
    that the parent is not writable."""
    import vqexport.artifact

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    asked = []

    def access(path, mode, *a, **k):
        if os.path.realpath(path) == os.path.realpath(ro) and mode & os.W_OK:
            asked.append(path)
            return False
        return real(path, mode, *a, **k)

    monkeypatch.setattr(vqexport.artifact.os, "access", access)
    assert_user_error(run_cli("build", "--model", tiny_model, "--out", ro / "out"), str(ro), "output location is not writable")
    assert asked and list(ro.iterdir()) == []


def _start_build(ckpt, out):
    # 100 verify steps after the graph is written: a wide enough window to interrupt, even on a loaded machine
    # A test run started in the background (``cmd &`` without job control) ignores SIGINT, and a child inherits an
    # ignored signal; the build must see Ctrl-C as a user's terminal delivers it, so restore the default first.
    return subprocess.Popen([sys.executable, "-m", "vqexport", "build", "--model", str(ckpt), "--out", str(out), "--steps", "100"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_partial(out, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        partial = list(out.parent.glob(f".{out.name}.partial-*"))
        if partial and any((p / "model.onnx").exists() for p in partial if p.is_dir()):
            return partial
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("build never started writing")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_interrupted_build_leaves_no_complete_looking_artifact(tmp_path, tiny_model, sig):
    out = tmp_path / "out"
    proc = _start_build(tiny_model, out)
    _wait_for_partial(out, proc)
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0, proc.communicate()[1].decode()[-2000:]
    assert not out.exists()
    leftovers = list(tmp_path.glob(".out.partial-*"))
    if sig != signal.SIGKILL:
        assert leftovers == []  # cleaned up on the way out
        return
    assert leftovers  # a killed build cleans nothing up
    for p in leftovers:
        assert not (p / "manifest.json").exists()
    # the next build cleans up what a killed one left behind and succeeds
    result = run_cli("build", "--model", tiny_model, "--out", out, "--steps", 2)
    assert result.exit_code == 0, result.stderr
    assert list(tmp_path.glob(".out.partial-*")) == []
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"] is True


def test_parity_failure_exits_1_and_writes_nothing(tmp_path, tiny_model, monkeypatch):
    from vqexport.backends.torch_ref import TorchRunner

    real_step = TorchRunner.step

    def perturbed(self, *args):
        out = real_step(self, *args)
        out.logits[..., 0] += 0.05  # a reference that disagrees with the artifact by more than atol
        return out

    monkeypatch.setattr(TorchRunner, "step", perturbed)
    out = tmp_path / "out"
    result = run_cli("build", "--model", tiny_model, "--out", out, "--json", "--steps", 3)
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["passed"] is False
    assert report["max_abs_diff"] == pytest.approx(0.05, rel=1e-3)
    assert any("atol" in f for f in report["failures"])
    assert "parity FAILED" in result.stderr
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


def test_verify_against_a_different_model_fails_with_exit_1(tmp_path):
    a = make_model(tmp_path / "a", seed=1)
    b = make_model(tmp_path / "b", seed=2)
    out = tmp_path / "out"
    api.build("ort", model=a, out=out, steps=2)
    ok = run_cli("verify", "--artifact", out, "--steps", 3, "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["passed"] is True
    bad = run_cli("verify", "--artifact", out, "--model", b, "--steps", 3, "--json")
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)
    assert report["passed"] is False and report["top1_agreement"] < 1.0


@pytest.mark.parametrize("raised", ["python", "library"])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, tiny_model, monkeypatch, raised):
    """Python's OSError (errno 28), or a library's own exception saying so (safetensors, ONNX Runtime)."""
    import errno

    import vqexport.build as build

    def full(directory, manifest):
        if raised == "python":
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "manifest.json"))
        raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(build, "write_manifest", full)
    out = tmp_path / "out"
    says = ("no space left on the device writing", "manifest.json") if raised == "python" else ("no space left on the device",)
    assert_user_error(run_cli("build", "--model", tiny_model, "--out", out, "--steps", 1), *says)
    assert not out.exists() and list(tmp_path.glob(".out*")) == []


class _Dropping:
    """An object whose __del__ runs while a signal arrives: the exception its handler raises there is printed as
    "Exception ignored" and dropped, as Python drops every exception a __del__ raises."""

    def __init__(self, sig):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        time.sleep(0.2)  # the handler runs here, inside __del__


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the exception __del__ drops
@pytest.mark.parametrize("sig, raised", [(signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)])
def test_a_signal_whose_exception_is_dropped_still_stops_the_artifact(tmp_path, sig, raised):
    """A Ctrl-C (or SIGTERM) that lands in a __del__ does not unwind the work; the output is still not put in place,
    and the staging directory is removed."""
    import threading

    from vqexport.artifact import staged_dir

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    # Python's own SIGINT handler, as a run from a terminal has it (one started in the background ignores SIGINT, and
    # staged_dir leaves an ignored or a caller's own handler as it is)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = tmp_path / "out"
        with pytest.raises(raised):
            with staged_dir(out) as tmp:
                (tmp / "model.onnx").write_bytes(b"x")
                _Dropping(sig)  # dropped at once: its __del__ swallows the handler's exception
                assert (tmp / "model.onnx").exists()  # the work went on
        assert not out.exists() and list(tmp_path.iterdir()) == []
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
        with staged_dir(out) as tmp:  # and the next write works
            (tmp / "a").write_text("a")
        assert (out / "a").read_text() == "a"
    finally:
        signal.signal(signal.SIGINT, before)

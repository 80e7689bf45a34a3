"""Artifact directories: staged in a sibling temp dir and renamed into place, so a crash or a kill never
leaves a directory that looks complete (a complete artifact always has manifest.json, written last)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path, PurePosixPath

from .errors import VQExportError

MANIFEST = "manifest.json"
ARTIFACT_FORMAT = "vqexport-artifact"
_PARTIAL = ".partial-"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_hashes(files) -> dict[str, str]:
    """name -> sha256 of a model's files."""
    return {Path(p).name: sha256_file(Path(p)) for p in files}


def read_manifest(artifact: Path) -> dict:
    artifact = Path(artifact)
    if not artifact.is_dir():
        raise VQExportError(f"{artifact}: " + ("not a directory; an artifact is the directory 'vqexport build' writes"
                                               if artifact.exists() else "artifact directory does not exist"))
    path = artifact / MANIFEST
    if not path.is_file():
        raise VQExportError(f"{artifact}: no {MANIFEST}; not a complete vqexport artifact (build it with 'vqexport build')")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VQExportError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise VQExportError(f"{path}: not a vqexport artifact manifest")
    missing = [k for k in ("target", "profile", "runtime", "config", "source", "files") if not isinstance(manifest.get(k), dict | str)]
    if missing:
        raise VQExportError(f"{path}: manifest lacks {', '.join(missing)}; rebuild the artifact")
    malformed = _malformed(manifest)
    if malformed:
        raise VQExportError(f"{path}: malformed manifest ({malformed}); rebuild the artifact")
    return manifest


def _malformed(manifest: dict) -> str | None:
    """What is wrong with the parts of a manifest that verify, generate, inspect and bench read (None: nothing)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not isinstance(manifest["target"], str):
        return "target must be a string"
    for key in ("profile", "runtime", "config", "source", "files"):
        if not isinstance(manifest[key], dict):
            return f"{key} must be an object"
    for name, info in manifest["files"].items():
        if not isinstance(info, dict) or not is_int(info.get("bytes")) or not isinstance(info.get("sha256"), str):
            return f"files[{name!r}] must have an integer bytes and a string sha256"
    if any(PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts or name == MANIFEST
           for name in manifest["files"]):
        return "files must name files inside the artifact directory"
    rt = manifest["runtime"]
    for key in ("model_file", "onnx_file"):
        if key in rt or key == "model_file":
            if not isinstance(rt.get(key), str) or rt[key] not in manifest["files"]:
                return f"runtime.{key} must be one of the files it lists"
    if rt.get("backend", "ort") not in ("openvino", "trt"):  # what an ONNX Runtime session is created with
        if not isinstance(rt.get("providers"), list) or not all(isinstance(p, str) for p in rt["providers"]):
            return "runtime.providers must be a list of provider names"
        if not isinstance(rt.get("session_optimization_level"), str):
            return "runtime.session_optimization_level must be a string"
        if not is_int(rt.get("intra_op_num_threads")):
            return "runtime.intra_op_num_threads must be an integer"
    cfg = manifest["config"]
    if not is_int(cfg.get("vocab_size")) or cfg["vocab_size"] < 1:
        return "config.vocab_size must be an integer >= 1"
    if not isinstance(cfg.get("head"), dict):
        return "config.head must be an object"
    if "max_position" in cfg and not is_int(cfg["max_position"]):
        return "config.max_position must be an integer"
    eos = cfg.get("eos_token_ids")
    if eos is not None and (not isinstance(eos, list) or not all(is_int(t) for t in eos)):
        return "config.eos_token_ids must be a list of integers"
    if not isinstance(manifest["profile"].get("decode", {}), dict):
        return "profile.decode must be an object"
    src = manifest["source"]
    if not isinstance(src.get("model"), str) or not isinstance(src.get("sha256"), dict):
        return "source must have a string model and an object sha256"
    return None


COMPANIONS = {".onnx": ".onnx.data", ".xml": ".bin"}  # the weights a runtime reads beside its model file


def graph_file(runtime: dict) -> str:
    """The ONNX graph of an artifact (its manifest's ``runtime`` section): the file the runtime loads, or for an
    OpenVINO IR or a TensorRT engine the graph it was made from (``onnx_file``)."""
    return runtime.get("onnx_file", runtime["model_file"])


def weights_beside(model_file) -> str | None:
    """The file of weights a runtime reads beside ``model_file`` (an ONNX graph's external data, an OpenVINO IR's
    .bin), as a path like ``model_file``'s; None for a file that has none (a TensorRT engine)."""
    model = PurePosixPath(model_file)
    return model.with_suffix(COMPANIONS[model.suffix]).as_posix() if model.suffix in COMPANIONS else None


def check_files(artifact: Path, manifest: dict, hashes: bool = False) -> None:
    """Every file the manifest lists is there with its size (and, with ``hashes``, its sha256), and the weights beside
    the model file are among them: one line if not."""
    weights = weights_beside(manifest["runtime"]["model_file"])
    if weights and (Path(artifact) / weights).exists() and weights not in manifest["files"]:
        raise VQExportError(f"{Path(artifact) / weights}: the model's weights are not among the files manifest.json lists; "
                            "rebuild the artifact")
    for name, info in manifest["files"].items():
        f = Path(artifact) / name
        if not f.is_file():
            raise VQExportError(f"{f}: missing from the artifact (manifest.json lists it); rebuild the artifact")
        if f.stat().st_size != info["bytes"] or (hashes and sha256_file(f) != info["sha256"]):
            raise VQExportError(f"{f}: modified since the build (size or sha256 differs from manifest.json); rebuild the artifact")


@contextlib.contextmanager
def build_lock(out: Path):
    """Serialise builds into one output directory: a second build waits here, then sees the first one's artifact.
    The lock file (``.<name>.lock`` beside the directory) is removed when the build ends; a waiter that finds it
    replaced by a newer one starts over, so two builds never both hold the lock."""
    import fcntl

    out = Path(out).resolve()
    path = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(path, "a+")
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()  # the file we waited on was removed by the build before us: lock the current one
    except OSError as e:
        raise VQExportError(f"{out.parent}: cannot create output directory ({e.strerror})") from None
    try:
        yield
    finally:
        try:
            path.unlink()
        except OSError:
            pass
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_output_dir(out: Path, fingerprint: str, force: bool) -> None:
    """Refuse an output dir that holds anything but an artifact built from the same inputs (unless force)."""
    out = Path(out).resolve()  # the same path staged_dir will replace
    if out.exists() and not out.is_dir():
        raise VQExportError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        try:
            manifest = read_manifest(out)
        except VQExportError:
            manifest = {}
        if manifest.get("fingerprint") != fingerprint:
            raise VQExportError(f"{out}: already holds a different artifact or other files; pass --force to replace it, or choose another --out")
        listed = {"manifest.json", *manifest["files"]}
        other = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and str(p.relative_to(out)) not in listed)
        if other:
            raise VQExportError(f"{out}: holds files its artifact does not list ({', '.join(other[:3])}"
                                f"{' ...' if len(other) > 3 else ''}); a rebuild would delete them; move them, or pass --force")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise VQExportError(f"{parent}: cannot create output directory ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise VQExportError(f"{parent}: output location is not writable")


def _remove_stale_partials(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}{_PARTIAL}*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
            os.kill(pid, 0)
            continue  # another live build owns it
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            continue


class _Terminated(BaseException):
    pass


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield a temp dir beside ``out``; on success it replaces ``out`` atomically, on any failure it is removed."""
    out = Path(out).resolve()
    _remove_stale_partials(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_PARTIAL}{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise VQExportError(f"{out.parent}: cannot write there ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)

    # A signal's exception can be raised where Python drops it: inside a __del__ or a callback it is printed as
    # "Exception ignored" and the work goes on. So each signal is also recorded, and a recorded one stops the
    # artifact from being put in place: the work was interrupted, whatever swallowed the exception.
    caught: list[int] = []

    def on_signal(signum, frame):
        caught.append(signum)
        raise _Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    old = {}
    if _main_thread():
        old[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_signal)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # a caller's own SIGINT handler stays
            old[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)
    try:
        yield tmp
        if caught:
            raise _Terminated() if signal.SIGTERM in caught else KeyboardInterrupt()
        if out.exists():
            trash = out.parent / f".{out.name}{_PARTIAL}{os.getpid()}-old"
            shutil.rmtree(trash, ignore_errors=True)
            out.rename(trash)
            try:
                tmp.rename(out)
            except BaseException:
                trash.rename(out)  # put the previous artifact back
                raise
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    except _Terminated:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(143) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def write_manifest(directory: Path, manifest: dict) -> dict:
    """Add sha256 and size of every file in ``directory`` and write manifest.json (last)."""
    directory = Path(directory)
    files = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(directory).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format": ARTIFACT_FORMAT, "format_version": 1, **manifest, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest

"""The rough edges a new user meets: each one fixed and held here."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vqexport.artifact import read_manifest

from .conftest import assert_user_error, run_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def broken(demo_artifact, tmp_path):
    """A copy of the demo artifact whose model.onnx was deleted."""
    copy = shutil.copytree(demo_artifact, tmp_path / "art")
    (copy / "model.onnx").unlink()
    return copy


def test_a_deleted_model_file_is_one_line_everywhere(broken):
    for args in (["bench", "--artifact", broken, "--tokens", 2, "--prompt-length", 4, "--repeats", 1],
                 ["generate", "--artifact", broken, "--prompt", "x"],
                 ["verify", "--artifact", broken, "--steps", 1]):
        assert_user_error(run_cli(*args), "model.onnx", "missing from the artifact")
    assert_user_error(run_cli("inspect", broken), "model.onnx")


def test_seed_temperature_and_top_k_need_sample(demo_artifact):
    for extra in (["--seed", 3], ["--temperature", 0.5], ["--top-k", 5]):
        assert_user_error(run_cli("generate", "--artifact", demo_artifact, "--prompt", "x", *extra), "add --sample")


def test_targets_name_aliases():
    out = run_cli("targets").stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("trt-fp16 "))
    assert "alias of trt" in line
    assert not any("alias" in ln for ln in out.splitlines() if ln.startswith("trt "))


def test_build_summary_lists_every_file_manifest_included(tmp_path):
    result = run_cli("build", "--out", tmp_path / "a", "--steps", 1)
    assert result.exit_code == 0, result.stderr
    for name in ("manifest.json", "model.onnx", "model.onnx.data", "vq_head.safetensors"):
        assert name in result.stdout


def test_the_default_output_is_artifacts_not_build(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vqexport", "build", "--steps", "1"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "artifacts" / "ort" / "manifest.json").is_file() and not (tmp_path / "build").exists()


def test_license_file_matches_pyproject():
    import tomllib

    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]["text"] == "Apache-2.0"


def test_two_builds_into_one_directory_are_serialised(tmp_path):
    """ort and ort-int8 into the same --out at once, no --force: one artifact is written and reported, the other
    build waits for it, sees a different artifact there and refuses; the directory holds what its build said."""
    out = tmp_path / "out"
    procs = {t: subprocess.Popen([sys.executable, "-m", "vqexport", "build", "--target", t, "--out", str(out), "--steps", "2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for t in ("ort", "ort-int8")}
    results = {t: (p.wait(timeout=600), *p.communicate()) for t, p in procs.items()}
    winners = [t for t, (rc, _, _) in results.items() if rc == 0]
    losers = [t for t, (rc, _, _) in results.items() if rc != 0]
    assert len(winners) == 1 and len(losers) == 1, results
    rc, _, err = results[losers[0]]
    assert rc == 2 and "already holds a different artifact" in err
    assert read_manifest(out)["target"] == winners[0]
    assert f"built {winners[0]} artifact" in results[winners[0]][1]
    assert not list(tmp_path.glob(".out.partial-*"))


def test_inspect_json_and_table_agree_on_shapes(demo_artifact, monkeypatch):
    info = json.loads(run_cli("inspect", demo_artifact, "--json").stdout)
    monkeypatch.setenv("COLUMNS", "200")  # wide enough that no cell wraps
    table = run_cli("inspect", demo_artifact).stdout
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 4 and cells[0] in ("input", "output"):
            rows[cells[1]] = cells
    ios = [("input", io) for io in info["inputs"]] + [("output", io) for io in info["outputs"]]
    assert len(ios) == 2 + 6 + 1 + 6 and set(rows) == {io["name"] for _, io in ios}  # 3 layers' key + value in, logits + 6 out
    for kind, io in ios:
        assert rows[io["name"]] == [kind, io["name"], io["dtype"], "[" + ", ".join(map(str, io["shape"])) + "]"]
    assert rows["past_key_values.0.key"][3] == "[batch_size, 4, past_sequence_length, 32]"

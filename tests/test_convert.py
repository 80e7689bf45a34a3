"""convert: dense-head checkpoint -> VQ-Logits checkpoint; determinism, quality report, export, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from vqexport import api
from vqexport.clustering import METHODS

from .conftest import assert_user_error, make_checkpoint, make_config, run_cli

TEXT = "".join(p.read_text() for p in sorted(Path(__file__).parent.glob("test_*.py")))


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, small_tokenizer):
    tmp = tmp_path_factory.mktemp("dense")
    return make_checkpoint(tmp / "ckpt", make_config(vocab=300, head="dense", d=32, layers=1), tokenizer=small_tokenizer)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "text.txt"
    f.write_text(TEXT)
    return f


@pytest.fixture(scope="module")
def converted(dense_ckpt, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "vq"
    result = run_cli("convert", "--from", dense_ckpt, "--codebook-size", 24, "--distill-text", text_file,
                     "--steps", 30, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def test_output_is_a_valid_vq_checkpoint(converted):
    out, report = converted
    ckpt = api.load_checkpoint(out)
    assert ckpt.config.head.type == "vq" and ckpt.config.head.codebook_size == 24 and ckpt.config.head.bias
    assert ckpt.tokenizer_path is not None
    m = ckpt.tensors["head.map"]
    assert m.min() >= 0 and m.max() < 24 and len(np.unique(m)) == 24  # every code used
    card = (out / "MODEL_CARD.md").read_text()
    assert "VQ ppl" in card and "top-1 agreement" in card


def test_report_measures_quality_and_distillation_helps(converted):
    _, report = converted
    before, after = report["before_distillation"], report["after_distillation"]
    for r in (before, after):
        assert r["dense_ppl"] > 1 and r["vq_ppl"] > 1 and 0 <= r["top1_agreement"] <= 1
    assert after["dense_ppl"] == pytest.approx(before["dense_ppl"])  # trunk and dense head untouched
    assert after["kl_to_dense"] < before["kl_to_dense"]  # the KL distillation generalises to held-out text
    scores = report["clustering_scores"]
    assert set(scores) == set(METHODS) and report["clustering_score"] == "held-out perplexity"  # auto measured all
    assert scores[report["clustering"]] == min(scores.values())  # (a balanced variant that moved nothing ties its base)
    assert scores[report["clustering"]] == pytest.approx(before["vq_ppl"])  # the kept candidate is the one reported


def test_deterministic(dense_ckpt, text_file, converted, tmp_path):
    out, _ = converted
    again = tmp_path / "again"
    assert run_cli("convert", "--from", dense_ckpt, "--codebook-size", 24, "--distill-text", text_file,
                   "--steps", 30, "--out", again).exit_code == 0
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_converted_checkpoint_builds_and_passes_parity(converted, tmp_path):
    out, _ = converted
    result = api.build("ort", model=out, out=tmp_path / "art", steps=4)
    assert result.parity.passed


def test_without_text_or_bias(dense_ckpt, tmp_path):
    result = api.convert(dense_ckpt, 8, tmp_path / "nb", bias=False, clustering="spherical")
    ckpt = api.load_checkpoint(result.out)
    assert "head.bias" not in ckpt.tensors and result.report["after_distillation"] is None


@pytest.mark.parametrize("k", [0, 301])
def test_bad_codebook_size(dense_ckpt, tmp_path, k):
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", k, "--out", tmp_path / "o"), "--codebook-size must be in [1, vocab size 300]")
    assert not (tmp_path / "o").exists()


def test_bad_sources_and_outputs(dense_ckpt, text_file, tmp_path):
    vq = make_checkpoint(tmp_path / "vq", make_config())
    assert_user_error(run_cli("convert", "--from", vq, "-k", 4, "--out", tmp_path / "o"), "already VQ-Logits")
    (tmp_path / "exists").mkdir()
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 4, "--out", tmp_path / "exists"), "already exists")
    assert_user_error(run_cli("convert", "--from", tmp_path / "missing", "-k", 4, "--out", tmp_path / "o"), "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 4, "--distill-text", short, "--out", tmp_path / "o"), "too short")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok \xff\xfe bytes")
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 4, "--distill-text", binary, "--out", tmp_path / "o"), "not UTF-8")
    assert not (tmp_path / "o").exists()


def test_balanced_from_the_cli(dense_ckpt, tmp_path):
    from vqexport.clustering import capacity

    result = run_cli("convert", "--from", dense_ckpt, "-k", 8, "--clustering", "balanced", "--out", tmp_path / "b", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["clustering"] == "balanced" and set(report["clustering_scores"]) == {"balanced"}
    sizes = np.bincount(api.load_checkpoint(tmp_path / "b").tensors["head.map"], minlength=8)
    assert sizes.min() >= 1 and sizes.max() <= capacity(300, 8, 1.5)
    with pytest.raises(api.VQExportError, match="--clustering must be one of auto, euclidean, spherical, balanced, balanced-spherical"):
        api.convert(dense_ckpt, 8, tmp_path / "w", clustering="ward")
    assert not (tmp_path / "w").exists()

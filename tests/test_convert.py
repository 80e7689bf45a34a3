"""convert: dense-head checkpoint -> VQ-Logits checkpoint; determinism, quality report, export, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from vqexport import api

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
    assert report["clustering"] in ("euclidean", "spherical") and set(report["clustering_scores"]) == {"euclidean", "spherical"}


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


def test_kmeans_is_deterministic_uses_every_code_and_beats_random():
    import torch

    from vqexport.vq_init import kmeans

    torch.manual_seed(0)
    centers = torch.randn(40, 16) * 5
    x = centers[torch.randint(0, 40, (6000,))] + torch.randn(6000, 16) * 0.1  # 40 well-separated blobs
    c, a = kmeans(x, 40, seed=3, max_seed_rows=2000)  # more rows than one distance chunk; seeding on a subset
    c2, a2 = kmeans(x, 40, seed=3, max_seed_rows=2000)
    assert torch.equal(a, a2) and torch.equal(c, c2)
    assert len(torch.unique(a)) == 40
    inertia = float(((x - c[a]) ** 2).sum(1).mean())
    random_codes = x[torch.randperm(6000)[:40]]
    assert inertia < 0.5 * float(((x[:, None] - random_codes[None]) ** 2).sum(-1).min(1).values.mean())
    _, every = kmeans(x[:300], 300, iters=2)
    assert len(torch.unique(every)) == 300  # K = N: one row per code

"""convert: a Hugging Face model directory -> the same directory with a VQ-Logits head; the trunk's files are
copied unchanged; determinism, quality report, build, bad input."""

import json

import numpy as np
import pytest

from vqexport import api
from vqexport.convert.clustering import METHODS, METRIC

from vqexport.head.spec import read_head
from vqexport.source import load_source

from .conftest import assert_user_error, run_cli, sample_text
from .models import make_model

TEXT = sample_text()


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory, small_tokenizer):
    """A dense model (no VQ head): a random tied Qwen2 with a ~300-token tokenizer. Its weights are drawn 15 times
    wider than transformers' default so that its distributions are peaked (KL of the VQ head about 1 nat, not 0.005):
    distillation then has something to fix on any text."""
    tmp = tmp_path_factory.mktemp("dense")
    return make_model(tmp / "model", arch="qwen2", vocab=300, hidden=32, layers=1, head=False, tokenizer=small_tokenizer,
                      initializer_range=0.3)


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


def test_output_is_the_source_plus_a_head(converted, dense_ckpt):
    out, report = converted
    source = load_source(out)
    head = source.head.config
    assert head.type == "vq" and head.codebook_size == 24 and head.bias and source.tokenizer_path is not None
    for f in load_source(dense_ckpt, need_head=False).files():  # the trunk's files are the source's, byte for byte
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name
    assert {p.name for p in out.iterdir()} - {p.name for p in dense_ckpt.iterdir()} == {"vq_head.json", "vq_head.safetensors", "MODEL_CARD.md"}
    assert report["architecture"] == "qwen2"
    m = source.head.map
    assert m.min() >= 0 and m.max() < 24 and len(np.unique(m)) == 24  # every code used
    card = (out / "MODEL_CARD.md").read_text()
    assert "VQ ppl" in card and "top-1 agreement" in card
    # codebook, map and bias: the count inspect gives for the same directory
    own = 24 * 32 + 300 + 300
    assert f"| head parameters | {own:,} (codebook, token map, bias) vs {300 * 32:,} in the dense output layer's V x d weight (85.8% fewer) |" in card
    assert json.loads(run_cli("inspect", out, "--json").stdout)["sizes"]["head"]["params"] == own
    assert "The held-out text also chose the clustering" in card  # auto kept the best of its candidates on it


def test_report_measures_quality_and_distillation_helps(converted):
    _, report = converted
    before, after = report["before_distillation"], report["after_distillation"]
    for r in (before, after):
        assert r["dense_ppl"] > 1 and r["vq_ppl"] > 1 and 0 <= r["top1_agreement"] <= 1
    assert after["dense_ppl"] == pytest.approx(before["dense_ppl"])  # trunk and dense head untouched
    assert after["kl_to_dense"] < before["kl_to_dense"]  # the KL distillation generalises to held-out text
    scores = report["clustering_scores"]
    assert set(scores) == {*METHODS, METRIC} and report["clustering_score"] == "held-out perplexity"  # auto measured all
    assert scores[report["clustering"]] == min(scores.values())  # (a balanced variant that moved nothing ties its base)
    assert scores[report["clustering"]] == pytest.approx(before["vq_ppl"])  # the kept candidate is the one reported


def test_deterministic(dense_ckpt, text_file, converted, tmp_path):
    out, _ = converted
    again = tmp_path / "again"
    assert run_cli("convert", "--from", dense_ckpt, "--codebook-size", 24, "--distill-text", text_file,
                   "--steps", 30, "--out", again).exit_code == 0
    assert (again / "vq_head.safetensors").read_bytes() == (out / "vq_head.safetensors").read_bytes()



def test_each_head_is_measured_once(dense_ckpt, text_file, tmp_path, monkeypatch):
    """A held-out measurement takes minutes at V = 152k: the chosen clustering's head is not measured a second time
    before distillation, nor a two-stage head before and after nothing was distilled, nor a lone clustering whose
    head the router and the rank-r term change before it is measured."""
    from vqexport.convert import convert as module

    calls, measure = [], module.evaluate
    monkeypatch.setattr(module, "evaluate", lambda *a, **k: calls.append(1) or measure(*a, **k))
    plain = api.convert(dense_ckpt, 24, tmp_path / "plain", distill_text=text_file, steps=5, clustering="spherical").report
    assert len(calls) == 2  # the clustering's candidate (which is the head before distillation), the distilled head
    assert plain["before_distillation"]["vq_ppl"] == plain["clustering_scores"]["spherical"]
    assert plain["after_distillation"]["kl_to_dense"] < plain["before_distillation"]["kl_to_dense"]
    calls.clear()
    two = api.convert(dense_ckpt, 24, tmp_path / "two", distill_text=text_file, steps=3, head="two-stage", rank=2).report
    assert len(calls) == 2  # the head with its router and rank-2 tail, the two-stage head
    assert two["after_distillation"] == two["before_distillation"]
    assert two["clustering"] == "equal-metric" and two["clustering_scores"] == {} and two["clustering_score"] is None
    calls.clear()
    auto = api.convert(dense_ckpt, 24, tmp_path / "auto", distill_text=text_file, steps=3, rank=2).report
    assert set(auto["clustering_scores"]) == {*METHODS, METRIC}  # a choice to make: every candidate measured
    assert len(calls) == len(auto["clustering_scores"]) + 2  # then the chosen head with its rank-2 term, and distilled


def test_distillation_that_raises_held_out_perplexity_is_said(dense_ckpt, text_file, tmp_path, monkeypatch):
    """Distillation that leaves the head worse on the held-out text (few steps, little text, random weights) is said
    on stderr and in the card, with what to do; one that does not says nothing."""
    import torch

    from vqexport.convert import convert as module

    def harmful(hidden, dense, vq, *a, **k):
        with torch.no_grad():  # confident and wrong: far worse
            vq.codebook.normal_(std=5.0, generator=torch.Generator().manual_seed(0))
            vq.bias.normal_(std=10.0, generator=torch.Generator().manual_seed(1))

    monkeypatch.setattr(module, "_distill", harmful)
    result = run_cli("convert", "--from", dense_ckpt, "--codebook-size", 24, "--clustering", "spherical",
                     "--distill-text", text_file, "--steps", 2, "--out", tmp_path / "worse")
    assert result.exit_code == 0, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("note: distillation raised the held-out perplexity by +")
    assert "the head written is the distilled one" in result.stderr and "--steps 0 keeps the head before" in result.stderr
    assert "**Note:** distillation raised the held-out perplexity" in (tmp_path / "worse" / "MODEL_CARD.md").read_text()
    monkeypatch.setattr(module, "_distill", lambda *a, **k: None)  # changes nothing: no worse
    same = api.convert(dense_ckpt, 24, tmp_path / "same", distill_text=text_file, steps=2, clustering="spherical").report
    assert same["after_distillation"]["vq_ppl"] == same["before_distillation"]["vq_ppl"] and "note" not in same
    assert "Note" not in (tmp_path / "same" / "MODEL_CARD.md").read_text()


def test_converted_model_builds_and_passes_parity(converted, tmp_path):
    out, _ = converted
    result = api.build("ort", model=out, out=tmp_path / "art", steps=4)
    assert result.parity.passed


def test_without_text_or_bias(dense_ckpt, tmp_path):
    result = api.convert(dense_ckpt, 8, tmp_path / "nb", bias=False)
    head = read_head(result.out)
    assert "bias" not in head.tensors and not head.config.bias and result.report["after_distillation"] is None
    assert set(result.report["clustering_scores"]) == set(METHODS)  # auto: no hidden states, so no metric to cluster in


def test_clusters_in_the_hidden_states_metric(dense_ckpt, text_file, tmp_path):
    """--clustering metric: euclidean k-means of the rows in the metric of the training text's hidden states; it
    needs the text."""
    result = run_cli("convert", "--from", dense_ckpt, "-k", 8, "--clustering", "metric", "--distill-text", text_file,
                     "--steps", 0, "--out", tmp_path / "m", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["clustering"] == "metric" and set(report["clustering_scores"]) == {"metric"}
    assert len(np.unique(read_head(tmp_path / "m").map)) == 8
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 8, "--clustering", "metric", "--out", tmp_path / "o"),
                      "--clustering metric clusters in the metric of the model's hidden states: it needs --distill-text")
    assert not (tmp_path / "o").exists()


def test_a_vq_model_converts_again_from_its_dense_layer(converted, tmp_path):
    """A VQ-Logits model directory is still the dense model: converting it makes a new head and leaves the old alone."""
    out, _ = converted
    again = api.convert(out, 12, tmp_path / "again", clustering="spherical")
    assert read_head(again.out).config.codebook_size == 12 and read_head(out).config.codebook_size == 24


def test_every_file_of_the_model_comes_along_but_pickles(dense_ckpt, tmp_path):
    """The chat template, vocabulary files, license: the directory unchanged, and the chat template on into the artifact."""
    import shutil

    src = shutil.copytree(dense_ckpt, tmp_path / "src")
    extra = {"chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "LICENSE": "Apache-2.0",
             "vocab.json": "{}", "merges.txt": "#version: 0.2", "added_tokens.json": '{"<x>": 5}'}
    for name, text in extra.items():
        (src / name).write_text(text)
    (src / "training_args.bin").write_bytes(b"\x80\x04pickled")
    result = api.convert(src, 8, tmp_path / "vq")
    for name, text in extra.items():
        assert (result.out / name).read_text() == text, name
    assert not (result.out / "training_args.bin").exists()
    art = api.build("ort", model=result.out, out=tmp_path / "art", steps=1).out
    assert (art / "chat_template.jinja").read_text() == extra["chat_template.jinja"]


def test_convert_the_embedded_model(tmp_path):
    result = run_cli("convert", "--from", "demo", "-k", 64, "--clustering", "spherical", "--out", tmp_path / "d")
    assert result.exit_code == 0, result.stderr
    assert read_head(tmp_path / "d").config.codebook_size == 64


@pytest.mark.parametrize("k", [0, 301])
def test_bad_codebook_size(dense_ckpt, tmp_path, k):
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", k, "--out", tmp_path / "o"), "--codebook-size must be in [1, vocab size 300]")
    assert not (tmp_path / "o").exists()


def test_bad_sources_and_outputs(dense_ckpt, text_file, tmp_path):
    (tmp_path / "exists").mkdir()
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 4, "--out", tmp_path / "exists"), "already exists")
    assert_user_error(run_cli("convert", "--from", tmp_path / "missing", "-k", 4, "--out", tmp_path / "o"), "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("def f(): pass\n")
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 4, "--distill-text", short, "--out", tmp_path / "o"), "too short")
    from tokenizers import Tokenizer

    from vqexport.convert.convert import MIN_TEXT_TOKENS

    text, tok = text_file.read_text(), Tokenizer.from_file(str(dense_ckpt / "tokenizer.json"))
    short.write_text(text[: len(text) * 2000 // len(tok.encode(text).ids)])  # about 2,000 tokens: held out, 200
    n = len(tok.encode(short.read_text()).ids)
    assert 1500 < n < MIN_TEXT_TOKENS  # refused at once, with the number that would do
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 4, "--distill-text", short, "--out", tmp_path / "o"),
                      f"too short for distillation ({n} tokens; need at least {MIN_TEXT_TOKENS})")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok \xff\xfe bytes")
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 4, "--distill-text", binary, "--out", tmp_path / "o"), "not UTF-8")
    assert_user_error(run_cli("convert", "--from", dense_ckpt, "-k", 4, "--steps", 50, "--out", tmp_path / "o"),
                      "--steps 50 trains on --distill-text, and none was given")
    assert not (tmp_path / "o").exists()


def test_balanced_from_the_cli(dense_ckpt, tmp_path):
    from vqexport.convert.clustering import capacity

    result = run_cli("convert", "--from", dense_ckpt, "-k", 8, "--clustering", "balanced", "--out", tmp_path / "b", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["clustering"] == "balanced" and set(report["clustering_scores"]) == {"balanced"}
    sizes = np.bincount(read_head(tmp_path / "b").map, minlength=8)
    assert sizes.min() >= 1 and sizes.max() <= capacity(300, 8, 1.5)
    with pytest.raises(api.VQExportError, match="--clustering must be one of auto, euclidean, spherical, balanced, balanced-spherical"):
        api.convert(dense_ckpt, 8, tmp_path / "w", clustering="ward")
    assert not (tmp_path / "w").exists()


def test_distillation_windows_reach_the_end_of_the_text():
    import torch

    from vqexport.convert.convert import SEQ, _batches

    ids = torch.arange(SEQ + 3)  # three windows of SEQ + 1 tokens: starts 0, 1, 2
    x, y = next(_batches(ids, 300, torch.Generator().manual_seed(0)))
    assert x.shape == y.shape == (300, SEQ) and torch.equal(y[:, :-1], x[:, 1:])
    assert sorted(set(x[:, 0].tolist())) == [0, 1, 2]
    assert y[:, -1].max().item() == SEQ + 2  # the text's last token is a target

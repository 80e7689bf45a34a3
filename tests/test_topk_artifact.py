"""decode = "topk" artifacts (exact top-k in the graph, no V-sized tensor), last-position prefill, sampling."""

import json

import numpy as np
import onnx
import pytest

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner
from vqexport.backends.torch_ref import TorchRunner
from vqexport.graph_io import dims_of, load_graph
from vqexport.head.decoding import reference_topk
from vqexport.head.spec import read_head
from vqexport.source import load_source

from .conftest import assert_user_error, run_cli
from .models import make_model

V, K, D = 211, 13, 64


def profile(tmp_path, name, decode, codebook="fp32"):
    f = tmp_path / f"{name}.toml"
    f.write_text(f'backend = "ort"\nname = "{name}"\ncodebook = "{codebook}"\n[decode]\n{decode}\n'
                 '[parity]\nsteps = 4\natol = 1e-4\nkl_max = 1e-6\n')
    return f


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("topk") / "model", vocab=V, k=K, hidden=D, heads=4, kv_heads=2, ffn=96)


@pytest.fixture(scope="module")
def topk_art(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("topk_art")
    return api.build(str(profile(tmp, "topk", 'mode = "topk"\nk = 20\nkeep_logits = true')), model=model, out=tmp / "art")


def _run(path, ids):
    with OrtRunner(path) as r:
        return r.step(ids, np.ones_like(ids), r.empty_past(ids.shape[0]))


def test_graph_topk_equals_full_softmax_topk(topk_art, model):
    ids = np.random.default_rng(0).integers(0, V, size=(3, 9))
    out = _run(topk_art.out / "model.onnx", ids)
    assert out.logits.shape == (3, 9, V)
    ref_ids, ref_logp = reference_topk(out.logits, 20)
    np.testing.assert_array_equal(out.extra["topk_ids"], ref_ids)
    np.testing.assert_allclose(out.extra["topk_logprobs"], ref_logp, atol=2e-5)
    lse = np.log(np.exp(out.logits.astype(np.float64)).sum(-1, keepdims=True))
    assert out.extra["cluster_logprobs"].shape == (3, 9, K)
    np.testing.assert_allclose(np.exp(out.extra["cluster_logprobs"].astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    mapping = read_head(model).map
    ref_cluster = np.stack([np.bincount(mapping, weights=np.exp(row - lse_row), minlength=K)
                            for row, lse_row in zip(out.logits.reshape(-1, V).astype(np.float64), lse.reshape(-1))])
    np.testing.assert_allclose(np.exp(out.extra["cluster_logprobs"].reshape(-1, K)), ref_cluster, atol=1e-5)
    assert topk_art.parity.passed and topk_art.parity.compared == "logits"
    assert (topk_art.out / "genai_config.json").is_file()  # a logits output: onnxruntime-genai can load it


def test_without_logits_no_vocab_sized_tensor_is_computed(model, tmp_path):
    result = api.build(str(profile(tmp_path, "nologits", 'mode = "topk"\nk = 20')), model=model, out=tmp_path / "art")
    proto = load_graph(result.out / "model.onnx")
    assert [o.name for o in proto.graph.output][:3] == ["topk_ids", "topk_logprobs", "cluster_logprobs"]
    assert "logits" not in [o.name for o in proto.graph.output]
    assert "head.map" not in {t.name for t in proto.graph.initializer}  # no V-wide selection at all
    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {vi.name: dims_of(vi) for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    outputs = [(n.name, o) for n in inferred.graph.node for o in n.output if o]
    assert all(o in shapes for _, o in outputs)  # every run-time value's shape is known ...
    widest = {o: shapes[o] for _, o in outputs if V in shapes[o]}
    assert widest == {}  # ... and none has a vocabulary-sized axis
    assert [d for name, o in outputs if name == "head/topk/ids" for d in shapes[o]] == ["batch_size", "sequence_length", 20]
    r = result.parity
    assert r.passed and r.compared == "topk" and r.top1_agreement == 1.0 and r.max_abs_diff <= 1e-4
    assert (result.out / "vq_head.safetensors").is_file() and (result.out / "vq_head.json").is_file()
    assert not (result.out / "genai_config.json").exists()


def test_last_position_only_prefill(model, tmp_path):
    result = api.build(str(profile(tmp_path, "last", "last_position_only = true")), model=model, out=tmp_path / "art")
    proto = load_graph(result.out / "model.onnx")
    logits = next(o for o in proto.graph.output if o.name == "logits")
    assert dims_of(logits) == ["batch_size", 1, V]
    ids = np.random.default_rng(1).integers(0, V, size=(2, 40))
    out = _run(result.out / "model.onnx", ids)
    assert out.logits.shape == (2, 1, V)
    with TorchRunner.from_source(load_source(model)) as ref:
        full = ref.step(ids, np.ones_like(ids), ref.empty_past(2)).logits
    np.testing.assert_allclose(out.logits[:, 0], full[:, -1], atol=1e-4)
    assert result.parity.passed and result.parity.greedy_match_steps == 4


def test_decode_k_larger_than_vocab_and_dense_model(model, tmp_path, monkeypatch):
    import shutil

    assert_user_error(run_cli("build", "--target", profile(tmp_path, "big", 'mode = "topk"\nk = 212'), "--model", model,
                              "--out", tmp_path / "o"), "decode.k = 212 exceeds the vocabulary size 211")
    dense = tmp_path / "dense"
    dense.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(model / name, dense / name)
    assert_user_error(run_cli("build", "--target", profile(tmp_path, "d", 'mode = "topk"'), "--model", dense,
                              "--out", tmp_path / "o"), "no VQ-Logits head")
    assert not (tmp_path / "o").exists()
    f = tmp_path / "bad.toml"
    f.write_text('backend = "ort"\n[decode]\nmode = "beam"\n')
    monkeypatch.chdir(tmp_path)  # no --out: the default ./artifacts/<name> would be here
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(run_cli("build", "--target", f), "decode.mode must be")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- the embedded demo's ort-topk target -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_topk(tmp_path_factory):
    return api.build("ort-topk", out=tmp_path_factory.mktemp("dt") / "art", steps=8)


def test_demo_topk_int8_profile(demo_topk):
    r = demo_topk.parity
    assert r.passed, r.failures
    assert r.compared == "topk" and r.top1_agreement >= 0.99 and r.kl_divergence <= 1e-3
    inits = {t.name: t for t in load_graph(demo_topk.out / "model.onnx").graph.initializer}
    assert inits["head.codebook_q"].data_type == onnx.TensorProto.INT8
    assert json.loads((demo_topk.out / "manifest.json").read_text())["profile"]["decode"]["k"] == 50


def test_sampling_is_seeded_and_top_k_1_is_greedy(demo_topk):
    art = demo_topk.out
    a = api.generate(art, "import os\n", 10, sample=True, temperature=0.9, seed=7)
    b = api.generate(art, "import os\n", 10, sample=True, temperature=0.9, seed=7)
    c = api.generate(art, "import os\n", 10, sample=True, temperature=5.0, seed=8)
    assert a.new_ids == b.new_ids and a.new_ids != c.new_ids
    for g in (a, c):
        assert len(g.new_ids) == 10 or g.stopped_at_eos, g  # all 10 tokens unless the model's eos was drawn
    greedy = api.generate(art, "import os\n", 10)
    assert len(greedy.new_ids) == 10 or greedy.stopped_at_eos, greedy
    assert api.generate(art, "import os\n", 10, sample=True, top_k=1, seed=3).new_ids == greedy.new_ids


@pytest.mark.parametrize("args,fragment", [
    (["--sample", "--temperature", "0"], "temperature must be a finite number >= 1e-06"),
    (["--sample", "--temperature", "-1"], "temperature must be a finite number >= 1e-06"),
    (["--sample", "--temperature", "nan"], "temperature must be a finite number >= 1e-06"),
    (["--sample", "--temperature", "inf"], "temperature must be a finite number >= 1e-06"),
    (["--sample", "--temperature", "1e-310"], "temperature must be a finite number >= 1e-06"),
    (["--top-k", "5"], "error: --top-k applies to sampling; add --sample"),
    (["--temperature", "0.5", "--seed", "1"], "error: --temperature and --seed apply to sampling; add --sample"),
    (["--sample", "--top-k", "0"], "--top-k must be in [1, vocab size"),
    (["--sample", "--top-k", "100000"], "--top-k must be in [1, vocab size"),
    (["--sample", "--top-k", "51"], "exceeds the k=50"),
    (["--temperature", "0.5"], "add --sample"),
])
def test_bad_sampling_options(demo_topk, args, fragment):
    result = run_cli("generate", "--artifact", demo_topk.out, "--prompt", "x = ", *args)
    assert_user_error(result, fragment)
    assert result.stdout == ""


def test_asking_a_topk_artifact_for_logits_is_a_user_error(demo_topk):
    result = run_cli("bench", "--artifact", demo_topk.out, "--vs-dense", "--tokens", 2, "--prompt-length", 4)
    assert_user_error(result, "no logits output", "decode = 'topk'")

"""The trunk built by onnxruntime-genai's model builder (GroupQueryAttention, MatMulNBits, int4), the head attached to
its hidden state: parity against the fp32 PyTorch reference, onnxruntime-genai running the artifact as is, bad input."""

import importlib.util
import json
import shutil

import numpy as np
import onnxruntime_genai as og
import pytest

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner
from vqexport.build import reference_runner
from vqexport.graph_io import load_graph
from vqexport.source import demo_dir, load_source

from .conftest import assert_user_error, run_cli
from .models import genai_greedy, make_model, runner_greedy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, small_tokenizer):
    """A tiny Qwen2 (V 320 >= the ~300-token tokenizer) with a VQ head: the builder needs a tokenizer."""
    return make_model(tmp_path_factory.mktemp("g") / "model", arch="qwen2", vocab=320, hidden=64, heads=4, kv_heads=2,
                      k=20, max_position=512, tokenizer=small_tokenizer)


@pytest.fixture(scope="module")
def fp32(tiny, tmp_path_factory):
    return api.build("ort-genai", model=tiny, out=tmp_path_factory.mktemp("a") / "fp32", steps=8)


@pytest.fixture(scope="module")
def int4_demo(tmp_path_factory):
    return api.build("ort-int4", out=tmp_path_factory.mktemp("a") / "int4")


def test_fp32_genai_trunk_matches_pytorch(fp32):
    r = fp32.parity
    assert r.passed and r.max_abs_diff <= 1e-4 and r.top1_agreement == 1.0 and r.greedy_match_steps == 8
    rt = fp32.manifest["runtime"]
    assert rt["trunk"] == "genai" and rt["past_present_share_buffer"] is True
    graph = load_graph(fp32.out / "model.onnx")
    ops = {n.op_type for n in graph.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops  # the builder's graph, not ours
    # the manifest records the graph's own opset (the builder's), not the profile's default
    assert fp32.manifest["opset"] == next(o.version for o in graph.opset_import if o.domain == "") > 18
    cfg = json.loads((fp32.out / "genai_config.json").read_text())
    assert cfg["search"]["past_present_share_buffer"] is True
    assert cfg["model"]["decoder"]["outputs"]["logits"] == "logits"


def test_onnxruntime_genai_generates_from_the_artifact_unchanged(fp32, tiny):
    """Greedy tokens through onnxruntime-genai equal the PyTorch reference's (transformers' model + the head)."""
    prompt = [5, 17, 200, 33, 7]
    with reference_runner(load_source(tiny)) as ref:
        expected = runner_greedy(ref, prompt, 10)
    assert genai_greedy(fp32.out, prompt, 10) == expected


def test_the_runner_drives_the_shared_cache_like_onnxruntime_genai(fp32, tiny):
    """Decode steps on the builder's preallocated cache (one buffer per layer, written in place) equal the reference,
    including when the sequence outgrows the first buffer."""
    with OrtRunner.from_artifact(fp32.out) as tgt, reference_runner(load_source(tiny)) as ref:
        ids = np.arange(250).reshape(1, 250) % 320
        mask = np.ones_like(ids)
        t, r = tgt.step(ids, mask, tgt.empty_past(1)), ref.step(ids, mask, ref.empty_past(1))
        for tok in (3, 9, 27, 81, 243, 100, 50, 25):  # past 256 positions: the runner grows its buffers
            mask = np.concatenate([mask, [[1]]], 1)
            t, r = tgt.step(np.array([[tok]]), mask, t.present), ref.step(np.array([[tok]]), mask, r.present)
            np.testing.assert_allclose(t.logits, r.logits, atol=1e-4)
        assert t.present[0].shape == r.present[0].shape == (1, 2, 258, 16)


def test_each_new_sequence_gets_buffers_of_its_own_length(fp32):
    """A new sequence (an empty past) gets cache buffers of the length it needs, not twice the last one's: verify
    runs such graphs one prompt at a time, and 16 prompts of 4,000 tokens at the Qwen2.5-0.5B head shape doubled the
    buffers to 10 GB by the 11th (and each prompt ran slower than the last)."""
    with OrtRunner.from_artifact(fp32.out) as tgt:
        lengths = []
        for n in (300, 300, 300, 20):
            ids = np.arange(n).reshape(1, n) % 320
            out = tgt.step(ids, np.ones_like(ids), tgt.empty_past(1))
            lengths.append(tgt._buffers[0].shape[2])
            assert out.present[0].shape[2] == n
        assert lengths == [300, 300, 300, 256]  # 256: the first buffer's least length
        mask = np.ones((1, 21), np.int64)
        tgt.step(np.array([[5]]), mask, out.present)
        assert tgt._buffers[0].shape[2] == 256  # the sequence still fits: no new buffer


def test_int4_trunk_meets_its_measured_tolerances(int4_demo):
    r = int4_demo.parity
    assert r.passed, r.failures
    assert r.max_abs_diff > 1e-3  # really an int4 trunk, compared with the fp32 reference
    proto = load_graph(int4_demo.out / "model.onnx")
    ops = [n.op_type for n in proto.graph.node]
    assert "MatMulNBits" in ops and "GroupQueryAttention" in ops
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in proto.graph.node if n.op_type == "MatMulNBits"
            and not n.name.startswith("head/")}
    assert bits == {4}
    names = {t.name for t in proto.graph.initializer}
    assert not any(n.startswith("lm_head") for n in names)  # the dense output layer is never shipped
    embed = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(embed) == 1  # the tied int4 table stays one table, read by the embedding lookup
    assert any(n.startswith("head.codebook") for n in names)


def test_an_untied_models_embedding_table_is_int4_too(tmp_path, small_tokenizer):
    """The builder keeps an untied model's table fp32 unless told; ort-int4 tells it, so no [V, d] fp32 table ships."""
    import dataclasses

    from vqexport.build import resolve_profile

    V, d = 320, 64
    model = make_model(tmp_path / "untied", arch="qwen2", vocab=V, hidden=d, heads=4, kv_heads=2, k=20, max_position=512,
                       tie=False, tokenizer=small_tokenizer)
    profile = resolve_profile("ort-int4")  # random weights: flat logits, which int4 moves and reorders more
    profile = dataclasses.replace(profile, parity=dataclasses.replace(profile.parity, top1_agreement_min=0.0,
                                                                      top5_overlap_min=0.0, kl_max=0.5))
    result = api.build(profile, model=model, out=tmp_path / "art", steps=4)
    assert result.parity.passed, result.parity.failures
    proto = load_graph(result.out / "model.onnx")
    lookups = [n for n in proto.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")
               and n.input[1] == "input_ids"]
    assert [n.op_type for n in lookups] == ["GatherBlockQuantized"]
    assert not [t.name for t in proto.graph.initializer if list(t.dims) == [V, d] and t.data_type == 1]


def test_int4_artifact_runs_in_onnxruntime_genai_and_generate(int4_demo):
    """onnxruntime-genai and vqexport's generate (ONNX Runtime alone) pick the same greedy tokens from the artifact."""
    ours = api.generate(int4_demo.out, "def main(", max_new_tokens=6)
    assert len(ours.new_ids) == 6 or ours.stopped_at_eos, ours  # all 6 tokens unless the model's eos came first
    result = run_cli("generate", "--artifact", int4_demo.out, "--prompt", "def main(", "--max-new-tokens", 6)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "def main(" + ours.text + "\n"
    model = og.Model(str(int4_demo.out))
    tok = og.Tokenizer(model)
    prompt = [int(i) for i in tok.encode("def main(")]
    assert prompt == ours.prompt_ids
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 6, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    sequence = [int(i) for i in gen.get_sequence(0)]
    assert sequence[: len(prompt)] == prompt  # get_sequence holds the prompt, then the new tokens
    new = sequence[len(prompt):]
    if ours.stopped_at_eos:  # onnxruntime-genai keeps the eos token it stopped at; generate drops it
        new = new[:-1]
    assert new == ours.new_ids


def _profile(tmp_path, body):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\nname = "p"\n' + body)
    return f


@pytest.mark.parametrize("body, fragment", [
    ('precision = "int3"\n[trunk]\nsource = "genai"\n', "precision 'int3' is not one onnxruntime-genai's builder makes"),
    ('precision = "fp16"\n[trunk]\nsource = "genai"\n', "no fp16 graph for execution provider 'cpu'"),
    ('[trunk]\nsource = "genai"\nexecution_provider = "tpu"\n', "trunk.execution_provider must be one of"),
    ('[trunk]\nsource = "genai"\nextra_options = { exclude_lm_head = false }\n', "may not set exclude_lm_head"),
    ('precision = "fp16"\n[trunk]\nsource = "genai"\nexecution_provider = "cuda"\n', "runs on CUDAExecutionProvider"),
    ('[trunk]\nsource = "portable"\nexecution_provider = "cuda"\n', "applies to trunk.source = 'genai' only"),
    ('[trunk]\nsource = "builder"\n', "trunk.source must be"),
])
def test_a_profile_the_builder_cannot_serve_is_one_line(tmp_path, body, fragment):
    assert_user_error(run_cli("build", "--target", _profile(tmp_path, body), "--out", tmp_path / "o"), fragment)
    assert not (tmp_path / "o").exists()


def test_genai_trunk_on_tensorrt_is_refused(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('backend = "trt"\nname = "t"\n[trunk]\nsource = "genai"\n')
    assert_user_error(run_cli("build", "--target", f, "--check-only"), "applies to backend = 'ort' only")


@pytest.mark.parametrize("missing", ["onnxruntime_genai", "transformers"])
def test_missing_builder_or_transformers_is_one_line_with_the_hint(tmp_path, monkeypatch, missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    result = run_cli("build", "--target", "ort-genai", "--out", tmp_path / "o")
    assert_user_error(result, missing, "pip install")
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))


def test_an_architecture_the_builder_refuses_points_to_the_portable_trunk(tmp_path, small_tokenizer):
    model = make_model(tmp_path / "gpt2", arch="gpt2", vocab=320, hidden=64, tokenizer=small_tokenizer)
    result = run_cli("build", "--target", "ort-genai", "--model", model, "--out", tmp_path / "o")
    assert_user_error(result, "onnxruntime-genai's builder cannot build this gpt2 model", 'source = "portable"')
    assert not (tmp_path / "o").exists()


def test_a_fault_inside_the_builder_is_named_with_where_it_happened(tmp_path, small_tokenizer):
    """The builder run as is on a transformers 5 Gemma 3 config stops on a bare KeyError; the reason vqexport gives
    names the builder's function, file and line with it (vqexport itself runs the builder with the keys it reads)."""
    import os
    import subprocess
    import sys

    from vqexport.trunk.genai import BUILDER, failure_reason

    model = make_model(tmp_path / "gemma3", arch="gemma3", vocab=320, hidden=64, sliding_window=4, eos_token_id=0,
                       layer_types=["sliding_attention", "full_attention"], tokenizer=small_tokenizer)
    proc = subprocess.run([sys.executable, "-m", BUILDER, "-i", str(model), "-o", str(tmp_path / "o"), "-p", "fp32", "-e",
                           "cpu", "-c", str(tmp_path / "c"), "--extra_options", "exclude_lm_head=true"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"})
    assert proc.returncode != 0
    reason = failure_reason(proc)
    assert reason.startswith("KeyError: 'rope_type' in the builder's make_rope_init, builders/base.py line "), reason


def test_no_tokenizer_is_one_line(tmp_path):
    model = make_model(tmp_path / "m", arch="llama", hidden=64)
    assert_user_error(run_cli("build", "--target", "ort-genai", "--model", model, "--out", tmp_path / "o"), "no tokenizer.json")


@pytest.mark.parametrize("arch, window", [("gemma3", dict(sliding_window=300, max_position=512,
                                                            layer_types=["sliding_attention", "full_attention"])),
                                          ("phi3", dict(sliding_window=1024, max_position=512, original_max_position_embeddings=512))])
def test_bench_e2e_runs_a_model_whose_sliding_window_is_longer_than_the_run(tmp_path, small_tokenizer, arch, window,
                                                                           monkeypatch):
    """onnxruntime-genai sizes the KV cache by max_length and GroupQueryAttention refuses one shorter than the window
    (a Gemma 3's 512 against a 64 + 128-token run): the run asks for the window. A window no layer uses (Phi-3's
    262,144, longer than its positions, written by the builder all the same) is not asked for: onnxruntime-genai
    refuses a max_length over the context length. --work is given relative (the builder runs inside it)."""
    model = make_model(tmp_path / arch, arch=arch, vocab=320, hidden=64, eos_token_id=0, tokenizer=small_tokenizer,
                       head=False, **window)
    monkeypatch.chdir(tmp_path)
    result = run_cli("bench", "--e2e", "--model", model, "--target", "ort-genai", "--work", "work", "--tokens", 4,
                     "--prompt-length", 8, "--repeats", 1, "--json")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "work" / "work").exists()
    assert json.loads(result.stdout)["parity"]["passed"]


@pytest.mark.parametrize("window, expected", [({"window_size": 512, "layers": [0, 1]}, 512),  # Gemma 3: the window
                                              ({"window_size": 262144, "layers": []}, 192),  # Phi-3: no layer uses it
                                              ({"window_size": 262144, "layers": [0]}, 131072),  # at most the context
                                              (None, 192)])
def test_the_e2e_runs_max_length_holds_the_window_its_layers_use(tmp_path, window, expected):
    from vqexport.bench.e2e import max_length

    decoder = {"sliding_window": window} if window else {}
    (tmp_path / "genai_config.json").write_text(json.dumps({"model": {"context_length": 131072, "decoder": decoder}}))
    assert max_length(str(tmp_path), 192) == expected


def test_bench_e2e_runs_both_sides_through_onnxruntime_genai(tmp_path):
    work = tmp_path / "work"
    shutil.copytree(demo_dir(), tmp_path / "demo")
    text = tmp_path / "text.py"
    text.write_text("import os\n\n\ndef walk(top):\n    for root, dirs, files in os.walk(top):\n        yield root\n")
    result = run_cli("bench", "--e2e", "--model", tmp_path / "demo", "--work", work, "--tokens", 4, "--prompt-length", 8,
                     "--repeats", 1, "--text", text, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    for side in ("vq", "dense"):
        assert out[side]["tokens_per_s"] > 0 and out[side]["ttft_ms"] > 0 and out[side]["model_bytes"] > 0
        assert 0 < out[side]["bound_fraction"]
    assert out["dense"]["bytes_per_token"] > out["vq"]["bytes_per_token"]  # the dense head reads V x d
    assert out["parity"]["passed"] and out["target"] == "ort-int4" and out["parity_enforced"] is True
    assert out["dense_int8_head"]["tokens_per_s"] > 0 and out["ratios_dense_int8_head"]["tokens_per_s"] > 0
    agree = out["agreement_with_dense"]  # vs the builder's dense int4 model: the prompt's last position + each step
    assert agree["positions"] == 1 + 4
    assert agree["on"] == f"the first 12 tokens of {text}"  # teacher-forced on the text, not on random ids
    # the figures are those of the two sides' logits, which the run keeps in --work: recomputed here
    vq, dense = (np.load(work / f"logits-{side}.npy").astype(np.float64) for side in ("vq", "dense"))
    V = load_source(demo_dir()).geometry.vocab_size
    assert vq.shape == dense.shape == (5, V)
    lq, ld = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (vq, dense))
    assert agree["top1_agreement"] == pytest.approx(np.mean(vq.argmax(-1) == dense.argmax(-1)))
    assert agree["kl_dense_to_vq"] == pytest.approx(np.mean(np.sum(np.exp(ld) * (ld - lq), -1)), rel=1e-6)
    assert agree["kl_dense_to_vq"] > 1e-4  # a VQ head is not the dense output layer: its distribution differs
    baseline = next(p for p in work.glob("demo-*-builder-int4*") if not p.name.endswith("-int8head"))  # options' tag
    dense_ops = {n.name for n in load_graph(baseline / "model.onnx").graph.node}
    assert any("lm_head" in n for n in dense_ops)
    assert_user_error(run_cli("bench", "--e2e", "--target", "openvino", "--model", tmp_path / "demo"),
                      "has no onnxruntime-genai model of the builder to compare with")
    assert_user_error(run_cli("bench", "--e2e"), "exactly one of --model DIR and --shape NAME")


def test_a_soft_capped_model_on_the_builders_trunk_gives_its_own_logits(tmp_path, small_tokenizer):
    """Gemma 2 on the builder's trunk: the builder leaves the output layer out, so the cap (final_logit_softcapping)
    is the head's, and the artifact gives transformers' logits."""
    from .models import artifact_logits, identity_head, transformers_logits
    from vqexport.head.spec import write_head

    model = make_model(tmp_path / "model", arch="gemma2", vocab=320, hidden=64, heads=4, kv_heads=2, max_position=256,
                       tokenizer=small_tokenizer, head=False, final_logit_softcapping=0.4, sliding_window=128)
    write_head(model, identity_head(model))
    built = api.build("ort-genai", model=model, out=tmp_path / "a", steps=4)
    assert built.parity.passed and built.manifest["runtime"]["trunk"] == "genai"
    ids, nxt = np.random.default_rng(1).integers(0, 320, size=(1, 9)), np.array([[7]])
    prefill, decode = artifact_logits(built.out, ids, np.ones_like(ids), nxt)
    np.testing.assert_allclose(prefill[0], transformers_logits(model, ids, np.ones_like(ids))[0], atol=1e-4, rtol=0)
    full = np.concatenate([ids, nxt], 1)
    np.testing.assert_allclose(decode, transformers_logits(model, full, np.ones_like(full))[:, -1], atol=1e-4, rtol=0)


def _gqa_trunk(windows):
    """A graph with one GroupQueryAttention node per layer, named as the builder names them, with these windows
    (None: no local_window_size attribute)."""
    import onnx_ir as ir

    x = ir.Value(name="x")
    nodes = [ir.node("GroupQueryAttention", [x], domain="com.microsoft", name=f"/model/layers.{i}/attn/GroupQueryAttention",
                     attributes={} if w is None else {"local_window_size": w}) for i, w in enumerate(windows)]
    return ir.Model(ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes), ir_version=10)


@pytest.mark.parametrize("windows, wrong", [([300, 300, -1, 300], None), ([300, 300, None, 300], None),
                                            ([300, -1, 300, 300], "layer 1: full attention where transformers' model "
                                                                  "has a window of 300, layer 2: a window of 300 where "
                                                                  "transformers' model has full attention"),
                                            ([300, 300, -1, 299], "layer 3: a window of 299")])
def test_the_builders_windows_are_checked_layer_by_layer(tmp_path, windows, wrong):
    """Each layer's window in the builder's graph must be transformers' (layer_types): a window on the wrong layers,
    or of another size, changes the logits only past the window, where short parity prompts never reach."""
    from vqexport.errors import VQExportError
    from vqexport.trunk.genai import check_window

    model = make_model(tmp_path / "g3", arch="gemma3", vocab=320, hidden=64, sliding_window=300, max_position=512,
                       layers=4, layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                              "sliding_attention"], head=False)
    source = load_source(model, need_head=False)
    if wrong is None:
        check_window(source, _gqa_trunk(windows))
    else:
        with pytest.raises(VQExportError, match="another attention window than transformers") as e:
            check_window(source, _gqa_trunk(windows))
        assert wrong in str(e.value)

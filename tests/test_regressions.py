"""Regression tests for defects found in review: each failed before its fix."""

import json
import struct

import numpy as np
import pytest

from vqexport import api
from vqexport.backends.base import Runner, StepOutput
from vqexport.backends.ort.runner import OrtRunner
from vqexport.profiles import Parity
from vqexport.verify import compare_runners

from .conftest import assert_user_error, run_cli
from .models import make_model


def test_dotdot_output_path_cannot_replace_a_directory_without_force(tmp_path, tiny_model, monkeypatch):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert_user_error(run_cli("build", "--model", tiny_model, "--out", "nosuch/../victim"), "already holds")
    assert (victim / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["..", "a/b", "", "../x"])
def test_profile_names_cannot_escape_the_build_dir(tmp_path, name, monkeypatch):
    f = tmp_path / "p.toml"
    f.write_text(f'backend = "ort"\nname = "{name}"\n')
    monkeypatch.chdir(tmp_path)  # no --out: the default ./artifacts/<name> would be here
    assert_user_error(run_cli("build", "--target", f), "name must be")
    assert [p.name for p in tmp_path.iterdir()] == ["p.toml"]


class _Fake(Runner):
    def __init__(self, vocab, corrupt=None):
        self.kv_shapes, self.vocab_size = [(1, 2)], vocab
        self.corrupt = corrupt

    def step(self, input_ids, attention_mask, past):
        b, s = input_ids.shape
        logits = np.tile(np.linspace(-1, 1, self.vocab_size, dtype=np.float32), (b, s, 1))
        present = [np.zeros((b, 1, attention_mask.shape[1], 2), np.float32)] * 2
        out = StepOutput(logits=logits, present=present)
        if self.corrupt == "nan-logits":
            out.logits[..., 3] = np.nan
        if self.corrupt == "reversed":
            out.logits[:] = out.logits[..., ::-1]
        if self.corrupt == "nan-topk":
            ids = np.argsort(-logits, -1)[..., :4]
            out = StepOutput(logits=None, present=present, extra={
                "topk_ids": ids, "topk_logprobs": np.full(ids.shape, np.nan, np.float32),
                "cluster_logprobs": np.full((b, s, 2), np.nan, np.float32)})
        return out


class _Scripted(Runner):
    """The same logits at every position (``logits`` [V]: a constant hidden state through a head), and a KV cache of
    zeros except ``kv`` {(row, position): value} (positions counted in the full, left-padded sequence)."""

    def __init__(self, logits, kv=None):
        self.kv_shapes, self.vocab_size = [(1, 2)], len(logits)
        self.logits, self.kv = np.asarray(logits, np.float32), kv or {}

    def step(self, input_ids, attention_mask, past):
        b, s = input_ids.shape
        present = [np.zeros((b, 1, attention_mask.shape[1], 2), np.float32) for _ in range(2)]
        for (row, pos), value in self.kv.items():
            if pos < attention_mask.shape[1]:
                present[1][row, 0, pos] = value
        return StepOutput(logits=np.tile(self.logits, (b, s, 1)), present=present)


def _bias_free_logits():
    """A VQ head without bias: every token gets its code's score z[M[v]], so each cluster's tokens tie exactly."""
    z = np.array([0.5, 1.0, -0.3], np.float32)
    return z[np.arange(10) % 3]  # cluster 1 (the best) = tokens 1, 4, 7; np.argmax picks 1


def test_parity_accepts_another_member_of_an_exactly_tied_cluster():
    parity = Parity(steps=3, atol=1e-2, kl_max=1e-2, top1_agreement_min=1.0, top5_overlap_min=1.0, greedy_must_match=True)
    ref = _bias_free_logits()
    tgt = ref.copy()
    tgt[4] += 1e-6  # rounding: the target's argmax is token 4, tied with the reference's argmax 1
    assert tgt.argmax() == 4 and ref.argmax() == 1 and ref[4] == ref[1]
    with _Scripted(ref) as r, _Scripted(tgt) as t:
        report = compare_runners(r, t, [[1, 2, 3], [4]], 3, parity)
    assert report.passed, report.failures
    assert report.top1_agreement == 1.0 and report.greedy_match_steps == 3
    # a token the reference does not tie with the argmax (0.001 below it) is a different choice, not a tie
    ref[4] -= 1e-3
    tgt[4] = ref[1] + 1e-6
    with _Scripted(ref) as r, _Scripted(tgt) as t:
        report = compare_runners(r, t, [[1, 2, 3], [4]], 3, parity)
    assert not report.passed and report.top1_agreement == 0.0 and report.greedy_match_steps == 0
    assert any(f.startswith("top-1 agreement 0.0000 < 1.0") for f in report.failures), report.failures
    assert any(f.startswith("greedy tokens diverge at decode step 1 of 3") for f in report.failures), report.failures


class _FirstTokenOff(Runner):
    """Fixed logits at every position; ``swap``: the prefill's last position prefers the second token instead."""

    def __init__(self, swap: bool):
        self.kv_shapes, self.vocab_size, self.swap = [(1, 2)], 10, swap

    def step(self, input_ids, attention_mask, past):
        b, s = input_ids.shape
        logits = np.tile(np.linspace(-1, 1, 10, dtype=np.float32), (b, s, 1))
        if self.swap and s > 1:
            logits[:, -1, [8, 9]] = logits[:, -1, [9, 8]]
        return StepOutput(logits=logits, present=[np.zeros((b, 1, attention_mask.shape[1], 2), np.float32)] * 2)


def test_the_greedy_check_judges_the_first_new_token():
    """The prefill's greedy token is the first decode step's input: a target that would choose another one diverges at
    step 1, even where the top-1 share it may miss lets it through."""
    parity = Parity(steps=8, atol=10.0, kl_max=10.0, top1_agreement_min=0.5, top5_overlap_min=0.0, greedy_must_match=True)
    with _FirstTokenOff(False) as r, _FirstTokenOff(True) as t:
        report = compare_runners(r, t, [list(range(1, 21))], 8, parity)
    assert report.top1_agreement > 0.9 and report.greedy_match_steps == 0 and not report.passed
    assert any(f.startswith("greedy tokens diverge at decode step 1 of 8") for f in report.failures), report.failures
    assert "every logit is within the allowed atol 10, so the tokens ranked otherwise were near-ties" in report.failures[-1]
    with _FirstTokenOff(False) as r, _FirstTokenOff(False) as t:
        assert compare_runners(r, t, [list(range(1, 21))], 8, parity).greedy_match_steps == 8


@pytest.mark.parametrize("row, pos, reported", [
    (0, 0, 0.25),  # row 0's prompt is 3 tokens: position 0 is real
    (0, 4, 0.25),  # a decode step's position
    (1, 1, 0.0),  # row 1's prompt is 1 token, left-padded: positions 0 and 1 are masked out
])
def test_kv_cache_difference_is_reported_at_real_positions_only(row, pos, reported):
    logits = np.linspace(-1, 1, 10, dtype=np.float32)
    with _Scripted(logits) as r, _Scripted(logits, kv={(row, pos): 0.25}) as t:
        report = compare_runners(r, t, [[1, 2, 3], [4]], 2, Parity(steps=2))
    assert report.present_max_abs_diff == reported
    assert report.passed and report.max_abs_diff == 0.0  # the logits are the same


@pytest.mark.parametrize("corrupt", ["nan-logits", "nan-topk"])
def test_non_finite_target_outputs_fail_parity(corrupt):
    with _Fake(10) as ref, _Fake(10, corrupt) as tgt:
        report = compare_runners(ref, tgt, [[1, 2, 3]], 2, Parity(atol=1.0, kl_max=1.0, top1_agreement_min=0.0),
                                 mapping=np.arange(10) % 2)
    assert not report.passed
    assert any("non-finite" in f for f in report.failures)


def test_a_share_judged_on_fewer_steps_than_the_targets_says_so():
    parity = Parity(steps=32, atol=10.0, kl_max=10.0, top1_agreement_min=0.5, top5_overlap_min=0.0, greedy_must_match=False)
    for steps, hint in ((2, True), (32, False)):
        with _Fake(10) as ref, _Fake(10, "reversed") as tgt:
            report = compare_runners(ref, tgt, [[1, 2, 3]], steps, parity, mapping=np.arange(10) % 2)
        assert not report.passed and report.failures[0].startswith("top-1 agreement 0.0000 < 0.5")
        assert ("judged on 5 positions; this target's tolerances are set for its 32 decode steps" in report.failures[0]) == hint


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("s") / "model", vocab=150, k=12, hidden=64, heads=4, kv_heads=4)


def _profile(tmp_path, body):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\nname = "p"\n' + body + '\n[parity]\nsteps = 3\natol = 1.0\nkl_max = 1e-2\n'
                 'top1_agreement_min = 0.9\ntop5_overlap_min = 0.9\ngreedy_must_match = false\n')
    return str(f)


def test_native_int8_sizes_and_topk(small, tmp_path):
    result = api.build(_profile(tmp_path, 'codebook = "int8"\n[int8]\nencoding = "native"\n[decode]\nmode = "topk"\nk = 2'),
                       model=small, out=tmp_path / "art")
    assert result.parity.passed, result.parity.failures  # top-5 overlap is judged on the graph's 2 ids
    assert result.manifest["sizes"]["dense_head"]["shape"] == [150, 64]


@pytest.mark.parametrize("body", ['head = "fused"\n[ort]\nkernel = "function"', 'codebook = "int8"\n[int8]\nencoding = "native"'])
def test_dense_twin_reproduces_the_head(small, tmp_path, body):
    """Whatever the artifact's head form, its dense twin computes the head's definition (vq_head.safetensors) on the
    artifact's own trunk: the PyTorch reference's logits."""
    from vqexport.bench.artifact import dense_twin
    from vqexport.build import reference_runner
    from vqexport.source import load_source

    result = api.build(_profile(tmp_path, body), model=small, out=tmp_path / "art")
    twin = dense_twin(result.out, "model.onnx", tmp_path)
    ids = np.arange(8).reshape(2, 4)
    with reference_runner(load_source(small)) as a, OrtRunner(twin) as b:
        la = a.step(ids, np.ones_like(ids), a.empty_past(2)).logits
        lb = b.step(ids, np.ones_like(ids), b.empty_past(2)).logits
    np.testing.assert_allclose(la, lb, atol=1e-4)


def test_verify_with_an_incompatible_model(small, tmp_path):
    api.build("ort", model=small, out=tmp_path / "art", steps=1)
    other = make_model(tmp_path / "other", vocab=151, k=12, hidden=64, heads=4, kv_heads=4)
    assert_user_error(run_cli("verify", "--artifact", tmp_path / "art", "--model", other), "vocab_size = 151")


def test_manifest_without_runtime(small, tmp_path):
    api.build("ort", model=small, out=tmp_path / "art", steps=1)
    m = json.loads((tmp_path / "art" / "manifest.json").read_text())
    del m["runtime"]
    (tmp_path / "art" / "manifest.json").write_text(json.dumps(m))
    for args in (["generate", "--artifact", tmp_path / "art", "--prompt", "x"], ["inspect", tmp_path / "art"]):
        assert_user_error(run_cli(*args), "manifest lacks runtime")


def test_safetensors_header_with_wrong_types(tiny_model, tmp_path):
    f = tiny_model / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = 128
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    assert_user_error(run_cli("build", "--model", tiny_model, "--out", tmp_path / "o"), "corrupt safetensors header entry")


def test_session_setting_onnxruntime_rejects(tiny_model, tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\nname = "p"\n[ort]\nsession_config = { "session.qdq_matmulnbits_accuracy_level" = "x" }\n')
    result = run_cli("build", "--target", f, "--model", tiny_model, "--out", tmp_path / "o")
    assert_user_error(result, "onnxruntime could not load the model")
    assert not (tmp_path / "o").exists()


def test_a_target_file_without_top_5_checks_it_as_strictly_as_top_1(tmp_path):
    from vqexport.profiles import load_profile

    f = tmp_path / "plain.toml"
    f.write_text('name = "plain"\nbackend = "ort"\n')
    parity = load_profile(str(f)).parity
    assert parity.top1_agreement_min == parity.top5_overlap_min == 1.0
    f.write_text('name = "plain"\nbackend = "ort"\n[parity]\ntop1_agreement_min = 0.9\n')  # relaxed: top-5 alike
    parity = load_profile(str(f)).parity
    assert parity.top1_agreement_min == parity.top5_overlap_min == 0.9


def test_generated_text_keeps_the_word_boundary_after_the_prompt_with_a_sentencepiece_decoder(tmp_path):
    """A Metaspace decoder (SentencePiece, as Llama 2's and Gemma's tokenizers) drops the leading space of the text it
    decodes: the new tokens, decoded alone, would be glued to the prompt's last word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"\u2581w{i}": i + 1 for i in range(96)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    model = make_model(tmp_path / "m", arch="llama", vocab=97, hidden=32, k=11, tokenizer=path)
    art = api.build("ort", model=model, out=tmp_path / "art", steps=1).out
    gen = api.generate(art, "w1 w2", 5)
    assert len(gen.new_ids) == 5 and gen.text == " " + " ".join(f"w{i - 1}" for i in gen.new_ids)
    assert tok.decode(gen.new_ids) == gen.text[1:]  # what the text was before: no space after the prompt
    printed = run_cli("generate", "--artifact", art, "--prompt", "w1 w2", "-n", 5).stdout
    assert printed == "w1 w2" + gen.text + "\n"


def test_end_of_sequence_ids_include_generation_config_s(tmp_path):
    """An instruct model's end of turn is often only in generation_config.json (transformers' generate stops there)."""
    from vqexport.source import load_source

    model = make_model(tmp_path / "m", arch="llama", vocab=97, hidden=32, k=11, eos_token_id=2)
    assert load_source(model).geometry.eos_token_ids == (2,)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2, 7]}))
    assert load_source(model).geometry.eos_token_ids == (2, 5, 7)  # the config's first, then the others, once each
    (model / "generation_config.json").write_text("{not json")
    with pytest.raises(api.VQExportError, match="generation_config.json: not a JSON object"):
        load_source(model)

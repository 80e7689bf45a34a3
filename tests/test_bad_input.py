"""Every problem with a model directory or its head is one clear line, exit code 2, and nothing written."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from vqexport.head.spec import CONFIG_FILE, WEIGHTS_FILE

from .conftest import assert_user_error, run_cli
from .models import make_model


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("good") / "model", rank=2)


@pytest.fixture
def model(good, tmp_path):
    """A fresh copy of a valid model directory to break."""
    return shutil.copytree(good, tmp_path / "model")


def _build_fails(tmp_path, model, *fragments):
    out = tmp_path / "out"
    assert_user_error(run_cli("build", "--model", model, "--out", out), *fragments)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging directory left behind


def _edit_json(path, **changes):
    raw = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            raw.pop(k, None)
        else:
            raw[k] = v
    path.write_text(json.dumps(raw))


def test_missing_directory_and_a_file_instead(tmp_path):
    _build_fails(tmp_path, tmp_path / "nope", "does not exist")
    (tmp_path / "file").write_text("x")
    _build_fails(tmp_path, tmp_path / "file", "not a directory")
    for command in ("verify", "bench"):  # an artifact path that is a file
        assert_user_error(run_cli(command, "--artifact", tmp_path / "file"), "file: not a directory; an artifact is")
    assert_user_error(run_cli("verify", "--artifact", tmp_path / "nope"), "nope: artifact directory does not exist")


def test_config_missing_or_not_json_or_not_hf(model, tmp_path):
    (model / "config.json").write_text("{not json")
    _build_fails(tmp_path, model, "config.json", "not valid JSON")
    (model / "config.json").write_text(json.dumps({"hidden_size": 4}))
    _build_fails(tmp_path, model, "not a Hugging Face config")
    (model / "config.json").unlink()
    _build_fails(tmp_path, model, "no config.json")


@pytest.mark.parametrize("change, fragments", [
    ({"hidden_size": "abc"}, ("cannot load this config", "hidden_size", "expected int")),
    ({"rope_parameters": {"rope_type": "bogus"}}, ("bogus",)),
])
def test_config_values_transformers_refuses(model, tmp_path, change, fragments):
    """One line (assert_user_error counts them): transformers' own log lines about the config stay quiet."""
    _edit_json(model / "config.json", **change)
    _build_fails(tmp_path, model, *fragments)


def test_missing_weights_and_pickles(model, tmp_path):
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    _build_fails(tmp_path, model, "only safetensors weights are read")
    (model / "pytorch_model.bin").unlink()
    _build_fails(tmp_path, model, "no model.safetensors")


def test_truncated_and_garbage_safetensors(model, tmp_path):
    data = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").write_bytes(data[: len(data) // 2])
    _build_fails(tmp_path, model, "model.safetensors", "truncated")
    (model / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    _build_fails(tmp_path, model, "corrupt safetensors header")
    (model / "model.safetensors").write_bytes(b"abc")
    _build_fails(tmp_path, model, "truncated safetensors file")


def _shard(model):
    """Split model.safetensors into two shards with an index."""
    tensors = load_file(str(model / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(model / file), metadata={"format": "pt"})
    (model / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return shards


def test_sharded_weights_build_and_missing_shards_or_index_are_named(model, tmp_path):
    shards = _shard(model)
    r = run_cli("build", "--model", model, "--out", tmp_path / "sharded", "--steps", 1)
    assert r.exit_code == 0, r.stderr
    first = next(iter(shards))
    data = (model / first).read_bytes()
    (model / first).unlink()
    _build_fails(tmp_path, model, "shard(s) model-00001-of-00002.safetensors", "missing")
    (model / first).write_bytes(data)
    (model / "model.safetensors.index.json").write_text("{}")
    _build_fails(tmp_path, model, "malformed shard index")
    (model / "model.safetensors.index.json").unlink()
    _build_fails(tmp_path, model, "no model.safetensors and no model.safetensors.index.json")


def test_an_index_whose_shards_lack_tensors(model, tmp_path):
    shards = _shard(model)
    last = list(shards)[-1]
    tensors = load_file(str(model / last))
    dropped = sorted(tensors)[0]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(model / last), metadata={"format": "pt"})
    _build_fails(tmp_path, model, "lack", dropped)


def test_a_weight_with_the_wrong_shape(model, tmp_path):
    tensors = load_file(str(model / "model.safetensors"))
    name = next(k for k in sorted(tensors) if k.endswith("q_proj.weight"))
    tensors[name] = np.zeros((3, 3), np.float32)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    _build_fails(tmp_path, model, f"tensor {name} does not have the shape config.json implies")


def test_weights_the_config_has_no_place_for(model, tmp_path):
    _edit_json(model / "config.json", num_hidden_layers=1)  # the weights hold 2 layers: one would be dropped silently
    _build_fails(tmp_path, model, "tensor(s) the llama model of config.json has no place for", "model.layers.1.")


def test_no_head_says_how_to_make_one(model, tmp_path):
    (model / CONFIG_FILE).unlink()
    (model / WEIGHTS_FILE).unlink()
    _build_fails(tmp_path, model, "no VQ-Logits head", "vqexport convert")


def test_a_checkpoint_in_the_earlier_vqexport_format_is_refused(tmp_path):
    """The earlier vqexport-only checkpoint (one config.json with d_model, n_layers, head) is no longer read."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 97,
                                                 "head": {"codebook_size": 11, "bias": True}}))
    save_file({"tok_emb": np.zeros((97, 32), np.float32)}, str(old / "model.safetensors"))
    _build_fails(tmp_path, old, f"{old / 'config.json'}: a checkpoint in vqexport's earlier format", "vqexport convert")
    assert_user_error(run_cli("convert", "--from", old, "-k", 8, "--out", tmp_path / "vq"), "earlier format")
    assert not (tmp_path / "vq").exists()


def test_head_file_without_its_json_and_the_reverse(model, tmp_path):
    cfg = (model / CONFIG_FILE).read_bytes()
    (model / CONFIG_FILE).unlink()
    _build_fails(tmp_path, model, "head weights without their config", CONFIG_FILE)
    (model / CONFIG_FILE).write_bytes(cfg)
    (model / WEIGHTS_FILE).unlink()
    _build_fails(tmp_path, model, "head config without its weights", WEIGHTS_FILE)


def test_head_vocabulary_or_hidden_size_disagreeing_with_the_trunk(model, tmp_path):
    raw = json.loads((model / CONFIG_FILE).read_text())
    _edit_json(model / "config.json", vocab_size=raw["vocab_size"] + 1)
    _build_fails(tmp_path, model, "the head has vocab_size 97", "says 98")
    _edit_json(model / "config.json", vocab_size=raw["vocab_size"], hidden_size=64)
    _build_fails(tmp_path, model, "the head has hidden_size 32", "says 64")


@pytest.mark.parametrize("change, fragment", [
    ({"codebook_size": 1000}, "codebook_size must be in [1, vocab_size=97]"),
    ({"rank": 40}, "rank must be in [0, min(vocab_size, hidden_size) = 32]"),
    ({"rank": 1.5}, "rank must be an integer"),
    ({"bias": "yes"}, "bias must be true or false"),
    ({"type": "magic"}, "type must be one of"),
    ({"colour": 1}, "unknown key(s): colour"),
    ({"vocab_size": None}, "missing key 'vocab_size'"),
    ({"format_version": 9}, "format_version 9 is not supported"),
])
def test_bad_head_config(model, tmp_path, change, fragment):
    _edit_json(model / CONFIG_FILE, **change)
    _build_fails(tmp_path, model, CONFIG_FILE, fragment)


def _edit_head(model, **tensors):
    t = load_file(str(model / WEIGHTS_FILE))
    for k, v in tensors.items():
        if v is None:
            t.pop(k)
        else:
            t[k] = v
    save_file(t, str(model / WEIGHTS_FILE))


def test_bad_head_tensors(model, tmp_path):
    good = load_file(str(model / WEIGHTS_FILE))
    _edit_head(model, codebook=good["codebook"][:, :5].copy())
    _build_fails(tmp_path, model, "tensor codebook has shape [11, 5]", "implies [11, 32]")
    _edit_head(model, codebook=good["codebook"], map=good["map"].astype(np.float32))
    _build_fails(tmp_path, model, "tensor map has dtype F32", "integer")
    m = good["map"].copy()
    m[7] = 11
    _edit_head(model, map=m)
    _build_fails(tmp_path, model, "map[7] = 11 is outside [0, codebook_size=11)")
    c = good["codebook"].copy()
    c[2, 3] = np.nan
    _edit_head(model, map=good["map"], codebook=c)
    _build_fails(tmp_path, model, "tensor codebook has a non-finite value at index [2, 3]")
    _edit_head(model, codebook=good["codebook"], lowrank_u=None)
    _build_fails(tmp_path, model, "missing tensor(s) lowrank_u")
    _edit_head(model, lowrank_u=good["lowrank_u"], extra=np.zeros(3, np.float32))
    _build_fails(tmp_path, model, "unexpected tensor(s) extra")


def test_tokenizer_larger_than_the_vocabulary(model, tmp_path, small_tokenizer):
    shutil.copy(small_tokenizer, model / "tokenizer.json")  # ~300 tokens, the model has 97
    _build_fails(tmp_path, model, "tokenizer has", "vocab_size is 97")
    (model / "tokenizer.json").write_text("{broken")
    _build_fails(tmp_path, model, "cannot load tokenizer")


def test_unknown_and_malformed_targets(model, tmp_path):
    assert_user_error(run_cli("build", "--target", "nope", "--model", model), "unknown target 'nope'", "known targets")
    as_json = run_cli("build", "--target", "nope", "--model", model, "--json")
    assert_user_error(as_json, "unknown target 'nope'")
    assert as_json.stdout == ""  # README: a bad input leaves stdout empty, with --json too
    bad = tmp_path / "bad.toml"
    bad.write_text("backend = [")
    assert_user_error(run_cli("build", "--target", bad, "--model", model), "malformed TOML")
    assert_user_error(run_cli("build", "--target", tmp_path / "missing.toml", "--model", model), "does not exist")
    many = tmp_path / "many.toml"  # ONNX Runtime would start every one of them
    many.write_text('name = "many"\nbackend = "ort"\n[ort]\nintra_op_num_threads = 100000\n')
    assert_user_error(run_cli("build", "--target", many, "--model", model), "ort.intra_op_num_threads must be an integer in [0, 1024]")
    unnamed = tmp_path / "a name with spaces.toml"  # the file's name stands for the target's only when it can
    unnamed.write_text('backend = "ort"\n')
    assert_user_error(run_cli("build", "--target", unnamed, "--model", model), "'a name with spaces' cannot stand for one",
                      'add name = "..."')


def test_real_process_exit_code_and_single_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vqexport", "build", "--model", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert proc.stdout == ""


def test_parity_steps_beyond_the_models_positions(tmp_path):
    """The parity check's longest prompt (11 random ids without a tokenizer) + its decode steps must fit in the
    model's positions: refused before any work, for build and for verify."""
    model = make_model(tmp_path / "short", max_position=16)
    _build_fails(tmp_path, model, "longest prompt (11 tokens) + 32 decode steps", "max_position 16", "--steps 5")
    out = tmp_path / "ok"
    assert run_cli("build", "--model", model, "--out", out, "--steps", 5).exit_code == 0  # 11 + 5 = 16 positions
    assert_user_error(run_cli("verify", "--artifact", out, "--steps", 6), "+ 6 decode steps", "max_position 16")


def test_verify_prompts_a_user_gives(tmp_path):
    """Each prompt is a string (encoded with the model's tokenizer) or a list of token ids in [0, V), and must fit
    with the decode steps in the model's positions: anything else is one line, exit 2, before any work."""
    model = make_model(tmp_path / "short", max_position=16)  # no tokenizer; V = 97 (make_model's default)
    out = tmp_path / "ok"
    assert run_cli("build", "--model", model, "--out", out, "--steps", 5).exit_code == 0
    files = {"not-json.json": "[1, 2", "not-a-list.json": '{"p": "x"}', "empty.json": "[]",
             "bad-entry.json": "[[1, 2], 3.5]", "out-of-range.json": "[[1, 97]]", "empty-prompt.json": "[[]]",
             "too-many.json": json.dumps([[1]] * 65), "too-long.json": "[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]"}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    cases = {"not-json.json": ["not-json.json: not valid JSON"], "not-a-list.json": ["expected a JSON list of prompts"],
             "empty.json": ["no prompts given"], "bad-entry.json": ["prompt 2 is neither a string nor a list of token ids"],
             "out-of-range.json": ["prompt 1 has token id 97 outside [0, 97)"],
             "empty-prompt.json": ["prompt 1 is empty"], "too-many.json": ["65 prompts given; at most 64"],
             "too-long.json": ["longest prompt (12 tokens) + 5 decode steps", "max_position 16"],
             "missing.json": ["missing.json: cannot read"]}
    for name, says in cases.items():
        assert_user_error(run_cli("verify", "--artifact", out, "--steps", 5, "--prompts", tmp_path / name), *says)
    assert_user_error(run_cli("verify", "--artifact", out, "--prompt", "x = 1"),
                      "prompt 1 is text and the model has no tokenizer.json; give token ids")
    ok = run_cli("verify", "--artifact", out, "--steps", 4, "--prompts", tmp_path / "too-long.json", "--json")
    assert ok.exit_code == 0 and json.loads(ok.stdout)["positions"] == 12 + 4  # 12 + 4 = 16 positions fit


def test_a_failed_build_leaves_no_directory_it_made(model, tmp_path, monkeypatch):
    from vqexport.backends.torch_ref import TorchRunner

    broken = shutil.copytree(model, tmp_path / "broken")
    _edit_json(broken / "config.json", num_key_value_heads=3)  # 4 heads cannot share 3 key/value heads
    out = tmp_path / "new" / "x" / "y"
    fragment = "tensor model.layers.0.self_attn.k_proj.weight does not have the shape config.json implies"
    assert_user_error(run_cli("build", "--model", broken, "--out", out), fragment)
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()  # a directory that was there before the build stays
    assert_user_error(run_cli("build", "--model", broken, "--out", tmp_path / "kept" / "y"), fragment)
    assert list((tmp_path / "kept").iterdir()) == []
    # a failure after the output's parents were made (parity, exit 1): they are removed again, "kept" stays
    real_step = TorchRunner.step

    def perturbed(self, *args):
        out = real_step(self, *args)
        out.logits[..., 0] += 0.05
        return out

    monkeypatch.setattr(TorchRunner, "step", perturbed)
    result = run_cli("build", "--model", model, "--out", tmp_path / "kept" / "new" / "y", "--steps", 1)
    assert result.exit_code == 1 and "parity FAILED for target ort: " in result.stderr, (result.exit_code, result.stderr)
    assert list((tmp_path / "kept").iterdir()) == []


def test_api_steps_and_seed_are_checked_like_the_cli(demo_artifact, tmp_path):
    from vqexport import api
    from vqexport.errors import VQExportError

    for steps in (-1, 4097, "2", 1.5, True):
        with pytest.raises(VQExportError, match=r"steps must be an integer in \[0, 4096\]"):
            api.build("ort", out=tmp_path / "o", steps=steps)
        with pytest.raises(VQExportError, match=r"steps must be an integer in \[0, 4096\]"):
            api.verify(demo_artifact, steps=steps)
    assert not (tmp_path / "o").exists()
    for seed in (-1, 2**63, "a"):
        with pytest.raises(VQExportError, match=r"seed must be an integer in \[0, 2\^63\)"):
            api.generate(demo_artifact, "def main(", max_new_tokens=2, sample=True, seed=seed)


@pytest.mark.parametrize("body, says", [
    ('backend = "openvino"\n[ort]\nintra_op_num_threads = 2', "[ort] applies to backend = 'ort' only, not 'openvino'"),
    ('backend = "ort"\nopset = 23\n[trunk]\nsource = "genai"', "opset applies to the portable trunk"),
    ('backend = "ort"\ncodebook = "int4"\n[int8]\naccuracy_level = 0', "codebook = 'int4' is ONNX Runtime's MatMulNBits"),
    ('backend = "ort"\n[int8]\nencoding = "native"', "[int8] applies to codebook = 'int8' or 'int4', not 'fp32'"),
    ('backend = "ort"\ncodebook = "int8"\n[int8]\naccuracy_level = 0', "int8.accuracy_level applies to encoding = 'native'"),
    ('backend = "ort"\ncodebook = "int8"\n[int8]\nencoding = "native"\nreduce_range = true',
     "int8.reduce_range applies to the QDQ encoding only"),
    ('backend = "ort"\n[decode]\nk = 20', "decode.k applies to decode.mode = 'topk' only"),
    ('backend = "ort"\n[decode]\nkeep_logits = true', "decode.keep_logits applies to decode.mode = 'topk' only"),
])
def test_a_profile_key_that_would_be_ignored_is_refused(tmp_path, body, says):
    """A valid key this profile would ignore (its backend, codebook, head, encoding or decode mode has no use for it)
    is a misconfiguration: one line, exit 2, nothing written."""
    f = tmp_path / "p.toml"
    f.write_text('name = "p"\n' + body + "\n")
    assert_user_error(run_cli("build", "--target", f, "--out", tmp_path / "o"), says)
    assert not (tmp_path / "o").exists()


def test_every_bundled_profile_round_trips_through_its_manifest_record():
    """A manifest records every key of its profile (Profile.to_dict), including those the profile ignores; reading the
    record back (verify, bench) gives the same profile and refuses nothing."""
    from vqexport.profiles import bundled_names, load_profile, parse_profile

    for name in bundled_names():
        profile = load_profile(name)
        assert parse_profile(profile.to_dict(), "manifest.json", recorded=True).to_dict() == profile.to_dict(), name


def test_verify_prompts_whose_logits_cannot_fit_in_memory(tmp_path, monkeypatch):
    """A graph that outputs every position gives the prompts' [B, S, V] float32 logits at once, and needs about three
    times their size at the peak: prompts for which that exceeds the memory available are refused, one line, exit 2,
    before any model is loaded. A graph that outputs the last position only needs B rows."""
    import vqexport.build as build

    model = make_model(tmp_path / "m")  # V = 97
    every, last = tmp_path / "every", tmp_path / "last"
    assert run_cli("build", "--model", model, "--out", every, "--steps", 2).exit_code == 0
    toml = tmp_path / "last.toml"
    toml.write_text('backend = "ort"\nname = "ort-last"\n[decode]\nlast_position_only = true\n[parity]\natol = 1e-4\n')
    assert run_cli("build", "--target", toml, "--model", model, "--out", last, "--steps", 2).exit_code == 0
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([list(range(1, 11)), [5, 6, 7]]))  # padded to 2 x 10 positions: 3 x 7,760 bytes
    loads = []
    monkeypatch.setattr(build, "reference_runner", lambda *a, **k: loads.append(1) or pytest.fail("loaded a model"))
    monkeypatch.setattr(build, "available_memory", lambda: 3 * 7_760 - 1)
    assert_user_error(run_cli("verify", "--artifact", every, "--steps", 2, "--prompts", prompts),
                      "the prompts given: the target's logits need about", "2 prompts padded to 10 tokens x V = 97 float32",
                      "give fewer or shorter prompts")
    assert not loads
    monkeypatch.undo()
    monkeypatch.setattr(build, "available_memory", lambda: 3 * 7_760 - 1)
    assert run_cli("verify", "--artifact", last, "--steps", 2, "--prompts", prompts).exit_code == 0  # 2 rows: 3 x 776 bytes
    monkeypatch.setattr(build, "available_memory", lambda: 3 * 7_760)
    assert run_cli("verify", "--artifact", every, "--steps", 2, "--prompts", prompts).exit_code == 0

"""Every way a user can hand us a broken checkpoint or target: one line, exit 2, nothing written."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from .conftest import assert_user_error, make_checkpoint, make_config, run_cli


def build_into(tmp_path, model, *extra):
    out = tmp_path / "out"
    result = run_cli("build", "--target", "ort", "--model", model, "--out", out, *extra)
    return result, out


def assert_nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def rewrite_tensors(ckpt, **changes):
    tensors = load_file(str(ckpt / "model.safetensors"))
    for k, v in changes.items():
        name = k.replace("__", ".")
        if v is None:
            del tensors[name]
        else:
            tensors[name] = v
    save_file(tensors, str(ckpt / "model.safetensors"))


def edit_config(ckpt, **changes):
    cfg = json.loads((ckpt / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (ckpt / "config.json").write_text(json.dumps(cfg))


def test_missing_checkpoint_dir(tmp_path):
    result, out = build_into(tmp_path, tmp_path / "nope")
    assert_user_error(result, "does not exist")
    assert_nothing_written(tmp_path, out)


def test_checkpoint_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    result, out = build_into(tmp_path, tmp_path / "f")
    assert_user_error(result, "not a directory")


def test_unreadable_config(tiny_ckpt, tmp_path):
    (tiny_ckpt / "config.json").write_text("{not json")
    result, out = build_into(tmp_path, tiny_ckpt)
    assert_user_error(result, "config.json", "not valid JSON")
    assert_nothing_written(tmp_path, out)


def test_missing_config(tiny_ckpt, tmp_path):
    (tiny_ckpt / "config.json").unlink()
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "config.json not found")


@pytest.mark.parametrize("key", ["vocab_size", "d_model", "n_layers", "head"])
def test_config_missing_key(tiny_ckpt, tmp_path, key):
    edit_config(tiny_ckpt, **{key: None})
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], f"missing key '{key}'")


@pytest.mark.parametrize("key,value,fragment", [
    ("d_model", "32", "d_model must be an integer"),
    ("n_layers", 2.0, "n_layers must be an integer"),
    ("n_heads", True, "n_heads must be an integer"),
    ("vocab_size", 0, "vocab_size must be >= 1"),
    ("rope_theta", "big", "rope_theta must be a positive number"),
    ("head", {"type": "vq", "codebook_size": "11", "bias": True}, "codebook_size must be an integer"),
    ("head", {"type": "vq", "codebook_size": 0, "bias": True}, "codebook_size must be in [1, vocab_size=97]"),
    ("head", {"type": "mystery", "codebook_size": 3}, "head.type must be one of"),
    ("head", {"type": "vq", "codebook_size": 11, "bias": "yes"}, "head.bias must be true or false"),
    ("n_heads", 3, "not divisible by n_heads"),
])
def test_config_wrong_types_and_values(tiny_ckpt, tmp_path, key, value, fragment):
    edit_config(tiny_ckpt, **{key: value})
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], fragment)


def test_missing_weights(tiny_ckpt, tmp_path):
    (tiny_ckpt / "model.safetensors").unlink()
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "weights file not found")


def test_truncated_safetensors(tiny_ckpt, tmp_path):
    f = tiny_ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    result, out = build_into(tmp_path, tiny_ckpt)
    assert_user_error(result, "truncated")
    assert_nothing_written(tmp_path, out)


def test_corrupt_safetensors_header(tiny_ckpt, tmp_path):
    f = tiny_ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    data[8 : 8 + n] = b"\xff" * n
    f.write_bytes(bytes(data))
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "corrupt safetensors header")


def test_garbage_file(tiny_ckpt, tmp_path):
    (tiny_ckpt / "model.safetensors").write_bytes(b"abc")
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "truncated safetensors")


def test_tensor_shape_mismatch(tiny_ckpt, tmp_path):
    rewrite_tensors(tiny_ckpt, head__codebook=np.zeros((12, 32), np.float32))
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "head.codebook has shape [12, 32]", "[11, 32]")


def test_tensor_dtype_mismatch(tiny_ckpt, tmp_path):
    rewrite_tensors(tiny_ckpt, embed__weight=np.zeros((97, 32), np.int32))
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "embed.weight has dtype I32")


def test_missing_and_extra_tensors(tiny_ckpt, tmp_path):
    rewrite_tensors(tiny_ckpt, head__bias=None)
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "missing tensor(s) head.bias")
    rewrite_tensors(tiny_ckpt, head__bias=np.zeros(97, np.float32), extra=np.zeros(3, np.float32))
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "unexpected tensor(s) extra")


def test_map_not_integer(tiny_ckpt, tmp_path):
    rewrite_tensors(tiny_ckpt, head__map=np.zeros(97, np.float32))
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "head.map has dtype F32", "integer")


@pytest.mark.parametrize("bad", [-1, 11, 1000])
def test_map_out_of_range(tiny_ckpt, tmp_path, bad):
    m = load_file(str(tiny_ckpt / "model.safetensors"))["head.map"].copy()
    m[5] = bad
    rewrite_tensors(tiny_ckpt, head__map=m)
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], f"head.map[5] = {bad}", "outside [0, codebook_size=11)")


@pytest.mark.parametrize("name,value", [("head.codebook", np.nan), ("head.bias", np.inf), ("head.bias", -np.inf)])
def test_non_finite_head(tiny_ckpt, tmp_path, name, value):
    t = load_file(str(tiny_ckpt / "model.safetensors"))[name].copy()
    t.flat[3] = value
    rewrite_tensors(tiny_ckpt, **{name.replace(".", "__"): t})
    result, out = build_into(tmp_path, tiny_ckpt)
    assert_user_error(result, f"{name} has a non-finite value")
    assert_nothing_written(tmp_path, out)


def test_tokenizer_vocab_larger_than_model(tmp_path, small_tokenizer):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer=small_tokenizer, vocab=97)
    assert_user_error(build_into(tmp_path, ckpt)[0], "tokenizer has 300 tokens", "vocab_size is 97")


def test_tokenizer_unreadable(tiny_ckpt, tmp_path):
    (tiny_ckpt / "tokenizer.json").write_text("{}")
    assert_user_error(build_into(tmp_path, tiny_ckpt)[0], "cannot load tokenizer")


def test_unknown_target(tmp_path):
    result = run_cli("build", "--target", "nosuch", "--out", tmp_path / "o")
    assert_user_error(result, "unknown target 'nosuch'", "ort")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("text,fragment", [
    ("backend = ", "malformed TOML"),
    ('name = "x"\n', "missing key 'backend'"),
    ('backend = "cuda-magic"\n', "backend must be one of"),
    ('backend = "ort"\nopset = 11\n', "opset must be an integer in [18, 23]"),
    ('backend = "ort"\n[parity]\natol = -1\n', "parity.atol must be a number >= 0"),
    ('backend = "ort"\n[parity]\nwhatever = 1\n', "unknown key(s) in [parity]: whatever"),
    ('backend = "ort"\n[ort]\nproviders = []\n', "ort.providers must be a non-empty list"),
    ('backend = "ort"\n[ort]\nproviders = ["NoSuchExecutionProvider"]\n', "lacks execution provider"),
    ('backend = "ort"\nsurprise = true\n', "unknown key(s): surprise"),
])
def test_malformed_target_file(tiny_ckpt, tmp_path, text, fragment):
    f = tmp_path / "mine.toml"
    f.write_text(text)
    result = run_cli("build", "--target", f, "--model", tiny_ckpt, "--out", tmp_path / "o")
    assert_user_error(result, fragment)
    assert_nothing_written(tmp_path, tmp_path / "o")


def test_missing_target_file(tmp_path):
    assert_user_error(run_cli("build", "--target", tmp_path / "none.toml"), "does not exist")


def test_config_codebook_larger_than_vocab_is_rejected_before_weights_are_read(tmp_path):
    ckpt = make_checkpoint(tmp_path / "c", make_config())
    edit_config(ckpt, head={"type": "vq", "codebook_size": 98, "bias": True})
    assert_user_error(build_into(tmp_path, ckpt)[0], "codebook_size must be in [1, vocab_size=97]")


def test_real_process_exit_code_and_single_line(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "vqexport", "build", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert proc.stdout == ""

"""Hugging Face Llama / Qwen2 directories: read without transformers, same logits as transformers, convert."""

import json
import shutil
from pathlib import Path

import pytest

from vqexport import api
from vqexport.hf import load_hf
from vqexport.model import from_tensors

from .conftest import assert_user_error, run_cli

transformers = pytest.importorskip("transformers", reason="transformers is not installed (tests build tiny HF models with it)")
torch = pytest.importorskip("torch")

LLAMA_SIZES = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0)
FAMILIES = {
    "gpt2-tied": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=256)),
    "gpt2-untied": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=256,
                                                          tie_word_embeddings=False)),
    "llama-untied": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_SIZES, tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_SIZES, tie_word_embeddings=True)),
}


def make_hf(path, family, shard=False, tokenizer=None):
    cfg_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_cls)(**extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    model.save_pretrained(str(path), safe_serialization=True, **({"max_shard_size": "40KB"} if shard else {}))
    if tokenizer is not None:
        shutil.copy(tokenizer, path / "tokenizer.json")
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shard", [False, True])
def test_logits_match_transformers(tmp_path, family, shard):
    hf_model = make_hf(tmp_path / "hf", family, shard=shard)
    if shard:
        assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ckpt = load_hf(tmp_path / "hf")
    ours = from_tensors(ckpt.config, ckpt.tensors)
    ids = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        ref = hf_model(ids).logits
        got = ours(ids, torch.ones_like(ids), *ours.empty_cache(2))[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2-tied", "llama-untied", "qwen2-tied"])
def test_convert_and_build_a_hf_model(tmp_path, family, small_tokenizer):
    make_hf(tmp_path / "hf", family, tokenizer=small_tokenizer)
    text = tmp_path / "t.txt"
    text.write_text("".join(p.read_text() for p in sorted(Path(__file__).parent.glob("test_*.py"))))
    out = tmp_path / "vq"
    r = run_cli("convert", "--from", tmp_path / "hf", "-k", 20, "--distill-text", text, "--steps", 10, "--out", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["after_distillation"]["top1_agreement"] > 0
    result = api.build("ort", model=out, out=tmp_path / "art", steps=4)
    assert result.parity.passed
    assert (tmp_path / "art" / "genai_config.json").exists() and (tmp_path / "art" / "tokenizer.json").exists()


def test_hf_bad_input(tmp_path, small_tokenizer):
    make_hf(tmp_path / "hf", "llama-untied", shard=True)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "hf" / shard).unlink()
    assert_user_error(run_cli("convert", "--from", tmp_path / "hf", "-k", 4, "--out", tmp_path / "o"), f"shard(s) {shard}")
    (tmp_path / "hf" / "model.safetensors.index.json").unlink()
    assert_user_error(run_cli("convert", "--from", tmp_path / "hf", "-k", 4, "--out", tmp_path / "o"), "no model.safetensors")

    make_hf(tmp_path / "gpt", "llama-untied")
    cfg = json.loads((tmp_path / "gpt" / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (tmp_path / "gpt" / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("convert", "--from", tmp_path / "gpt", "-k", 4, "--out", tmp_path / "o"),
                      "unsupported architecture 'mamba'", "gpt2, llama, qwen2")

    make_hf(tmp_path / "tok", "llama-untied")
    big = tmp_path / "big.json"
    shutil.copy(small_tokenizer, big)
    cfg = json.loads((tmp_path / "tok" / "config.json").read_text())
    cfg["vocab_size"] = 300
    shutil.copy(big, tmp_path / "tok" / "tokenizer.json")
    # shrink the model's vocabulary below the tokenizer's
    from safetensors.numpy import load_file, save_file

    t = load_file(str(tmp_path / "tok" / "model.safetensors"))
    t = {k: (v[:200] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in t.items()}
    save_file(t, str(tmp_path / "tok" / "model.safetensors"), metadata={"format": "pt"})
    cfg["vocab_size"] = 200
    (tmp_path / "tok" / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run_cli("convert", "--from", tmp_path / "tok", "-k", 4, "--out", tmp_path / "o"), "tokenizer has 300 tokens")
    assert not (tmp_path / "o").exists()

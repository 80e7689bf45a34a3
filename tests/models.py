"""Random-weight Hugging Face models made locally with transformers' config classes (no downloads), and heads."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def hf_config(arch: str = "llama", vocab: int = 97, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
              ffn: int = 48, max_position: int = 256, tie: bool = True, **extra):
    """A tiny transformers config of ``arch`` (llama, qwen2, qwen3, qwen3_moe, gemma2, gemma3, phi3, mistral, granite,
    granitemoehybrid, cohere, gpt_oss, gpt2)."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_position,
                  tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_position,
                             n_inner=ffn, bos_token_id=None, eos_token_id=None, tie_word_embeddings=tie, **extra)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config, "gemma2": tf.Gemma2Config,
           "gemma3": tf.Gemma3TextConfig,
           "phi3": tf.Phi3Config, "mistral": tf.MistralConfig, "granite": tf.GraniteConfig, "cohere": tf.CohereConfig,
           "qwen3_moe": tf.Qwen3MoeConfig, "granitemoehybrid": tf.GraniteMoeHybridConfig, "gpt_oss": tf.GptOssConfig}[arch]
    if arch in ("qwen3", "qwen3_moe", "gemma2", "gemma3", "gpt_oss"):
        common["head_dim"] = hidden // heads
    common.update(extra)
    return cls(**common)


def save_hf(path: Path, config, seed: int = 0, tokenizer: Path | None = None) -> Path:
    """A random-weight model of ``config`` written with save_pretrained (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms away from exactly 1 so that their weights matter
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    if tokenizer is not None:
        (Path(path) / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return Path(path)


def random_head(vocab: int, hidden: int, k: int, bias: bool = True, rank: int = 0, seed: int = 0):
    """A head whose map uses every code (when V >= K), with weights large enough to move the logits."""
    from vqexport.head.spec import make_head

    rng = np.random.default_rng(seed)
    m = np.concatenate([np.arange(min(k, vocab)), rng.integers(0, k, size=max(vocab - k, 0))])
    t = {"codebook": rng.standard_normal((k, hidden)).astype(np.float32) * hidden**-0.5 * 4,
         "map": rng.permutation(m).astype(np.int32)}
    if bias:
        t["bias"] = rng.standard_normal(vocab).astype(np.float32)
    if rank:
        t["lowrank_p"] = rng.standard_normal((rank, hidden)).astype(np.float32) * hidden**-0.5
        t["lowrank_u"] = rng.standard_normal((vocab, rank)).astype(np.float32) * 1.5
    return make_head(t)


def identity_head(model_dir: Path):
    """K = V, every token its own code, no bias, codebook = the dense output layer: the dense model exactly."""
    import torch

    from vqexport.head.spec import make_head
    from vqexport.source import load_source
    from vqexport.trunk.hf import load_causal_lm, output_weight

    src = load_source(model_dir, need_head=False)
    with torch.no_grad():
        w = output_weight(load_causal_lm(src)).float().numpy()
    return make_head({"codebook": w, "map": np.arange(w.shape[0], dtype=np.int32)})


def make_model(path: Path, arch: str = "llama", k: int = 11, bias: bool = True, rank: int = 0, seed: int = 0,
               tokenizer: Path | None = None, head=None, **config) -> Path:
    """An HF model directory with a random VQ-Logits head beside it (``head=False``: a dense model only)."""
    from vqexport.head.spec import write_head

    cfg = hf_config(arch, **config)
    save_hf(path, cfg, seed=seed, tokenizer=tokenizer)
    if head is None:
        head = random_head(cfg.vocab_size, cfg.hidden_size if arch != "gpt2" else cfg.n_embd, k, bias=bias, rank=rank, seed=seed)
    if head is not False:
        write_head(path, head)
    return Path(path)


def transformers_logits(path, ids, mask):
    """transformers' own logits of the model directory ``path`` on (ids, mask), positions as generate() gives them."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    positions = (torch.from_numpy(mask).cumsum(-1) - 1).clamp(min=0)  # what generate() passes for left padding
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), position_ids=positions).logits.numpy()


def artifact_logits(artifact, ids, mask, extra_token):
    """An ORT artifact's logits: prefill on (ids, mask), then one decode step with the KV cache on ``extra_token``."""
    from vqexport.backends.ort.runner import OrtRunner

    with OrtRunner.from_artifact(artifact) as r:
        out = r.step(ids, mask, r.empty_past(ids.shape[0]))
        mask2 = np.concatenate([mask, np.ones((ids.shape[0], 1), np.int64)], 1)
        step = r.step(extra_token, mask2, out.present)
    return out.logits, step.logits[:, -1]


def genai_greedy(artifact, prompt: list[int], n: int, stop_at_eos: bool = False) -> list[int]:
    """``n`` greedy tokens onnxruntime-genai generates from the artifact directory as it is (past any eos, or up to
    and including the model's eos with ``stop_at_eos``)."""
    import onnxruntime_genai as og  # a test dependency ('.[test]')

    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    length = len(prompt) + n
    params.set_search_options(max_length=length, **({} if stop_at_eos else {"min_length": length}), do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    return got


def runner_greedy(runner, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens of a Runner (already entered): prefill, then one decode step per token with its cache."""
    x = np.asarray([prompt])
    mask = np.ones_like(x)
    out, tokens = runner.step(x, mask, runner.empty_past(1)), []
    for _ in range(n):
        tokens.append(int(out.logits[0, -1].argmax()))
        mask = np.concatenate([mask, [[1]]], 1)
        out = runner.step(np.asarray([[tokens[-1]]]), mask, out.present)
    return tokens

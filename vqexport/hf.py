"""Read a local Hugging Face causal-LM directory (GPT-2, Llama or Qwen2 family) as a dense-head vqexport checkpoint.

Nothing is downloaded: config.json + model.safetensors (or model.safetensors.index.json and its shards)
+ tokenizer.json are read from the directory. numpy + safetensors only; transformers is not needed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, check_tokenizer, read_safetensors
from .config import HeadConfig, ModelConfig
from .errors import VQExportError

SUPPORTED = ("gpt2", "llama", "qwen2")
INDEX_FILE = "model.safetensors.index.json"


def is_hf_dir(path: Path) -> bool:
    try:
        return "model_type" in json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _config(raw: dict, where: str) -> ModelConfig:
    mt = raw.get("model_type")
    if mt not in SUPPORTED:
        raise VQExportError(f"{where}: unsupported architecture {mt!r}; supported: {', '.join(SUPPORTED)}")
    if mt == "gpt2":
        return _gpt2_config(raw, where)
    if raw.get("rope_scaling"):
        raise VQExportError(f"{where}: rope_scaling {raw['rope_scaling'].get('rope_type', raw['rope_scaling'])!r} is not supported yet")
    if mt == "qwen2" and raw.get("use_sliding_window"):
        raise VQExportError(f"{where}: sliding-window attention is not supported")
    try:
        d, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or d // heads)
        if head_dim * heads != d:
            raise VQExportError(f"{where}: head_dim {head_dim} x {heads} heads != hidden_size {d} (not supported)")
        eos = raw.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) else eos
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]), d_model=d, n_layers=int(raw["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or heads), d_ff=int(raw["intermediate_size"]),
            max_position=int(raw.get("max_position_embeddings", 2048)), rope_theta=float(raw.get("rope_theta", 10000.0)),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)), qkv_bias=(mt == "qwen2") or bool(raw.get("attention_bias", False)),
            bos_token_id=raw.get("bos_token_id"), eos_token_id=eos, pad_token_id=raw.get("pad_token_id"),
            head=HeadConfig(type="dense", bias=False),
        )
    except KeyError as e:
        raise VQExportError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise VQExportError(f"{where}: malformed value ({e})") from None


def _gpt2_config(raw: dict, where: str) -> ModelConfig:
    act = raw.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise VQExportError(f"{where}: GPT-2 activation {act!r} is not supported (gelu_new)")
    try:
        d = int(raw["n_embd"])
        return ModelConfig(
            vocab_size=int(raw["vocab_size"]), d_model=d, n_layers=int(raw["n_layer"]), n_heads=int(raw["n_head"]),
            n_kv_heads=int(raw["n_head"]), d_ff=int(raw.get("n_inner") or 4 * d), max_position=int(raw["n_positions"]),
            norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)), qkv_bias=True, linear_bias=True, norm="layernorm",
            position="learned", mlp="gelu_tanh", bos_token_id=raw.get("bos_token_id"), eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"), head=HeadConfig(type="dense", bias=False),
        )
    except KeyError as e:
        raise VQExportError(f"{where}: missing key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise VQExportError(f"{where}: malformed value ({e})") from None


def _gpt2_tensors(hf: dict[str, np.ndarray], d: int) -> dict[str, np.ndarray]:
    """GPT-2 names -> ours. Its Conv1D weights are [in, out]: transpose; c_attn holds q, k, v side by side."""
    out = {}
    for name, arr in hf.items():
        name = name.removeprefix("transformer.")
        if name == "wte.weight":
            out["embed.weight"] = arr
        elif name == "wpe.weight":
            out["pos_embed.weight"] = arr
        elif name.startswith("ln_f."):
            out["norm." + name.split(".")[-1]] = arr
        elif name == "lm_head.weight":
            out["head.weight"] = arr
        elif name.startswith("h."):
            _, i, rest = name.split(".", 2)
            p = f"layers.{i}."
            kind = rest.rsplit(".", 1)[-1]  # weight | bias
            if rest.startswith("ln_1."):
                out[p + "attn_norm." + kind] = arr
            elif rest.startswith("ln_2."):
                out[p + "mlp_norm." + kind] = arr
            elif rest.startswith("attn.c_attn."):
                parts = np.split(arr, 3, axis=-1)
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                    out[p + f"attn.{proj}.{kind}"] = part.T if kind == "weight" else part
            elif rest.startswith("attn.c_proj."):
                out[p + "attn.o_proj." + kind] = arr.T if kind == "weight" else arr
            elif rest.startswith("mlp.c_fc."):
                out[p + "mlp.fc." + kind] = arr.T if kind == "weight" else arr
            elif rest.startswith("mlp.c_proj."):
                out[p + "mlp.proj." + kind] = arr.T if kind == "weight" else arr
    return out


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    single, index = path / "model.safetensors", path / INDEX_FILE
    if single.exists():
        files = [single]
    elif index.exists():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, OSError):
            raise VQExportError(f"{index}: malformed shard index (needs a weight_map)") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise VQExportError(f"{path}: shard(s) {', '.join(missing)} listed in {INDEX_FILE} are missing")
    else:
        raise VQExportError(f"{path}: no model.safetensors and no {INDEX_FILE}")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return tensors


_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight", "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight", "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias", "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight", "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def _token_ids_in_range(cfg: ModelConfig) -> ModelConfig:
    """Special-token ids outside the vocabulary (left over from a base config) cannot be used: drop them."""
    import dataclasses

    fix = {k: None for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if getattr(cfg, k) is not None and not 0 <= getattr(cfg, k) < cfg.vocab_size}
    return dataclasses.replace(cfg, **fix) if fix else cfg


def load_hf(path) -> Checkpoint:
    """A Llama/Qwen2 Hugging Face directory as an in-memory dense-head Checkpoint (vqexport tensor names)."""
    path = Path(path)
    where = str(path / "config.json")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise VQExportError(f"{where}: cannot read ({e})") from None
    cfg = _token_ids_in_range(_config(raw, where))
    hf = _read_tensors(path)
    out: dict[str, np.ndarray] = _gpt2_tensors(hf, cfg.d_model) if raw.get("model_type") == "gpt2" else {}
    for name, arr in ({} if out else hf).items():
        if name == "model.embed_tokens.weight":
            out["embed.weight"] = arr
        elif name == "model.norm.weight":
            out["norm.weight"] = arr
        elif name == "lm_head.weight":
            out["head.weight"] = arr
        elif name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if rest in _LAYER:
                out[f"layers.{i}.{_LAYER[rest]}"] = arr
    if "head.weight" not in out:
        if not raw.get("tie_word_embeddings", raw.get("model_type") == "gpt2") or "embed.weight" not in out:
            raise VQExportError(f"{path}: no lm_head.weight and the embeddings are not tied")
        out["head.weight"] = out["embed.weight"]
    from .checkpoint import expected_tensors

    expected = expected_tensors(cfg)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise VQExportError(f"{path}: missing weights for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    for name, (shape, _) in expected.items():
        if tuple(out[name].shape) != shape:
            raise VQExportError(f"{path}: {name} has shape {list(out[name].shape)}, config implies {list(shape)}")
        out[name] = np.ascontiguousarray(out[name], dtype=np.float32)
    tok = path / "tokenizer.json"
    if tok.exists():
        check_tokenizer(tok, cfg.vocab_size)
    return Checkpoint(path=path, config=cfg, tensors={k: out[k] for k in expected}, tokenizer_path=tok if tok.exists() else None)

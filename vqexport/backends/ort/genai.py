"""genai_config.json and tokenizer_config.json so onnxruntime-genai loads the artifact directory as is."""

from __future__ import annotations

from ...config import ModelConfig


def genai_config(cfg: ModelConfig, model_file: str, providers: list[str], context_length: int | None = None) -> dict:
    ctx = min(cfg.max_position, context_length or cfg.max_position)
    eos = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    provider_options = [{_GENAI_PROVIDER[p]: {}} for p in providers if p in _GENAI_PROVIDER]
    return {
        "model": {
            "bos_token_id": cfg.bos_token_id if cfg.bos_token_id is not None else eos,
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": model_file,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.d_model,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.n_heads,
                "num_hidden_layers": cfg.n_layers,
                "num_key_value_heads": cfg.n_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else eos,
            # A llama-style decoder to onnxruntime-genai: names above, no position_ids input
            # (positions come from attention_mask inside the graph).
            "type": "llama",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": ctx,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # The graph concatenates past and new keys (no in-place cache), so buffers are not shared.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


_GENAI_PROVIDER = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}


def tokenizer_config(cfg: ModelConfig, vocab: dict[int, str]) -> dict:
    """Minimal Hugging Face tokenizer_config.json for a byte-level BPE tokenizer.json."""

    def tok(i):
        return vocab.get(i) if i is not None else None

    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": tok(cfg.bos_token_id),
        "clean_up_tokenization_spaces": False,
        "eos_token": tok(cfg.eos_token_id),
        "model_max_length": cfg.max_position,
        "pad_token": tok(cfg.pad_token_id),
        "tokenizer_class": "GPT2Tokenizer",
    }

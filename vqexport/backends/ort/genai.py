"""genai_config.json and tokenizer_config.json so onnxruntime-genai loads the artifact directory as is."""

from __future__ import annotations

from ...source import Geometry


def genai_config(geo: Geometry, model_file: str, providers: list[str], context_length: int | None = None,
                 past_present_share_buffer: bool = False, model_type: str = "llama") -> dict:
    ctx = min(geo.max_position, context_length or geo.max_position)
    eos = list(geo.eos_token_ids) or [0]
    provider_options = [{_GENAI_PROVIDER[p]: {}} for p in providers if p in _GENAI_PROVIDER]
    return {
        "model": {
            "bos_token_id": geo.bos_token_id if geo.bos_token_id is not None else eos[0],
            "context_length": ctx,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": model_file,
                "head_size": geo.head_dim,
                "hidden_size": geo.hidden_size,
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
                "num_attention_heads": geo.n_heads,
                "num_hidden_layers": geo.kv_layers,  # the cache's pairs: layers sharing another's keys have none
                "num_key_value_heads": geo.n_kv_heads,
            },
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": geo.pad_token_id if geo.pad_token_id is not None else eos[0],
            # A llama-style decoder to onnxruntime-genai: the names above, no position_ids input
            # (positions come from attention_mask inside the graph).
            "type": model_type,
            "vocab_size": geo.vocab_size,
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
            # The portable graph concatenates past and new keys (no in-place cache): buffers are not shared.
            # A GroupQueryAttention graph writes into a preallocated cache: they are.
            "past_present_share_buffer": past_present_share_buffer,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def genai_graph_level(level: str) -> str:
    """A profile's session optimization level as onnxruntime-genai's config names it (it has no layout level;
    ``all`` includes it)."""
    from .session import _LEVELS

    return "ORT_ENABLE_ALL" if level == "layout" else _LEVELS[level]


_GENAI_PROVIDER = {"CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}


def tokenizer_config(geo: Geometry, vocab: dict[int, str]) -> dict:
    """Minimal Hugging Face tokenizer_config.json for a byte-level BPE tokenizer.json that came without one."""

    def tok(i):
        return vocab.get(i) if i is not None else None

    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": tok(geo.bos_token_id),
        "clean_up_tokenization_spaces": False,
        "eos_token": tok(geo.eos_token_id),
        "model_max_length": geo.max_position,
        "pad_token": tok(geo.pad_token_id),
        "tokenizer_class": "GPT2Tokenizer",
    }

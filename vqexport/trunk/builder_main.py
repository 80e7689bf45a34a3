"""onnxruntime-genai's model builder, run with the model's transformers config in the form the builder reads.

    python -m vqexport.trunk.builder_main [the builder's arguments]

The builder (0.18) reads rope settings in transformers 4's form, and transformers 5 writes them differently:

* Gemma 3 keeps one ``rope_parameters`` per attention type (``{"full_attention": {...}, "sliding_attention":
  {...}}``); the builder reads a flat ``rope_parameters["rope_type"]`` and the local layers' theta from
  ``rope_local_base_freq`` (KeyError: 'rope_type').
* A long-rope Phi-3 (Phi-3-mini-128k, Phi-3.5-mini) has ``rope_parameters["rope_type"] = "longrope"``; the builder
  reads ``rope_parameters["type"]`` (KeyError: 'type').

The builder also reads the norms' epsilon from ``rms_norm_eps`` only and takes 1e-6 without it, where Phi-2 and
Nemotron give 1e-5 under ``layer_norm_eps`` / ``norm_eps``.

``builder_config`` gives the builder the same settings in the form it reads; nothing else changes, and the joined
graph still goes through parity against transformers' own model.
"""

from __future__ import annotations

import runpy

BUILDER = "onnxruntime_genai.models.builder"
PER_LAYER_TYPE = {"full_attention", "sliding_attention"}


def _decoder(config):
    """The decoder's settings: a multimodal config's text part (Gemma 3 4B and up keep theirs in ``text_config``,
    which the builder copies up), else the config itself; anything not a config (``from_pretrained(...,
    return_unused_kwargs=True)`` returns a tuple) is None."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else None


NORM_EPS_KEYS = ("layer_norm_eps", "norm_eps", "layer_norm_epsilon", "norm_epsilon")  # rms_norm_eps by other names


def builder_config(config):
    """``config`` (a transformers config) with its rope settings and its norms' epsilon also in the keys
    onnxruntime-genai's builder reads."""
    text = _decoder(config)
    if text is not None and not hasattr(text, "rms_norm_eps"):  # a None there is the config's own choice: kept
        eps = next((getattr(text, k) for k in NORM_EPS_KEYS if isinstance(getattr(text, k, None), float)), None)
        if eps is not None:  # the builder reads rms_norm_eps only, else takes 1e-6 (Phi-2, Nemotron: 1e-5)
            text.rms_norm_eps = eps
    rope = getattr(text, "rope_parameters", None)
    if not isinstance(rope, dict):
        return config
    if text.model_type == "gemma3_text" and set(rope) == PER_LAYER_TYPE:
        full, local = dict(rope["full_attention"]), rope["sliding_attention"]
        text.rope_parameters = full
        text.rope_theta = full["rope_theta"]
        text.rope_local_base_freq = local["rope_theta"]
    elif rope.get("rope_type") == "longrope" and "type" not in rope:
        rope["type"] = rope["rope_type"]
    return config


def gemma3_rope_unsupported(config) -> str | None:
    """Why the builder's Gemma 3 graph would rotate differently from transformers' model, or None: it builds the
    local layers' cos/sin caches with the global layers' rope scaling, so only unscaled rope on both is the same."""
    text = _decoder(config)
    rope = getattr(text, "rope_parameters", None)
    if getattr(text, "model_type", "") != "gemma3_text" or not isinstance(rope, dict):
        return None
    scaled = sorted(kind for kind, params in rope.items()
                    if kind in PER_LAYER_TYPE and isinstance(params, dict) and params.get("rope_type", "default") != "default")
    if scaled:
        return f"its {' and '.join(scaled)} layers use {rope[scaled[0]]['rope_type']} rope scaling"
    return None


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        return builder_config(load(cls, *args, **kwargs))

    AutoConfig.from_pretrained = classmethod(from_pretrained)
    runpy.run_module(BUILDER, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

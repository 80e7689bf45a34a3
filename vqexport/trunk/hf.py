"""transformers' own model as the trunk: load it from the model directory and give its decoder a flat signature.

    Trunk.forward(input_ids, attention_mask, *past) -> (hidden_states, *present)

``past`` / ``present`` are ``(k0, v0, k1, v1, ...)``, each [batch, n_kv_heads, length, head_dim] — the layout of the
graph's ``past_key_values.{i}.key|value`` / ``present.{i}.key|value``, one pair per layer that keeps keys and values
of its own, each of its own shape (``Geometry.kv_shapes``). Positions come from the mask
(``cumsum - 1``, so left-padded rows get the positions an unpadded row would), as transformers' ``generate`` does.
``hidden_states`` is the decoder's final (normed) hidden state: what the output layer reads, times the constant some
models multiply their logits by (Granite divides them by ``logits_scaling``, Cohere multiplies them by
``logit_scale``), so that the output layer applied to it gives the model's own logits. The same module is the
reference parity compares against and what torch.onnx exports: nothing about the architecture is ours.
"""

from __future__ import annotations

import contextlib
import re

import torch

from ..errors import VQExportError
from ..graph_io import cache_dims
from ..head.module import soft_cap
from ..quiet import quiet
from ..safetensors_io import read_header
from ..source import Geometry, Source, causal_lm_class, hf_config


def load_causal_lm(source: Source, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' causal LM of ``source`` in ``dtype``, eval mode; missing or unexpected weights are an error. A
    multimodal checkpoint gives its language model alone (``language_model``)."""
    cfg = hf_config(source.path)
    composite = causal_lm_class(cfg, source.path)
    alone = language_model(cfg, source)
    if alone is not None:
        cls, kwargs, towers = alone
        model, info = _from_pretrained(source, cls, dtype, **kwargs)
        if not _missing(model, info) and not set(info.get("unexpected_keys") or ()) - towers:
            return _checked(source, model, info, towers)
        del model  # weights named otherwise than found: the whole model, as the checkpoint describes it
    model, info = _from_pretrained(source, composite, dtype)
    return _checked(source, model, info, frozenset())


# multimodal model types checked to be a language model plus towers that replace only media tokens' embeddings
LANGUAGE_MODEL_PLUS_TOWERS = frozenset({"gemma3", "gemma3n", "gemma4"})


def language_model(cfg, source: Source):
    """A multimodal checkpoint's language model alone: (its causal-LM class, the ``from_pretrained`` arguments that
    load it, the names of the checkpoint's other weights), or None for a checkpoint that is one causal LM already.

    Model types whose multimodal model is a language model plus towers that only replace the embeddings of media
    tokens (``LANGUAGE_MODEL_PLUS_TOWERS``; Gemma 3 4B and up, Gemma 3n, Gemma 4): the text config's causal-LM class.
    Its weights are those under the prefix of the checkpoint's one ``embed_tokens.weight``, wherever the checkpoint
    put it (``model.language_model.``, ``language_model.model.``); the output layer's is ``lm_head.weight`` beside
    the language model, or none (tied). The vision and audio towers are never built: less memory, and none of their
    dependencies (Gemma 3n's vision tower needs timm)."""
    from transformers import AutoModelForCausalLM

    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    if cfg.model_type not in LANGUAGE_MODEL_PLUS_TOWERS or text is cfg or type(text) not in AutoModelForCausalLM._model_mapping:
        return None
    cls = AutoModelForCausalLM._model_mapping[type(text)]
    names = [n for f in source.weight_files for n in read_header(f)]
    tables = {n[: -len("embed_tokens.weight")] for n in names if n == "embed_tokens.weight" or n.endswith(".embed_tokens.weight")}
    heads = {n[: -len("lm_head.weight")] for n in names if n == "lm_head.weight" or n.endswith(".lm_head.weight")}
    if len(tables) != 1 or len(heads) > 1:
        return None
    prefix, base = tables.pop(), f"{cls.base_model_prefix}."
    head = heads.pop() if heads else ""
    if not prefix or not prefix.startswith(head):  # an output layer that is not the language model's: a tower's
        return None
    mapping = {} if prefix == base else {"^" + re.escape(prefix): base}
    if head:
        mapping["^" + re.escape(head) + r"lm_head\."] = "lm_head."
    towers = frozenset(n for n in names if not n.startswith(prefix) and n != f"{head}lm_head.weight")
    return cls, {"config": text, "key_mapping": mapping}, towers


def _from_pretrained(source: Source, cls, dtype: torch.dtype, **kwargs):
    import transformers

    try:
        with quiet():
            return cls.from_pretrained(str(source.path), dtype=dtype, local_files_only=True, output_loading_info=True,
                                       ignore_mismatched_sizes=True, **kwargs)  # mismatches are reported by name
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VQExportError(f"{source.path}: transformers {transformers.__version__} cannot load this {source.model_type} "
                            f"model ({msg[:200]})") from None


def _missing(model, info) -> list[str]:
    return sorted(k for k in info.get("missing_keys", ()) if not _tied(model, k))


def _checked(source: Source, model, info, others: frozenset) -> torch.nn.Module:
    """``model`` in eval mode, if its weights were all there, of the shapes config.json implies, and all used
    (``others``: a multimodal checkpoint's weights outside its language model, left out on purpose)."""
    path = source.path
    missing = _missing(model, info)
    if missing:
        raise VQExportError(f"{path}: the weights lack {len(missing)} tensor(s) the {source.model_type} model needs "
                            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); a shard or the index is incomplete")
    mismatched = sorted(k[0] if isinstance(k, (tuple, list)) else k for k in info.get("mismatched_keys") or ())
    if mismatched:
        raise VQExportError(f"{path}: tensor {mismatched[0]} does not have the shape config.json implies"
                            f"{f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''}")
    unexpected = sorted(set(info.get("unexpected_keys") or ()) - others)
    if unexpected:
        raise VQExportError(f"{path}: the weights hold {len(unexpected)} tensor(s) the {source.model_type} model of "
                            f"config.json has no place for ({', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}); "
                            "config.json and the weights disagree")
    return model.eval()


def _tied(model, key: str) -> bool:
    """A missing output layer is no loss when transformers ties it to the embeddings."""
    out = model.get_output_embeddings()
    if out is None or not getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", False):
        return False
    return key.startswith(next((n for n, m in model.named_modules() if m is out), "\0"))


def output_weight(model) -> torch.Tensor:
    """The dense output layer's weight [V, d] (the embedding table for tied models)."""
    out = model.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise VQExportError(f"{type(model).__name__} has no output layer to convert")
    return out.weight


def output_bias(model, scale: float = 1.0) -> torch.Tensor | None:
    """The output layer's bias times the model's logit ``scale`` (the trunk's ``hidden_scale``): its logits' bias."""
    bias = getattr(model.get_output_embeddings(), "bias", None)
    return bias if bias is None or scale == 1.0 else bias * scale


# what transformers' model code raises where it cannot run an input (or a dtype): reported in one line
MODEL_ERRORS = (RuntimeError, ValueError, TypeError, AttributeError, IndexError, KeyError, NotImplementedError, AssertionError)


@contextlib.contextmanager
def running(source: Source, what: str):
    """transformers' model run quietly; where it fails, one line naming the model (not its traceback)."""
    try:
        with quiet():
            yield
    except MODEL_ERRORS as e:
        msg = " ".join(str(e).split())[:200]
        raise VQExportError(f"{source.path}: transformers' {source.model_type} model fails {what} "
                            f"({type(e).__name__}: {msg}); it cannot be exported") from e


LOGIT_SCALE_KEYS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier")  # in config.json


@torch.no_grad()
def logit_scale(causal_lm: torch.nn.Module, source: Source, logits: torch.Tensor, out) -> float:
    """The constant ``s`` with ``logits = s * output_layer(final hidden state)`` for this model: 1, or the value of a
    config key above or its inverse (the key's name does not say which: Granite divides by ``logits_scaling``,
    HyperCLOVA X multiplies by it), chosen on a few tokens: the model's own ``logits`` there and its decoder's output
    ``out``; a model with ``final_logit_softcapping`` caps the result (the head's graph caps its logits the same way).
    Logits that are no such multiple of the output layer's (another transform after it) are refused: no head on the
    hidden state could give them."""
    config = causal_lm.config.get_text_config(decoder=True)
    candidates = [1.0]
    for key in LOGIT_SCALE_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
            candidates += [float(value), 1.0 / float(value)]
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:  # Llama 4's get_decoder() is the causal LM itself
        raise VQExportError(f"{source.path}: the {source.model_type} model's decoder (transformers' get_decoder()) returns "
                            f"{type(out).__name__}, not a final hidden state; it cannot be exported")
    layer = causal_lm.get_output_embeddings()(hidden).float()
    tol = 1e-4 * max(1.0, logits.abs().max().item())
    cap = source.geometry.logit_softcap  # Gemma 2 and 4: cap * tanh(logits / cap) after the scale
    errors = [(logits - soft_cap(c * layer, cap)).abs().max().item() for c in candidates]
    best = min(range(len(candidates)), key=errors.__getitem__)
    if errors[best] > tol:
        raise VQExportError(f"{source.path}: the {source.model_type} model's logits are not its output layer applied to its "
                            f"final hidden state, nor that times a value of {', '.join(LOGIT_SCALE_KEYS)} or its inverse "
                            f"{'(then soft-capped by final_logit_softcapping) ' if cap else ''}"
                            f"(max difference {errors[best]:.3g}); a VQ-Logits head on the hidden state cannot reproduce them")
    return candidates[best]


class Trunk(torch.nn.Module):
    """transformers' decoder with a flat KV-cache signature; its parameters keep the checkpoint's names."""

    def __init__(self, causal_lm: torch.nn.Module, kv_shapes, hidden_scale: float = 1.0):
        super().__init__()
        decoder = causal_lm.get_decoder()
        name = next((n for n, m in causal_lm.named_children() if m is decoder), "model")
        self.add_module(name, decoder)
        self.decoder_name = name
        self.kv_shapes = tuple(tuple(s) for s in kv_shapes)  # graph_io.cache_shape of each layer with a cache
        self.hidden_scale = hidden_scale  # the model's logit scale (logit_scale), taken by the hidden state

    @property
    def n_layers(self) -> int:
        """Layers that keep keys and values: the pairs of ``past`` / ``present``."""
        return len(self.kv_shapes)

    @property
    def decoder(self):
        return getattr(self, self.decoder_name)

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        s = input_ids.shape[1]
        positions = (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)[:, -s:]
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True)
        present = []
        for layer in out.cache.layers[: self.n_layers]:
            present += [layer.keys, layer.values]
        hidden = out.last_hidden_state if self.hidden_scale == 1.0 else out.last_hidden_state * self.hidden_scale
        return (hidden, *present)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def empty_past(self, batch: int, length: int = 0) -> tuple[torch.Tensor, ...]:
        return tuple(torch.zeros(batch, heads, length, size, dtype=self.dtype)
                     for heads, *sizes in map(cache_dims, self.kv_shapes) for size in sizes)


@torch.no_grad()
def make_trunk(source: Source, model: torch.nn.Module | None = None) -> Trunk:
    """The trunk of ``source`` (its transformers model loaded here unless given), checked against its geometry: a few
    tokens through the model and its decoder give its logit scale (``logit_scale``) and its cache (``check_cache``)."""
    model = load_causal_lm(source) if model is None else model
    geo = source.geometry
    ids = (torch.arange(1, 9, dtype=torch.int64) * 7919 % geo.vocab_size).view(1, -1)
    with running(source, f"on {ids.shape[1]} tokens"):
        logits = model(input_ids=ids).logits.float()
        out = model.get_decoder()(input_ids=ids, use_cache=True)
    trunk = Trunk(model, geo.kv_shapes, logit_scale(model, source, logits, out)).eval()
    check_cache(out, geo, source)
    return trunk


def check_cache(out, geo: Geometry, source: Source) -> None:
    """The decoder's output ``out`` on a few tokens: the layers that keep keys and values must be the first
    ``geo.kv_layers``, each with the [B, n_kv_heads, T, head_dim] of ``geo.kv_shapes`` the graph declares."""
    layers = getattr(getattr(out, "cache", None), "layers", None)  # none at all: a decoder without a KV cache (GPT-1)
    if layers is None or len(layers) < geo.kv_layers:
        raise VQExportError(f"{source.path}: the {geo.model_type} decoder does not return a per-layer KV cache; it cannot be exported")
    layers = layers[: geo.n_layers]
    other = sorted({type(layer).__name__ for layer in layers if hasattr(layer, "conv_states") or hasattr(layer, "recurrent_states")})
    if other:  # convolution or recurrent state (LFM2, Mamba hybrids): not the keys and values the graph carries
        raise VQExportError(f"{source.path}: the {geo.model_type} decoder keeps a state other than keys and values in some "
                            f"layers ({', '.join(other)}); vqexport carries key/value caches only, so it cannot be exported")
    own = [i for i, layer in enumerate(layers) if isinstance(getattr(layer, "keys", None), torch.Tensor)]
    if own != list(range(geo.kv_layers)):  # layers without attention (MLP-only), or sharing the config does not declare
        without = sorted(set(range(geo.kv_layers)) - set(own)) or sorted(set(own) - set(range(geo.kv_layers)))
        raise VQExportError(f"{source.path}: the {geo.model_type} decoder keeps keys and values in {len(own)} of its layers, "
                            f"where its config implies the first {geo.kv_layers} (layer {without[0]} differs: no attention, "
                            "or a cache shared in a way the config does not declare); it cannot be exported")
    for i, (layer, want) in enumerate(zip(layers, geo.kv_shapes)):
        heads, key, value = cache_dims(want)
        got = (tuple(layer.keys.shape[1::2]), tuple(layer.values.shape[1::2]))
        if got != ((heads, key), (heads, value)):
            raise VQExportError(f"{source.path}: the {geo.model_type} decoder's layer {i} keeps keys and values of (heads, "
                                f"head_dim) {list(got)}, not the {[(heads, key), (heads, value)]} its config gives; it "
                                "cannot be exported")

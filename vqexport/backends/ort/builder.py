"""Lay out an ONNX Runtime artifact: model.onnx + model.onnx.data (already written), the head's definition,
onnxruntime-genai's genai_config.json and the tokenizer files, and optionally an offline-optimized copy."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from ...graph_io import cache_dims
from ...head.spec import write_artifact_head
from ...profiles import Profile
from ...source import Source
from .genai import genai_config, genai_graph_level, tokenizer_config
from .session import available_providers, create_session, session_options

MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model.optimized.onnx"


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_app_files(out: Path, source: Source, providers: list[str], logits: bool, trunk: dict,
                    ort_options=None) -> None:
    """What an app needs beside the graph: the head's definition (exact sampling, inspect), genai_config.json
    (onnxruntime-genai loads graphs with a ``logits`` output; the builder's own for a genai trunk) and the tokenizer
    files. No genai_config.json where onnxruntime-genai cannot run the graph: it gives each layer's values the size
    of its keys, and multi-head latent attention caches values of another size. ``ort_options``: the profile's
    session settings, which genai_config.json then carries (see ``with_session_options``)."""
    write_artifact_head(out, source.head)
    if logits and (trunk.get("genai_config") or same_key_value_sizes(source.geometry)):
        cfg = trunk.get("genai_config") or genai_config(source.geometry, MODEL_FILE, providers)
        write_json(out / "genai_config.json", with_session_options(cfg, ort_options))
    copy_tokenizer(source, out)


def with_session_options(cfg: dict, ort_options) -> dict:
    """``cfg`` with the decoder's session options set as the profile's were when parity was checked: its session
    config entries (e.g. the int8 MatMul accuracy level, which changes the logits) and its graph optimization level.
    The thread count is left to the device that runs it."""
    if ort_options is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    options = cfg["model"]["decoder"].setdefault("session_options", {})
    options["graph_optimization_level"] = genai_graph_level(ort_options.session_optimization_level)
    options.update(sorted(ort_options.session_config.items()))
    return cfg


def same_key_value_sizes(geo) -> bool:
    return all(key == value for _, key, value in map(cache_dims, geo.kv_shapes))


def copy_tokenizer(source: Source, out: Path) -> None:
    """The tokenizer files, and a tokenizer_config.json for onnxruntime-genai when the model has none."""
    if source.tokenizer_path is None:
        return
    source.copy_tokenizer(out)
    if not (out / "tokenizer_config.json").is_file():
        from tokenizers import Tokenizer

        vocab = {i: t for t, i in Tokenizer.from_file(str(source.tokenizer_path)).get_vocab(with_added_tokens=True).items()}
        write_json(out / "tokenizer_config.json", tokenizer_config(source.geometry, vocab))


def write_optimized(out: Path, profile: Profile, providers: list[str]) -> None:
    """model.optimized.onnx (+ its own external data) at the profile's portable level: a second copy of the weights."""
    so = session_options(profile.ort.saved_optimization_level, profile.ort.intra_op_num_threads)
    if profile.head == "fused" and profile.ort.kernel == "extensions":
        from ...ops.vqlogits import register_ort_kernel

        so.register_custom_ops_library(register_ort_kernel())
    so.optimized_model_filepath = str(out / OPTIMIZED_FILE)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", OPTIMIZED_FILE + ".data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    create_session(str(out / MODEL_FILE), so, providers)


def build_ort(out: Path, profile: Profile, source: Source, trunk: dict) -> dict:
    """Write the artifact's files beside model.onnx in ``out``; return the manifest's ``runtime`` section.
    ``trunk``: what write_graph says of the trunk (its source, cache convention, the builder's genai_config)."""
    providers = available_providers(profile.ort.providers)
    if profile.ort.saved_optimization_level != "none":
        write_optimized(out, profile, providers)
    write_app_files(out, source, providers, profile.decode.mode == "logits" or profile.decode.keep_logits, trunk,
                    profile.ort)
    return {
        "backend": "ort",
        "model_file": MODEL_FILE,
        "trunk": trunk["trunk"],
        "past_present_share_buffer": trunk["past_present_share_buffer"],
        "head_dim": source.geometry.head_dim,
        "optimized_file": OPTIMIZED_FILE if profile.ort.saved_optimization_level != "none" else None,
        "providers": providers,
        "session_optimization_level": profile.ort.session_optimization_level,
        "intra_op_num_threads": profile.ort.intra_op_num_threads,
        "session_config": dict(sorted(profile.ort.session_config.items())),
        "custom_ops": "onnxruntime-extensions" if profile.head == "fused" and profile.ort.kernel == "extensions" else None,
    }

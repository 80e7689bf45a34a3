"""Lay out an ONNX Runtime artifact: portable model.onnx, its offline-optimized twin, genai files."""

from __future__ import annotations

import json
from pathlib import Path

import onnx

from ...checkpoint import Checkpoint
from ...profiles import Profile
from .genai import genai_config, tokenizer_config
from .session import available_providers, create_session, session_options

MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model.optimized.onnx"
HEAD_TABLES_FILE = "head.safetensors"


def write_head_tables(path: Path, ckpt: Checkpoint) -> None:
    """The head's map and bias beside a top-k artifact, for exact O(K) sampling at any temperature."""
    from safetensors.numpy import save_file

    tensors = {"map": ckpt.tensors["head.map"]}
    if "head.bias" in ckpt.tensors:
        tensors["bias"] = ckpt.tensors["head.bias"]
    save_file(tensors, str(path), metadata={"codebook_size": str(ckpt.config.head.codebook_size)})


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def keep_used_opsets(path: Path) -> None:
    """ONNX Runtime writes an opset import for every domain it has ever registered in this process (custom-op
    libraries included), so the saved model would depend on what ran before. Keep the domains in use, sorted."""
    proto = onnx.load(str(path))
    used = {"", *(n.domain for n in proto.graph.node)} | {n.domain for f in proto.functions for n in f.node}
    used |= {f.domain for f in proto.functions}
    keep = sorted((o for o in proto.opset_import if o.domain in used or (o.domain == "ai.onnx" and "" in used)),
                  key=lambda o: o.domain)
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    path.write_bytes(proto.SerializeToString())


def build_ort(proto: onnx.ModelProto, profile: Profile, ckpt: Checkpoint, out: Path) -> dict:
    """Write the artifact's files into ``out``; return the manifest's ``runtime`` section."""
    model_path = out / MODEL_FILE
    model_path.write_bytes(proto.SerializeToString())

    providers = available_providers(profile.ort.providers)
    so = session_options(profile.ort.saved_optimization_level, profile.ort.intra_op_num_threads)
    if profile.head == "fused" and profile.ort.kernel == "extensions":
        from ...ops.vqlogits import register_ort_kernel

        so.register_custom_ops_library(register_ort_kernel())
    so.optimized_model_filepath = str(out / OPTIMIZED_FILE)
    create_session(str(model_path), so, providers)
    keep_used_opsets(out / OPTIMIZED_FILE)

    if profile.decode.mode == "topk":
        write_head_tables(out / HEAD_TABLES_FILE, ckpt)
    else:
        write_json(out / "genai_config.json", genai_config(ckpt.config, MODEL_FILE, providers))
    if ckpt.tokenizer_path is not None:
        from tokenizers import Tokenizer

        (out / "tokenizer.json").write_bytes(ckpt.tokenizer_path.read_bytes())
        vocab = {i: t for t, i in Tokenizer.from_file(str(ckpt.tokenizer_path)).get_vocab(with_added_tokens=True).items()}
        write_json(out / "tokenizer_config.json", tokenizer_config(ckpt.config, vocab))
    return {
        "model_file": MODEL_FILE,
        "optimized_file": OPTIMIZED_FILE,
        "providers": providers,
        "session_optimization_level": profile.ort.session_optimization_level,
        "intra_op_num_threads": profile.ort.intra_op_num_threads,
        "session_config": dict(sorted(profile.ort.session_config.items())),
        "custom_ops": "onnxruntime-extensions" if profile.head == "fused" and profile.ort.kernel == "extensions" else None,
    }

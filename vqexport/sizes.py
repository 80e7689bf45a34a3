"""Parameters and bytes of the head vs the trunk, and what a dense head of the same V x d would weigh."""

from __future__ import annotations

import onnx

from .graph import find_head, initializer_stats


# The head's terms, by tensor name: logits = codebook term (C, M) + bias term + rank-r correction (P, U).
TERMS = (("codebook", ("head.codebook", "head.weight")), ("map", ("head.map",)), ("bias", ("head.bias",)),
         ("lowrank", ("head.lowrank_",)))


def term_of(name: str) -> str:
    """Which term of the head a tensor belongs to ("tables" for decode tables and other pass-made constants)."""
    if name.startswith(("head.hidden", "head.lowrank_proj")):  # activation Q/DQ scales
        return "quantization"
    for term, prefixes in TERMS:
        if any(name.startswith(p) for p in prefixes):
            return term
    return "tables"


def _terms(head: dict[str, tuple[int, int]], dense_params: int) -> dict:
    out: dict[str, dict] = {}
    for name, (n, b) in sorted(head.items()):
        t = out.setdefault(term_of(name), {"params": 0, "bytes": 0})
        t["params"] += n
        t["bytes"] += b
    for t in out.values():
        t["params_vs_dense"] = t["params"] / max(dense_params, 1)
    return out


def _summary(head: dict[str, tuple[int, int]], trunk: dict[str, tuple[int, int]], vocab: int, d: int, bias: bool) -> dict:
    hp, hb = sum(n for n, _ in head.values()), sum(b for _, b in head.values())
    tp, tb = sum(n for n, _ in trunk.values()), sum(b for _, b in trunk.values())
    dense_params = vocab * d + (vocab if bias else 0)
    return {
        "head": {"params": hp, "bytes": hb, "tensors": {k: {"params": n, "bytes": b} for k, (n, b) in sorted(head.items())},
                 "terms": _terms(head, dense_params)},
        "trunk": {"params": tp, "bytes": tb},
        "total": {"params": hp + tp, "bytes": hb + tb},
        "dense_head": {"params": dense_params, "bytes": 4 * dense_params, "shape": [vocab, d]},
        "head_fraction_of_params": hp / max(hp + tp, 1),
        "head_params_vs_dense": hp / max(dense_params, 1),
    }


def checkpoint_sizes(ckpt) -> dict:
    head, trunk = {}, {}
    for name, arr in ckpt.tensors.items():
        (head if name.startswith("head.") else trunk)[name] = (int(arr.size), int(arr.nbytes))
    cfg = ckpt.config
    return _summary(head, trunk, cfg.vocab_size, cfg.d_model, cfg.head.bias)


def onnx_sizes(proto: onnx.ModelProto) -> dict:
    stats = initializer_stats(proto)
    h = find_head(proto)
    head = {n: stats[n] for n in h.initializers}
    trunk = {n: s for n, s in stats.items() if n not in head}
    d = _hidden_size(proto, h)
    vocab = _vocab_size(proto)
    return _summary(head, trunk, vocab, d, "head.bias" in head or "head.member_bias" in head)


def _hidden_size(proto: onnx.ModelProto, head) -> int:
    if head.matmul.op_type == "MatMulNBits":
        return next(a.i for a in head.matmul.attribute if a.name == "K")
    weight = next(t for t in proto.graph.initializer if t.name == head.initializers[0])
    return int(weight.dims[0])  # [d, K] (or [d, V] for a dense head), fp32 or int8


def _vocab_size(proto: onnx.ModelProto) -> int:
    for o in proto.graph.output:
        if o.name == "logits":
            return int(o.type.tensor_type.shape.dim[-1].dim_value)
    for t in proto.graph.initializer:  # top-k variant: the embedding table still has V rows
        if t.name == "embed.weight":
            return int(t.dims[0])
    raise ValueError("cannot tell the vocabulary size of this graph")

"""Parameters and bytes of the head vs the trunk, and what a dense head of the same V x d would weigh.

The head's tensors are the initializers named ``head.*`` (the head builder names them), so this reads a graph's
initializer dims only: external weights are never loaded.
"""

from __future__ import annotations

import json

import onnx

from .graph_io import HEAD_PREFIX, initializer_stats, metadata
from .head.spec import HeadConfig

# The head's terms, by tensor name: logits = codebook term (C, M) + bias term + rank-r correction (P, U); a two-stage
# head adds its member table and, when it does not read the trunk's own embedding table, a copy of the exact rows.
TERMS = (("codebook", ("head.codebook", "head.weight")), ("map", ("head.map",)), ("bias", ("head.bias",)),
         ("lowrank", ("head.lowrank_p", "head.lowrank_u")), ("members", ("head.members",)), ("rows", ("head.rows",)))


def term_of(name: str) -> str:
    """Which term of the head a tensor belongs to ("tables" for decode tables and other constants)."""
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


def summary(head: dict[str, tuple[int, int]], trunk: dict[str, tuple[int, int]], vocab: int, d: int, bias: bool,
            config: HeadConfig | None = None) -> dict:
    """``config``: the head's config; a two-stage head's then says what it computes per position, since its exact
    rows are not its own parameters unless a target copied them."""
    hp, hb = sum(n for n, _ in head.values()), sum(b for _, b in head.values())
    tp, tb = sum(n for n, _ in trunk.values()), sum(b for _, b in trunk.values())
    dense_params = vocab * d + (vocab if bias else 0)
    return {
        "head": {"params": hp, "bytes": hb, "tensors": {k: {"params": n, "bytes": b} for k, (n, b) in sorted(head.items())},
                 "terms": _terms(head, dense_params),
                 **({"two_stage": _two_stage(config, head)} if config is not None and config.type == "two-stage" else {})},
        "trunk": {"params": tp, "bytes": tb},
        "total": {"params": hp + tp, "bytes": hb + tb},
        "dense_head": {"params": dense_params, "bytes": 4 * dense_params, "shape": [vocab, d]},
        "head_fraction_of_params": hp / max(hp + tp, 1),
        "head_params_vs_dense": hp / max(dense_params, 1),
    }


def _two_stage(cfg: HeadConfig, head: dict[str, tuple[int, int]]) -> dict:
    """What a two-stage head computes per position, and the parameters of its own copy of the exact rows, if a
    target made one (the rows' bias alone is no copy of them)."""
    copy = sum(n for name, (n, _) in head.items() if term_of(name) == "rows" and not name.startswith("head.rows_bias"))
    return {"cluster_scores": cfg.codebook_size, "exact_rows": cfg.scored - cfg.codebook_size,
            "logits_computed_per_position": cfg.scored, "rank": cfg.rank, "rows_copy_params": copy}


def onnx_sizes(proto: onnx.ModelProto) -> dict:
    stats = initializer_stats(proto)
    head = {n: s for n, s in stats.items() if n.startswith(HEAD_PREFIX)}
    trunk = {n: s for n, s in stats.items() if n not in head}
    cfg = json.loads(metadata(proto).get("vqexport.head", "{}") or "{}")
    if not cfg:
        raise ValueError("this graph carries no vqexport head metadata")
    config = HeadConfig.from_dict(cfg, "the graph's vqexport.head metadata")
    return summary(head, trunk, config.vocab_size, config.hidden_size, config.bias, config)

"""The VQ-Logits head as a torch module, readable top to bottom: the reference every graph form is checked against.

    z       = h @ C.T                        # [..., K]   codebook term
    logits  = z[..., M]                      # [..., V]   every token reads its code's score
            + b                              #            bias term (optional)
            + (h @ P.T) @ U.T                #            rank-r correction term (optional)

C (``codebook``), b (``bias``), P (``lowrank_p``) and U (``lowrank_u``) are parameters (distillation trains them);
M (``map``) is a fixed buffer. ``to_head()`` / ``from_head()`` move between the module and the files' Head.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .spec import Head, HeadConfig, make_head, members_of, padded_members


class VQLogitsHead(nn.Module):
    def __init__(self, config: HeadConfig):
        super().__init__()
        V, d, K, r = config.vocab_size, config.hidden_size, config.codebook_size, config.rank
        self.config = config
        self.codebook = nn.Parameter(torch.empty(K, d))
        self.register_buffer("map", torch.zeros(V, dtype=torch.int64))
        self.bias = nn.Parameter(torch.zeros(V)) if config.bias else None
        self.lowrank_p = nn.Parameter(torch.empty(r, d)) if r else None
        self.lowrank_u = nn.Parameter(torch.zeros(V, r)) if r else None  # U = 0: a fresh correction is the plain head
        nn.init.normal_(self.codebook, std=d**-0.5)
        if r:
            nn.init.normal_(self.lowrank_p, std=d**-0.5)

    def codebook_logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.matmul(h, self.codebook.t())

    def route_scores(self, h: torch.Tensor) -> torch.Tensor:
        """The scores that rank the clusters: z (a two-stage head with a fitted router adds its route bias)."""
        return self.codebook_logits(h)

    def correction(self, h: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
        """The rank-r term ``(h @ P.T) @ U.T`` [..., V]; with ``into`` (contiguous, [..., V]), added into it in place."""
        projected = torch.matmul(h, self.lowrank_p.t())
        if into is None:
            return torch.matmul(projected, self.lowrank_u.t())
        into.view(-1, into.shape[-1]).addmm_(projected.reshape(-1, projected.shape[-1]), self.lowrank_u.t())
        return into

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.vq_logits(h, self.codebook_logits(h))

    def vq_logits(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The logits from h and its codebook logits z = h @ C.T. The terms are added in place: every [..., V]
        tensor is hundreds of MB at V = 152k, and a fresh one costs more to map than to fill (autograd allows it:
        no backward needs the values overwritten)."""
        logits = torch.gather(z, -1, self.map.expand(*z.shape[:-1], -1))  # index_select is 4x slower on 3-d z
        if self.bias is not None:
            logits.add_(self.bias)
        if self.lowrank_p is not None:
            self.correction(h, into=logits)
        return logits

    @classmethod
    def from_head(cls, head: Head) -> "VQLogitsHead":
        module = cls(head.config)
        _load(module, head)
        return module.eval()

    def to_head(self, probes: int = 0, cluster_size: int | None = None, route_bias: torch.Tensor | None = None) -> Head:
        """The files' Head; ``probes`` > 0: a two-stage head over the same codebook, map, bias and factors (member
        table ``cluster_size`` wide, default the largest cluster; the router's ``route_bias`` [K], if fitted)."""
        t = {"codebook": self.codebook, "map": self.map.to(torch.int32), "bias": self.bias,
             "lowrank_p": self.lowrank_p, "lowrank_u": self.lowrank_u,
             "route_bias": route_bias}
        t = {k: v.detach().cpu().contiguous().numpy() for k, v in t.items() if v is not None}
        if probes:
            t["members"] = members_of(t.pop("map"), self.config.codebook_size, cluster_size)
        elif "route_bias" in t:
            raise ValueError("a route bias belongs to a two-stage head (probes > 0)")
        return make_head(t, probes=probes)


class TwoStageHead(VQLogitsHead):
    """The codebook routes, the model's own output-layer rows rescore: the best P clusters by z (+ the router's
    bias) get exact logits ``h @ W[v].T (+ b_dense[v])``; every other token keeps its VQ logit. One distribution
    over all V tokens.

        z      = h @ C.T                       # [..., K]
        top    = topk(z + route_bias, P)       # the probed clusters (route_bias: 0 unless a router was fitted)
        ids    = members[top]                  # [..., P, cap] (padding repeats the cluster's first member)
        logits = VQ logits, with logits[ids] = h @ W[ids].T (+ b_dense[ids])
    """

    def __init__(self, config: HeadConfig, rows: torch.Tensor, rows_bias: torch.Tensor | None = None):
        super().__init__(config)
        self.register_buffer("members", torch.zeros(config.codebook_size, config.cluster_size, dtype=torch.int64))
        self.register_buffer("rows", _wide(rows), persistent=False)  # the model's output layer, shared
        self.register_buffer("rows_bias", _wide(rows_bias) if rows_bias is not None else None, persistent=False)
        self.route_bias = nn.Parameter(torch.zeros(config.codebook_size)) if config.route_bias else None
        self.probes = config.probes

    def route_scores(self, h: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        z = self.codebook_logits(h) if z is None else z
        return z if self.route_bias is None else z + self.route_bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.stages(h, parts=False)["logits"]

    def reads(self, dense: "DenseHead") -> bool:
        """Are this head's exact rows (and their bias) ``dense``'s own tensors? Then ``dense(h)`` are its exact
        logits, and a caller that has them passes them to ``stages`` instead of computing them a second time
        (``head_logits``)."""
        return _same(self.rows, dense.weight) and _same(self.rows_bias, dense.bias)

    def stages(self, h: torch.Tensor, top: torch.Tensor | None = None, exact: torch.Tensor | None = None,
               parts: bool = True) -> dict[str, torch.Tensor]:
        """The logits and what they are made of: ``route_scores`` [..., K], ``vq_logits`` and ``exact_logits``
        [..., V] (every token's VQ and exact logit; the probed clusters' tokens take the exact one). A parity check
        needs the parts: where two clusters' route scores nearly tie, a runtime may probe either (vqexport.verify).
        ``top`` [..., P]: probe these clusters instead of the router's choice (evaluation of other routings).
        ``exact`` [..., V]: the exact logits ``h @ rows.T (+ rows_bias)`` when the caller already has them.
        ``parts=False``: the logits alone, the probed exact logits written into the VQ logits instead of a copy."""
        z = self.codebook_logits(h)  # computed once: the tail's and the router's
        vq = self.vq_logits(h, z)
        route = self.route_scores(h, z)
        if top is None:
            top = torch.topk(route, self.probes, dim=-1).indices  # [..., P]
        ids = self.members[top].flatten(-2)  # [..., P * cap]
        # every exact logit by one GEMM, then the probed ones picked: O(V) memory per position like the tail itself
        # (gathering the rows first would hold P * cap * d floats per position: hundreds of GB at V = 152k)
        if exact is None:
            exact = torch.matmul(h, self.rows.t())
            if self.rows_bias is not None:
                exact = exact + self.rows_bias
        if not parts:
            return {"logits": vq.scatter_(-1, ids, exact.gather(-1, ids))}
        return {"logits": vq.scatter(-1, ids, exact.gather(-1, ids)), "route_scores": route, "vq_logits": vq,
                "exact_logits": exact}


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` as it is when float32 or float64 (the model's own tensor, not a copy), else as float32."""
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def head_module(head: Head, rows: torch.Tensor | None = None, rows_bias: torch.Tensor | None = None) -> VQLogitsHead:
    """The torch module of ``head``; a two-stage head needs the model's output layer ``rows`` [V, d] (and bias)."""
    if not head.two_stage:
        return VQLogitsHead.from_head(head)
    module = TwoStageHead(head.config, rows, rows_bias)
    _load(module, head)
    with torch.no_grad():  # padding repeats a member of its cluster: the same exact logit
        module.members.copy_(torch.from_numpy(padded_members(head).astype(np.int64)))
        if module.route_bias is not None:
            module.route_bias.copy_(torch.from_numpy(head.route_bias))
    return module.eval()


def head_logits(head: VQLogitsHead, h: torch.Tensor, dense: "DenseHead", dense_logits: torch.Tensor,
                top: torch.Tensor | None = None) -> torch.Tensor:
    """``head(h)``, given the dense layer's logits ``dense_logits = dense(h)`` on the same rows: a two-stage head that
    reads ``dense``'s rows takes its exact logits from them (one V x d product per position instead of two).
    ``top`` [..., P]: a two-stage head probes these clusters instead of its router's choice."""
    if not isinstance(head, TwoStageHead):
        if top is not None:
            raise ValueError("top: only a two-stage head probes clusters")
        return head(h)
    exact = dense_logits if head.reads(dense) else None
    return head.stages(h, top=top, exact=exact, parts=False)["logits"]


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """One tensor seen twice (the same memory, shape, strides and type), or both absent."""
    if a is None or b is None:
        return a is b
    return (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(), b.dtype)


def _load(module: VQLogitsHead, head: Head) -> None:
    with torch.no_grad():
        module.codebook.copy_(torch.from_numpy(head.codebook))
        module.map.copy_(torch.from_numpy(head.map.astype(np.int64)))
        if module.bias is not None:
            module.bias.copy_(torch.from_numpy(head.bias))
        if module.lowrank_p is not None:
            module.lowrank_p.copy_(torch.from_numpy(head.lowrank[0]))
            module.lowrank_u.copy_(torch.from_numpy(head.lowrank[1]))


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """The model's own logits from its output layer's: ``cap * tanh(logits / cap)`` (``final_logit_softcapping``:
    Gemma 2 and 4), or ``logits`` themselves when the model does not cap them."""
    return logits if not cap else torch.tanh(logits / cap) * cap


class DenseHead(nn.Module):
    """A plain output layer ``logits = h @ W.T (+ b)``: the model a VQ-Logits head is converted from. ``softcap``:
    the model's ``final_logit_softcapping``, which ``cap`` applies to these logits or a head's (both are compared
    as the model's distribution: its logits after the cap)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, softcap: float | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach().float())
        self.register_buffer("bias", bias.detach().float() if bias is not None else None)
        self.softcap = softcap

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.matmul(h, self.weight.t())
        return logits if self.bias is None else logits + self.bias

    def cap(self, logits: torch.Tensor) -> torch.Tensor:
        return soft_cap(logits, self.softcap)

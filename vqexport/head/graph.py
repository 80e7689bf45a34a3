"""The head as ONNX nodes, built from the head's tensors and attached to a hidden-state value (onnx_ir; no torch).

Every form is a sum of terms, each a few standard ops (axes always written non-negative)::

    codebook   z = MatMul(h, head.codebook_t)                                  [B, S, K]
    select     sel = GatherElements(z, Expand(head.map, [B, S, V]), axis=2)    (or Gather(z, head.map, axis=2))
    bias       + head.bias                                                    [V]
    rank-r     + MatMul(MatMul(h, head.lowrank_p_t), head.lowrank_u_t)        [d, r] and [r, V]

A weight MatMul is fp32, int8 QDQ (``DequantizeLinear(head.X_q, head.X_scale, axis=1)``, optionally with a
calibrated Quantize/DequantizeLinear pair on its activation) or ORT's ``com.microsoft.MatMulNBits`` (bits = 8).
The fused form is one ``VQLogits`` node (vqexport.ops.vqlogits) with its function body. Decode outputs are
``logits`` or the exact top-k (``topk_ids``, ``topk_logprobs``, ``cluster_logprobs``; see vqexport.head.decoding).
Initializers are named ``head.*``, nodes ``head/*``: nothing ever has to find the head again by its pattern.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ..graph_io import BATCH, HIDDEN, SEQ, embedding_lookup, same_constant
from .decoding import cluster_tables
from .quant import quantize_rows
from .spec import Head, padded_members

NATIVE_BLOCK = 32
SELECT_FORMS = ("gather", "gather_elements")
CODEBOOK_MATMUL = "head/codebook/MatMul"  # the node computing z (every standard form)
DENSE_MATMUL = "head/dense/MatMul"  # the dense twin's output layer (benchmarks)
EXACT_ROWS, EXACT_BIAS = "head/exact/rows", "head/exact/bias"  # a two-stage head's lookups of its rows and their bias
EXACT_BIAS_ADD = "head/exact/Add"  # the rows' bias added to the exact logits
FUSED_NODE = "head/VQLogits"


@dataclass(frozen=True)
class HeadForm:
    """How the head is built (a target profile decides; see vqexport.profiles)."""

    select: str = "gather_elements"  # "gather" | "gather_elements"
    fused: bool = False
    codebook: str = "fp32"  # "fp32" | "int8" | "int4" (MatMulNBits only): the head's weights (codebook, rank-r factors)
    int8_encoding: str = "qdq"  # "qdq" | "native" (MatMulNBits, bits = 8)
    accuracy_level: int = 4  # native: MatMulNBits accuracy level
    activations: bool = False  # qdq: also Q/DQ the MatMuls' activations (static scales from calibration)
    weight_bits: int = 8  # qdq: 7 = "reduce range" codes in [-63, 63]
    decode: str = "logits"  # "logits" | "topk"
    k: int = 50
    keep_logits: bool = False
    last_position_only: bool = False
    dense: bool = False  # the dense twin (benchmarks): one MatMul with W[v] = C[M[v]] (+ U[v] P), same bias; for a
    # two-stage head, the model's own output layer (its rows)
    probes: int = 0  # two-stage: clusters rescored exactly (0: the head's own setting)
    rows: str = "shared"  # two-stage exact rows: "shared" (the trunk's own embedding table, whatever its encoding) |
    #                       "fp32" (a head.rows copy) | "int8" (7-bit row codes, h quantized per position, MatMulInteger) |
    #                       "int4" (an int4 block-quantized copy read by GatherBlockQuantized, as the builder's table)

    def outputs(self, head: Head) -> list[str]:
        if self.decode == "logits":
            return ["logits"]
        out = ["topk_ids", "topk_logprobs"] + ([] if head.config.rank or head.two_stage else ["cluster_logprobs"])
        return (["logits"] if self.keep_logits else []) + out


@dataclass
class Built:
    outputs: dict[str, ir.Value]
    functions: list = field(default_factory=list)  # ir.Function bodies the nodes need (the fused op's)
    domains: dict[str, int] = field(default_factory=dict)  # opset imports beyond the default domain


class _Builder:
    def __init__(self, graph: ir.Graph, form: HeadForm, scales: dict[str, float] | None):
        self.graph, self.form, self.scales = graph, form, dict(scales or {})
        self.tape = ir.tape.Tape(graph)
        self.domains: dict[str, int] = {}
        self._quantized: dict[str, ir.Value] = {}  # activation -> its Q/DQ output (one pair per activation)

    def init(self, name: str, array: np.ndarray) -> ir.Value:
        """The initializer ``name`` holding ``array``, made once (``graph_io.same_constant``)."""
        array = np.ascontiguousarray(array)
        existing = same_constant(self.graph, name, array)
        return existing if existing is not None else self.tape.initializer(ir.tensor(array, name=name))

    def op(self, op_type: str, inputs: list, name: str, domain: str = "", **attrs) -> ir.Value:
        return self.tape.op(op_type, inputs, attrs or None, domain=domain, name=name)

    def ops(self, op_type: str, inputs: list, name: str, n: int, **attrs) -> tuple[ir.Value, ...]:
        return tuple(self.tape.op_multi_out(op_type, inputs, attrs or None, num_outputs=n, name=name))

    def const(self, name: str, values, dtype=np.int64) -> ir.Value:
        return self.init(name, np.asarray(values, dtype=dtype))

    # -- weights ---------------------------------------------------------------------------------------------
    def weight(self, w_t: np.ndarray, base: str) -> ir.Value:
        """A weight [in, out] as a value a MatMul (or the fused node) reads: fp32, or int8 through DequantizeLinear."""
        if self.form.codebook == "fp32":
            return self.init(base + "_t", w_t.astype(np.float32))
        q, scale = quantize_rows(w_t.T, base, bits=self.form.weight_bits)  # one scale per output column
        stem = base.replace(".", "/")
        return self.op("DequantizeLinear", [self.init(base + "_q", np.ascontiguousarray(q.T)), self.init(base + "_scale", scale),
                                            self.init(base + "_zero_point", np.zeros_like(scale, dtype=np.int8))],
                       f"{stem}/DequantizeLinear", axis=1)

    def activation(self, x: ir.Value, key: str, base: str) -> ir.Value:
        """``x`` through a calibrated Quantize/DequantizeLinear pair (int8 activations), when the form has them."""
        if not (self.form.codebook == "int8" and self.form.int8_encoding == "qdq" and self.form.activations):
            return x
        if key in self._quantized:
            return self._quantized[key]
        scale = self.scales.get(key)
        if scale is None or not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"activation scale {key!r} must be calibrated (finite, > 0), got {scale}")
        s, zp = self.init(base + "_scale", np.array(scale, np.float32)), self.init(base + "_zero_point", np.array(0, np.int8))
        stem = base.replace(".", "/")
        q = self.op("QuantizeLinear", [x, s, zp], f"{stem}/QuantizeLinear")
        self._quantized[key] = self.op("DequantizeLinear", [q, s, zp], f"{stem}/DequantizeLinear")
        return self._quantized[key]

    def matmul(self, x: ir.Value, w_t: np.ndarray, base: str, act: str) -> ir.Value:
        """``x @ w_t`` in the form's encoding; ``act`` names the activation's calibration scale."""
        stem = base.replace(".", "/")
        if self.form.codebook == "int4" or (self.form.codebook == "int8" and self.form.int8_encoding == "native"):
            return self._matmul_nbits(x, w_t, base, 4 if self.form.codebook == "int4" else 8)
        w = self.weight(w_t, base)
        return self.op("MatMul", [self.activation(x, act, _act_base(act)), w], f"{stem}/MatMul")

    def _matmul_nbits(self, x: ir.Value, w_t: np.ndarray, base: str, bits: int) -> ir.Value:
        """ONNX Runtime's MatMulNBits: 8 bits with the per-row int8 codes of the QDQ form (one scale per row, repeated
        per block), or 4 bits with one scale per block of NATIVE_BLOCK (symmetric, codes in [-7, 7], zero point 8)."""
        K, N = w_t.shape
        blocks = -(-K // NATIVE_BLOCK)
        if bits == 8:
            q, scale = quantize_rows(w_t.T, base)  # [N, K]: one row per output
            packed = np.full((N, blocks * NATIVE_BLOCK), 128, dtype=np.uint8)
            packed[:, :K] = (q.astype(np.int16) + 128).astype(np.uint8)
            packed = packed.reshape(N, blocks, NATIVE_BLOCK)
            scales = np.repeat(scale, blocks).astype(np.float32)
        else:
            w = np.zeros((N, blocks * NATIVE_BLOCK), np.float32)
            w[:, :K] = w_t.T
            q, scale = quantize_rows(w.reshape(N * blocks, NATIVE_BLOCK), base, bits=4)  # one scale per block
            codes = (q.astype(np.int16) + 8).astype(np.uint8).reshape(N, blocks, NATIVE_BLOCK)
            packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)  # two codes a byte, low nibble first
            scales = scale.astype(np.float32)
        self.domains["com.microsoft"] = 1
        return self.op("MatMulNBits", [x, self.init(base + "_q", packed), self.init(base + "_scale", scales)],
                       f"{base.replace('.', '/')}/MatMulNBits", domain="com.microsoft", K=K, N=N, bits=bits,
                       block_size=NATIVE_BLOCK, accuracy_level=self.form.accuracy_level)

    # -- terms -----------------------------------------------------------------------------------------------
    def vocab_shape(self, x: ir.Value, V: int, stem: str) -> ir.Value:
        """The shape [batch, sequence, V] of logits for ``x`` [batch, sequence, ...] (nodes named ``stem/...``)."""
        lead = self.op("Slice", [self.op("Shape", [x], f"{stem}/shape"), self.const(f"{stem}/start", [0]),
                                 self.const(f"{stem}/end", [2])], f"{stem}/lead")
        return self.op("Concat", [lead, self.const(f"{stem}/vocab", [V])], f"{stem}/out_shape", axis=0)

    def select(self, z: ir.Value, mapping: np.ndarray) -> ir.Value:
        V = mapping.shape[0]
        if self.form.select == "gather":
            return self.op("Gather", [z, self.init("head.map", mapping.astype(np.int32))], "head/select/gather", axis=2)
        shape = self.vocab_shape(z, V, "head/select")
        index = self.op("Expand", [self.init("head.map", mapping.astype(np.int32).reshape(1, 1, V)), shape], "head/select/index")
        return self.op("GatherElements", [z, index], "head/select/gather", axis=2)

    def logits(self, h: ir.Value, z: ir.Value, head: Head) -> ir.Value:
        out = self.select(z, head.map)
        if head.bias is not None:
            out = self.op("Add", [out, self.init("head.bias", head.bias)], "head/bias/Add")
        if head.lowrank is not None:
            p, u = head.lowrank
            proj = self.matmul(h, p.T, "head.lowrank_p", "hidden")
            corr = self.matmul(proj, u.T, "head.lowrank_u", "lowrank")
            out = self.op("Add", [out, corr], "head/lowrank/Add")
        return out

    def fused(self, h: ir.Value, head: Head) -> tuple[ir.Value, ir.Function]:
        from ..ops.vqlogits import DOMAIN, OP_TYPE, PLUGIN_NAMESPACE, PLUGIN_VERSION, function_proto

        V = head.config.vocab_size
        bias = head.bias if head.bias is not None else np.zeros(V, np.float32)  # the op always takes a bias
        inputs = [self.activation(h, "hidden", "head.hidden"), self.weight(head.codebook.T, "head.codebook"),
                  self.init("head.map", head.map.astype(np.int32)), self.init("head.bias", bias)]
        if head.lowrank is not None:
            p, u = head.lowrank
            inputs += [self.weight(p.T, "head.lowrank_p"), self.weight(u.T, "head.lowrank_u")]
        self.domains[DOMAIN] = 1
        out = self.op(OP_TYPE, inputs, FUSED_NODE, domain=DOMAIN, plugin_namespace=PLUGIN_NAMESPACE,
                      plugin_version=PLUGIN_VERSION)
        opset = self.graph.opset_imports.get("", 18)
        body = ir.serde.deserialize_function(function_proto(self.form.select, opset, lowrank=head.lowrank is not None))
        return out, body

    def topk_from_clusters(self, z: ir.Value, head: Head, k: int) -> dict[str, ir.Value]:
        """Exact top-k with no V-sized tensor: the k best clusters by ``z + max bias``, their members' logits."""
        K = head.config.codebook_size
        t = cluster_tables(head.map, head.bias, K, width=k)
        kc = min(k, K)
        neg = np.float32(np.finfo(np.float32).min)  # a finite "minus infinity" keeps Add / TopK NaN-free
        fin = lambda a: np.where(np.isfinite(a), a, neg).astype(np.float32)  # noqa: E731
        score = self.op("Add", [z, self.init("head.cluster_max_bias", fin(t.max_bias))], "head/topk/score")
        _, clusters = self.ops("TopK", [score, self.const("head/topk/k_clusters", [kc])], "head/topk/clusters", 2, axis=2)
        z_sel = self.op("GatherElements", [z, clusters], "head/topk/z_sel", axis=2)
        z_sel4 = self.op("Unsqueeze", [z_sel, self.const("head/topk/axis3", [3])], "head/topk/z_sel4")
        cand_bias = self.op("Gather", [self.init("head.member_bias", fin(t.member_bias)), clusters], "head/topk/cand_bias", axis=0)
        members = np.where(t.members >= 0, t.members, 0).astype(np.int64)
        cand_ids4 = self.op("Gather", [self.init("head.members", members), clusters], "head/topk/cand_ids4", axis=0)
        cand4 = self.op("Add", [z_sel4, cand_bias], "head/topk/cand4")
        flat = self.const("head/topk/flat_shape", [0, 0, -1])
        cand = self.op("Reshape", [cand4, flat], "head/topk/cand")
        cand_ids = self.op("Reshape", [cand_ids4, flat], "head/topk/cand_ids")
        values, positions = self.ops("TopK", [cand, self.const("head/topk/k", [k])], "head/topk/top", 2, axis=2)
        ids = self.op("GatherElements", [cand_ids, positions], "head/topk/ids", axis=2)
        scores = self.op("Add", [z, self.init("head.cluster_lse_bias", fin(t.lse_bias))], "head/topk/cluster_scores")
        lse = self.op("ReduceLogSumExp", [scores, self.const("head/topk/axes", [2])], "head/topk/lse", keepdims=1)
        return {"topk_ids": ids, "topk_logprobs": self.op("Sub", [values, lse], "head/topk/logprobs"),
                "cluster_logprobs": self.op("Sub", [scores, lse], "head/topk/cluster_logprobs")}

    def topk_from_logits(self, logits: ir.Value, k: int) -> dict[str, ir.Value]:
        """Exact top-k of a head whose order inside a cluster depends on h (rank-r): TopK over the V logits."""
        values, ids = self.ops("TopK", [logits, self.const("head/topk/k", [k])], "head/topk/top", 2, axis=2)
        lse = self.op("ReduceLogSumExp", [logits, self.const("head/topk/axes", [2])], "head/topk/lse", keepdims=1)
        return {"topk_ids": ids, "topk_logprobs": self.op("Sub", [values, lse], "head/topk/logprobs")}


class _TwoStage:
    """Stage 2 of a two-stage head: the probed clusters' tokens get exact logits from the model's own rows."""

    def __init__(self, b: _Builder, head: Head, rows: np.ndarray | None, rows_bias: np.ndarray | None, tied: bool):
        self.b, self.head, self.rows, self.rows_bias, self.tied = b, head, rows, rows_bias, tied

    @functools.cached_property
    def members(self) -> np.ndarray:
        """[K, cap] int32 ids; padding repeats a member of its cluster (the dense twin needs none: an artifact's
        two-stage head may be its config alone)."""
        return padded_members(self.head)

    def route(self, z: ir.Value) -> tuple[ir.Value, ir.Value]:
        """The probed clusters [B, S, P] and their token ids [B, S, P * cap] (padding repeats a cluster's first member)."""
        b, head = self.b, self.head
        P = b.form.probes or head.config.probes
        if head.route_bias is not None:  # a fitted router ranks the clusters by z + route_bias
            z = b.op("Add", [z, b.init("head.route_bias", head.route_bias)], "head/route/bias")
        _, top = b.ops("TopK", [z, b.const("head/route/k", [P])], "head/route/top", 2, axis=2)
        ids4 = b.op("Gather", [b.init("head.members", self.members), top], "head/route/members", axis=0)
        return top, b.op("Reshape", [ids4, b.const("head/route/flat", [0, 0, -1])], "head/route/ids")

    def exact(self, h: ir.Value, top: ir.Value, ids: ir.Value) -> ir.Value:
        """h · W[ids] [B, S, N] in the form's row encoding (``top``: the probed clusters ``ids`` come from)."""
        b = self.b
        form = b.form.rows
        if form == "int8":
            out = self._int8(h, top)
        else:
            if form == "int4":
                rows = self._int4(ids)
            elif form == "shared" and self.tied:  # the trunk's own embedding table is the output layer: read it there
                rows = self._shared(ids)
            else:  # "fp32", or an untied model, whose output layer (lm_head) is not in the trunk: ship its rows
                if self.rows is None:
                    raise ValueError("a two-stage head without a shared embedding table needs the model's rows")
                rows = b.op("Gather", [b.init("head.rows", self.rows.astype(np.float32, copy=False)), ids], EXACT_ROWS, axis=0)
            col = b.op("Unsqueeze", [h, b.const("head/exact/axis3", [3])], "head/exact/h_col")
            out = b.op("Squeeze", [b.op("MatMul", [rows, col], "head/exact/MatMul"), b.const("head/exact/axis3", [3])],
                       "head/exact/logits")
        if self.rows_bias is not None:
            out = b.op("Add", [out, b.op("Gather", [b.init("head.rows_bias", self.rows_bias.astype(np.float32)), ids],
                                         EXACT_BIAS, axis=0)], EXACT_BIAS_ADD)
        return out

    def _shared(self, ids: ir.Value) -> ir.Value:
        """The trunk's embedding lookup of input_ids, repeated on the probed ids: the same table, never copied (cast
        to fp32 when the table is an fp16 trunk's)."""
        b = self.b
        lookup = self._lookup()
        inputs = [lookup.inputs[0], ids, *lookup.inputs[2:]]
        attrs = {k: a.value for k, a in lookup.attributes.items()}
        if lookup.domain:
            b.domains[lookup.domain] = 1
        rows = b.tape.op(lookup.op_type, inputs, attrs or None, domain=lookup.domain, name=EXACT_ROWS)
        # a Gather yields the table's type, GatherBlockQuantized its scales'
        dtype = (lookup.inputs[2] if lookup.op_type == "GatherBlockQuantized" else lookup.inputs[0]).dtype
        if dtype is not None and dtype != ir.DataType.FLOAT:
            rows = b.op("Cast", [rows], "head/exact/rows_fp32", to=int(ir.DataType.FLOAT))
        return rows

    def _lookup(self) -> ir.Node:
        """The trunk's embedding lookup of input_ids over its [V, d] table (an initializer); the ids may reach it
        through ops that only reshape or cast them (GPT-2's export flattens them with a Reshape first)."""
        lookup = embedding_lookup(self.b.graph)
        V = self.head.config.vocab_size
        if (lookup is None or lookup.inputs[0] is None or not lookup.inputs[0].is_initializer()
                or lookup.inputs[0].shape is None or list(lookup.inputs[0].shape)[0] != V):
            raise ValueError("the trunk has no embedding lookup of input_ids over a [V, d] table to share")
        return lookup

    def dense(self, h: ir.Value) -> ir.Value:
        """The dense twin (benchmarks): every token's exact logit h · Wᵀ (+ b_dense) by one V x d product, from the
        rows' copy if given, else from the trunk's own embedding table (tied models; an fp32 or fp16 Gather table),
        read as it is by a Gemm with transB (a Transpose of it would be folded by ONNX Runtime into a second table,
        which the model it stands for does not hold)."""
        b = self.b
        if self.rows is not None:
            out = b.op("MatMul", [h, b.init("head.rows_t", np.ascontiguousarray(self.rows.T, dtype=np.float32))],
                       DENSE_MATMUL)
        else:
            lookup = self._lookup()
            if lookup.op_type != "Gather":
                raise ValueError(f"the trunk's embedding table is read by {lookup.op_type}, not a plain Gather")
            table = lookup.inputs[0]
            if table.dtype is not None and table.dtype != ir.DataType.FLOAT:
                table = b.op("Cast", [table], "head/dense/rows_fp32", to=int(ir.DataType.FLOAT))
            d, V = self.head.config.hidden_size, self.head.config.vocab_size
            flat = b.op("Reshape", [h, b.const("head/dense/flat", [-1, d])], "head/dense/h_flat")
            out = b.op("Reshape", [b.op("Gemm", [flat, table], "head/dense/Gemm", transB=1), b.vocab_shape(h, V, "head/dense")],
                       "head/dense/logits")
        if self.rows_bias is not None:
            out = b.op("Add", [out, b.init("head.rows_bias", self.rows_bias.astype(np.float32))], "head/dense/rows_bias")
        return out

    def _int4(self, ids: ir.Value) -> ir.Value:
        """Rows from an int4 copy (symmetric blocks of NATIVE_BLOCK along d, one scale each) by GatherBlockQuantized."""
        b = self.b
        V, d = self.rows.shape
        q, scale = quantize_rows(self.rows.reshape(V * d // NATIVE_BLOCK, NATIVE_BLOCK), "rows", bits=4)
        nib = (q.reshape(V, d).astype(np.int16) & 0xF).astype(np.uint8)
        packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
        table = b.tape.initializer(ir.PackedTensor(packed, ir.DataType.INT4, shape=ir.Shape([V, d]), name="head.rows_q4"))
        b.domains["com.microsoft"] = 1
        return b.op("GatherBlockQuantized", [table, ids, b.init("head.rows_scale", scale.reshape(V, d // NATIVE_BLOCK))],
                    EXACT_ROWS, domain="com.microsoft", block_size=NATIVE_BLOCK, gather_axis=0, quantize_axis=1)

    def _int8(self, h: ir.Value, top: ir.Value) -> ir.Value:
        """7-bit row codes (an int8 copy of the rows, one scale each) times h quantized per position (symmetric,
        its own scale: no batch or padding dependence), accumulated in int32 by MatMulInteger.

        The copy is laid out by cluster, each cluster's rows transposed: ``head.rows_q`` [K, d, cap], so stage 2 is
        one Gather of P contiguous blocks and P products [1, d] x [d, cap] with h as the uint8 left operand (h's
        codes + 128, zero point 128: the same integers), the layout ONNX Runtime's u8 x s8 kernels run fastest. On
        the Qwen2.5-0.5B shape at P = K/16 that is about twice as fast as gathering token rows [P * cap, d] and
        multiplying them by h as a column. ``top``: the probed clusters [B, S, P]."""
        b, members = self.b, self.members
        if self.rows is None:
            raise ValueError("the int8 row form needs the model's rows")
        q, scale = quantize_rows(self.rows, "rows", bits=7)  # 7 bits: u8 x s8 pair sums cannot saturate int16
        table = np.ascontiguousarray(q[members].transpose(0, 2, 1))  # [K, d, cap] int8
        rq = b.op("Gather", [b.init("head.rows_q", table), top], "head/exact/rows_q", axis=0)  # [B, S, P, d, cap]
        amax = b.op("ReduceMax", [b.op("Abs", [h], "head/exact/h_abs"), b.const("head/exact/axis2", [2])], "head/exact/h_amax",
                    keepdims=1)  # [B, S, 1]
        hs = b.op("Div", [b.op("Max", [amax, b.init("head/exact/tiny", np.array(1e-12, np.float32))], "head/exact/h_amax_pos"),
                          b.init("head/exact/127", np.array(127.0, np.float32))], "head/exact/h_scale")
        codes = b.op("Round", [b.op("Div", [h, hs], "head/exact/h_scaled")], "head/exact/h_round")  # in [-127, 127]
        hu = b.op("Cast", [b.op("Add", [codes, b.init("head/exact/128", np.array(128.0, np.float32))], "head/exact/h_shift")],
                  "head/exact/h_q", to=int(ir.DataType.UINT8))  # [B, S, d] in [1, 255]
        row = b.op("Unsqueeze", [hu, b.const("head/exact/axes23", [2, 3])], "head/exact/h_row")  # [B, S, 1, 1, d]
        acc = b.op("MatMulInteger", [row, rq, b.init("head/exact/zero_point", np.array(128, np.uint8))],
                   "head/exact/MatMulInteger")  # [B, S, P, 1, cap] int32
        acc = b.op("Reshape", [acc, b.const("head/exact/flat", [0, 0, -1])], "head/exact/acc")  # [B, S, P * cap]
        scaled = b.op("Mul", [b.op("Cast", [acc], "head/exact/acc_f", to=int(ir.DataType.FLOAT)), hs], "head/exact/h_rescale")
        row_scale = b.op("Gather", [b.init("head.rows_scale", np.ascontiguousarray(scale[members])), top],
                         "head/exact/scale", axis=0)  # [B, S, P, cap]
        return b.op("Mul", [scaled, b.op("Reshape", [row_scale, b.const("head/exact/flat", [0, 0, -1])], "head/exact/scale_flat")],
                    "head/exact/logits")


def _act_base(key: str) -> str:
    return {"hidden": "head.hidden", "lowrank": "head.lowrank_proj"}[key]


DENSE_ROWS_AT_ONCE = 16384  # rows of dense_weight_t computed in float64 at a time


def dense_weight_t(head: Head) -> np.ndarray:
    """W_t [d, V] with W[v] = C[M[v]] (+ U[v] P): the dense layer computing the same logits (minus the bias), each
    row summed in float64, DENSE_ROWS_AT_ONCE rows at a time (whole, the float64 copies were four times the result)."""
    codebook, mapping = head.codebook.astype(np.float64), head.map
    V, d = mapping.shape[0], codebook.shape[1]
    out = np.empty((d, V), np.float32)
    for i in range(0, V, DENSE_ROWS_AT_ONCE):
        w = codebook[mapping[i : i + DENSE_ROWS_AT_ONCE]]
        if head.lowrank is not None:
            p, u = head.lowrank
            w += u[i : i + DENSE_ROWS_AT_ONCE].astype(np.float64) @ p.astype(np.float64)
        out[:, i : i + len(w)] = w.T
    return out


def build_head(graph: ir.Graph, hidden: ir.Value, head: Head, form: HeadForm, scales: dict[str, float] | None = None,
               rows: np.ndarray | None = None, rows_bias: np.ndarray | None = None, tied: bool = False,
               softcap: float | None = None) -> Built:
    """Append the head's nodes and initializers to ``graph``, reading ``hidden`` [B, S, d]; return its outputs.
    A two-stage head reads the model's output-layer ``rows`` [V, d] (and bias): the trunk's own embedding table when
    the form shares it and the model is ``tied`` (its output layer is that table), else a copy (``rows`` given).
    ``softcap``: the model's ``final_logit_softcapping``; the logits become ``softcap * tanh(logits / softcap)``. Its
    top-k form is refused: cluster log-probabilities need logits that are cluster score + token terms."""
    if softcap and form.decode == "topk":
        raise ValueError("a soft-capped model's logits are not cluster score + token terms: no top-k form")
    b = _Builder(graph, form, scales)
    h = hidden
    if hidden.dtype is not None and hidden.dtype != ir.DataType.FLOAT:  # an fp16 / bf16 trunk: the head computes in fp32
        h = b.op("Cast", [hidden], "head/hidden_fp32", to=int(ir.DataType.FLOAT))
    if form.last_position_only:  # prefill computes the head for the last position only
        h = b.op("Slice", [h, b.const("head/last/start", [-1]), b.const("head/last/end", [np.iinfo(np.int64).max]),
                           b.const("head/last/axis", [1])], "head/last_position")
    functions = []
    outputs: dict[str, ir.Value] = {}
    if form.dense and head.two_stage:  # a two-stage head's dense twin: the model's own output layer
        outputs["logits"] = _TwoStage(b, head, rows, rows_bias, tied).dense(h)
    elif form.dense:
        out = b.op("MatMul", [h, b.init("head.weight_t", dense_weight_t(head))], DENSE_MATMUL)
        if head.bias is not None:
            out = b.op("Add", [out, b.init("head.bias", head.bias)], "head/bias/Add")
        outputs["logits"] = out
    elif form.fused:
        out, body = b.fused(h, head)
        functions.append(body)
        outputs["logits"] = out
    else:
        z = b.matmul(h, head.codebook.T, "head.codebook", "hidden")
        z.producer().name = CODEBOOK_MATMUL if z.producer().op_type == "MatMul" else z.producer().name
        wants_logits = form.decode == "logits" or form.keep_logits or head.lowrank is not None or head.two_stage
        if wants_logits:
            outputs["logits"] = b.logits(h, z, head)
        if head.two_stage:  # stage 2: exact logits for the probed clusters' tokens, scattered into the VQ logits
            stage = _TwoStage(b, head, rows, rows_bias, tied)
            top, ids = stage.route(z)
            outputs["logits"] = b.op("ScatterElements", [outputs["logits"], ids, stage.exact(h, top, ids)], "head/exact/scatter",
                                     axis=2)
        if form.decode == "topk":
            if head.lowrank is not None or head.two_stage:
                outputs.update(b.topk_from_logits(outputs["logits"], form.k))
            else:
                outputs.update(b.topk_from_clusters(z, head, form.k))
            if not form.keep_logits:
                outputs.pop("logits", None)
    if softcap:
        cap = b.const("head/softcap/cap", softcap, np.float32)
        tanh = b.op("Tanh", [b.op("Div", [outputs["logits"], cap], "head/softcap/Div")], "head/softcap/Tanh")
        outputs["logits"] = b.op("Mul", [tanh, cap], "head/softcap/Mul")
    _declare(outputs, head, form)
    return Built(outputs={n: outputs[n] for n in form.outputs(head) if n in outputs}, functions=functions, domains=b.domains)


def _declare(outputs: dict[str, ir.Value], head: Head, form: HeadForm) -> None:
    """Name the output values and give them their dtypes and named axes."""
    seq = 1 if form.last_position_only else ir.SymbolicDim(SEQ)
    width = {"logits": head.config.vocab_size, "topk_ids": form.k, "topk_logprobs": form.k,
             "cluster_logprobs": head.config.codebook_size}
    for name, v in outputs.items():
        v.name = name
        v.type = ir.TensorType(ir.DataType.INT64 if name == "topk_ids" else ir.DataType.FLOAT)
        v.shape = ir.Shape([ir.SymbolicDim(BATCH), seq, width[name]])


def head_model(head: Head, form: HeadForm, opset: int = 18, scales: dict[str, float] | None = None, batch=BATCH, seq=SEQ,
               rows: np.ndarray | None = None, rows_bias: np.ndarray | None = None, softcap: float | None = None) -> ir.Model:
    """The head alone as a model: input ``hidden_states`` [batch, seq, d], the form's outputs (benchmarks, tests)."""
    hidden = ir.Value(name=HIDDEN, shape=ir.Shape([batch, seq, head.config.hidden_size]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph(inputs=[hidden], outputs=[], nodes=[], opset_imports={"": opset}, name="vqexport_head")
    built = build_head(graph, hidden, head, form, scales, rows=rows, rows_bias=rows_bias, softcap=softcap)
    graph.outputs.extend(built.outputs.values())
    graph.opset_imports.update(built.domains)
    return ir.Model(graph, ir_version=10, producer_name="vqexport", functions=built.functions)

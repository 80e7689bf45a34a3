"""The VQ-Logits head as files beside a Hugging Face model: ``vq_head.json`` + ``vq_head.safetensors``.

    logits[..., v] = z[..., M[v]] + b[v] + ((h · Pᵀ) · Uᵀ)[..., v]        z = h · Cᵀ

``h`` is the model's final hidden state times its logit scale (1 for most models; 1 / ``logits_scaling`` for Granite,
``logit_scale`` for Cohere: ``vqexport.trunk.hf.logit_scale``), so that the output layer applied to it gives the
model's own logits. A model that soft-caps its logits (``final_logit_softcapping``: Gemma 2 and 4) caps these the
same way, ``cap * tanh(logits / cap)``: in the graph and in the reference, not in the head's files.

``vq_head.json`` (the head's own config; unknown keys are refused)::

    {"format": "vqexport-head", "format_version": 1, "type": "vq",
     "vocab_size": V, "hidden_size": d, "codebook_size": K, "bias": true, "rank": 0}

``vq_head.safetensors`` (float tensors float32 / float16 / bfloat16, read as float32; integer tensors int32 or int64):

    codebook   [K, d]   C
    map        [V]      M, integers in [0, K)
    bias       [V]      b (when "bias" is true)
    lowrank_p  [r, d]   P of the rank-r correction (when "rank" > 0)
    lowrank_u  [V, r]   U

A ``"type": "two-stage"`` head (``"cluster_size": cap``, ``"probes": P`` more) uses the same codebook as a router:
the P clusters with the best ``z`` get exact logits ``h · W[v]`` from the model's own output layer (the tied
embedding table or the dense lm_head: never stored here), every other token keeps ``z[M[v]] + b[v]`` (+ the rank-r
term). It stores ``members`` [K, cap] (the clusters' tokens, -1 padding; a partition of [0, V)) instead of ``map``,
which is derived from it. With ``"route_bias": true`` the clusters are ranked by ``z + route_bias`` ([K], a router
fitted by ``convert`` to the dense model's probability mass per cluster) instead of ``z``. A built artifact keeps a
two-stage head's ``vq_head.json`` alone, its tensors being in the graph (``write_artifact_head``).

numpy, json and safetensors only (no torch): apps and the ONNX side read heads too.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import VQExportError
from ..jsonfile import read_json_object
from ..safetensors_io import read_arrays, read_header, save_arrays

CONFIG_FILE = "vq_head.json"
WEIGHTS_FILE = "vq_head.safetensors"
FORMAT = "vqexport-head"
FORMAT_VERSION = 1
TYPES = ("vq", "two-stage")
FLOAT_DTYPES = ("F32", "F16", "BF16")
INT_DTYPES = ("I32", "I64")


@dataclass(frozen=True)
class HeadConfig:
    vocab_size: int
    hidden_size: int
    codebook_size: int
    bias: bool = True
    rank: int = 0
    type: str = "vq"
    cluster_size: int = 0  # two-stage: cap, the width of the member table
    probes: int = 0  # two-stage: P, how many clusters get exact logits
    route_bias: bool = False  # two-stage: the clusters are ranked by z + route_bias (a fitted router), not z

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self)}
        if self.type == "vq":  # a plain head's config has no two-stage keys
            del d["cluster_size"], d["probes"], d["route_bias"]
        return d

    @property
    def scored(self) -> int:
        """Logits computed per position: K codebook scores + the probed clusters' exact rows (two-stage)."""
        return self.codebook_size + self.probes * self.cluster_size

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "HeadConfig":
        return _parse(raw, where)


def expected_tensors(cfg: HeadConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """name -> (shape, allowed safetensors dtypes) for every tensor ``cfg`` implies."""
    V, d, K, r = cfg.vocab_size, cfg.hidden_size, cfg.codebook_size, cfg.rank
    out = {"codebook": ((K, d), FLOAT_DTYPES)}
    if cfg.type == "two-stage":
        out["members"] = ((K, cfg.cluster_size), INT_DTYPES)
        if cfg.route_bias:
            out["route_bias"] = ((K,), FLOAT_DTYPES)
    else:
        out["map"] = ((V,), INT_DTYPES)
    if cfg.bias:
        out["bias"] = ((V,), FLOAT_DTYPES)
    if r:
        out["lowrank_p"] = ((r, d), FLOAT_DTYPES)
        out["lowrank_u"] = ((V, r), FLOAT_DTYPES)
    return out


@dataclass
class Head:
    """A validated head: its config and float32 / int32 numpy tensors."""

    config: HeadConfig
    tensors: dict[str, np.ndarray]

    @property
    def config_only(self) -> bool:
        """A two-stage head as its artifact keeps it: the config, no tensors (``read_artifact_head``)."""
        return not self.tensors

    def _tensor(self, name: str) -> np.ndarray | None:
        if self.config_only:
            raise VQExportError(f"the head's {name} is not kept: an artifact of a two-stage head keeps its config alone "
                                "(every tensor of the head is in its graph)")
        return self.tensors.get(name)

    @property
    def codebook(self) -> np.ndarray:
        return self._tensor("codebook")

    @property
    def map(self) -> np.ndarray:
        return self._tensor("map")

    @property
    def bias(self) -> np.ndarray | None:
        return self._tensor("bias")

    @property
    def lowrank(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(P [r, d], U [V, r]), or None for the plain head."""
        return (self._tensor("lowrank_p"), self._tensor("lowrank_u")) if self.config.rank else None

    @property
    def members(self) -> np.ndarray:
        """[K, cap] int32: each cluster's tokens, -1 padding (a plain head's: ascending, computed from its map)."""
        if "members" in self.tensors:
            return self.tensors["members"]
        return members_of(self.map, self.config.codebook_size)

    @property
    def two_stage(self) -> bool:
        return self.config.type == "two-stage"

    @property
    def route_bias(self) -> np.ndarray | None:
        """[K] added to z to rank the clusters (a two-stage head with a fitted router), or None."""
        return self._tensor("route_bias")

    def route_scores(self, h: np.ndarray) -> np.ndarray:
        """The scores that pick the probed clusters (float64): z = h · Cᵀ, plus the router's bias when it has one."""
        z = np.asarray(h, dtype=np.float64) @ self.codebook.astype(np.float64).T
        return z if self.route_bias is None else z + self.route_bias

    def tail_logits(self, h: np.ndarray) -> np.ndarray:
        """The VQ logits (float64): h [..., d] -> z[M] + b (+ the rank-r term), every token."""
        h = np.asarray(h, dtype=np.float64)
        out = (h @ self.codebook.astype(np.float64).T)[..., self.map]
        if self.bias is not None:
            out = out + self.bias
        if self.lowrank is not None:
            p, u = self.lowrank
            out = out + (h @ p.astype(np.float64).T) @ u.astype(np.float64).T
        return out

    def logits(self, h: np.ndarray, rows: np.ndarray | None = None, rows_bias: np.ndarray | None = None,
               probes: int | None = None) -> np.ndarray:
        """The head's definition in numpy (float64): h [..., d] -> logits [..., V]. A two-stage head needs the
        model's output layer ``rows`` [V, d] (and its bias, if any): the best ``probes`` clusters by z get exact
        logits, ties between equal scores going to the lower cluster index."""
        out = self.tail_logits(h)
        if not self.two_stage:
            return out
        h = np.asarray(h, dtype=np.float64)
        P = self.config.probes if probes is None else probes
        top = np.argsort(-self.route_scores(h), axis=-1, kind="stable")[..., :P]  # [..., P]
        ids = self.members[top]  # [..., P, cap]
        flat_rows = rows.astype(np.float64)[np.where(ids >= 0, ids, 0)]  # [..., P, cap, d]
        exact = np.einsum("...d,...nd->...n", h, flat_rows.reshape(*ids.shape[:-2], ids.shape[-2] * ids.shape[-1], h.shape[-1]))
        if rows_bias is not None:
            exact = exact + rows_bias.astype(np.float64)[np.where(ids >= 0, ids, 0)].reshape(exact.shape)
        flat = ids.reshape(*ids.shape[:-2], ids.shape[-2] * ids.shape[-1])
        keep = flat >= 0
        lead = np.indices(flat.shape[:-1])
        idx = tuple(np.broadcast_to(a[..., None], flat.shape)[keep] for a in lead) + (flat[keep],)
        out[idx] = exact[keep]
        return out


def padded_members(head: "Head") -> np.ndarray:
    """The member table with every -1 replaced by a member of the same cluster (its first): the padded slots then
    hold a duplicate of a real token, whose exact logit is the same wherever it is written."""
    m = head.members.astype(np.int32)
    first = np.take_along_axis(m, np.argmax(m >= 0, axis=1)[:, None], axis=1)
    return np.where(m >= 0, m, first)


def members_of(mapping: np.ndarray, k: int, width: int | None = None) -> np.ndarray:
    """[K, width] int32: the tokens of each code in ascending order, -1 padding (width: the largest code)."""
    mapping = np.asarray(mapping, dtype=np.int64)
    order = np.argsort(mapping, kind="stable")
    counts = np.bincount(mapping, minlength=k)
    width = int(counts.max()) if width is None else width
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(mapping)) - starts[mapping[order]]
    out = np.full((k, width), -1, dtype=np.int32)
    out[mapping[order], rank] = order
    return out


def make_head(tensors: dict[str, np.ndarray], where: str = "head", probes: int = 0) -> Head:
    """A Head from arrays (``codebook``, ``map``, optional ``bias``, ``lowrank_p`` + ``lowrank_u``), validated.
    With ``probes`` > 0 a two-stage head (its member table derived from the map)."""
    if "codebook" not in tensors or ("map" not in tensors and "members" not in tensors):
        raise VQExportError(f"{where}: a head needs a codebook and a map")
    K, d = np.shape(tensors["codebook"])
    t = {k: np.asarray(v) for k, v in tensors.items()}
    rank = int(np.shape(t["lowrank_p"])[0]) if "lowrank_p" in t else 0
    if probes:
        if "members" not in t:
            t["members"] = members_of(t.pop("map"), int(K))
        V = int((t["members"] >= 0).sum())
        cfg = HeadConfig(vocab_size=V, hidden_size=int(d), codebook_size=int(K), bias="bias" in t, rank=rank,
                         type="two-stage", cluster_size=int(t["members"].shape[1]), probes=int(probes),
                         route_bias="route_bias" in t)
        _check_probes(cfg, where)
    else:
        V = int(np.shape(t["map"])[0])
        cfg = HeadConfig(vocab_size=V, hidden_size=int(d), codebook_size=int(K), bias="bias" in t, rank=rank)
    return Head(cfg, _checked(cfg, t, where))


def _check_probes(cfg: HeadConfig, where: str) -> None:
    check_probes(cfg.probes, cfg.codebook_size, f"{where}: probes", "codebook_size=")


def check_probes(probes, codebook_size: int, what: str = "--probes", size: str = "codebook size ") -> int:
    """``probes`` when it is an integer in [1, K], else a VQExportError naming ``what``."""
    if isinstance(probes, bool) or not isinstance(probes, (int, np.integer)) or not 1 <= probes <= codebook_size:
        raise VQExportError(f"{what} must be in [1, {size}{codebook_size}], got {probes!r}")
    return int(probes)


def _checked(cfg: HeadConfig, raw: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    expected = expected_tensors(cfg)
    missing = sorted(set(expected) - set(raw))
    if missing:
        raise VQExportError(f"{where}: missing tensor(s) {', '.join(missing)} required by {CONFIG_FILE}")
    extra = sorted(set(raw) - set(expected))
    if extra:
        raise VQExportError(f"{where}: unexpected tensor(s) {', '.join(extra)} not described by {CONFIG_FILE}")
    out = {}
    for name, (shape, _) in expected.items():
        arr = raw[name]
        if tuple(arr.shape) != shape:
            raise VQExportError(f"{where}: tensor {name} has shape {list(arr.shape)}, {CONFIG_FILE} implies {list(shape)}")
        if name == "members":
            out["members"], out["map"] = _partition(arr, cfg, where)
            continue
        if name == "map":
            if not np.issubdtype(arr.dtype, np.integer):
                raise VQExportError(f"{where}: tensor map has dtype {arr.dtype}, expected integers")
            bad = np.flatnonzero((arr < 0) | (arr >= cfg.codebook_size))
            if bad.size:
                raise VQExportError(f"{where}: map[{int(bad[0])}] = {int(arr[bad[0]])} is outside [0, codebook_size={cfg.codebook_size})")
            out[name] = np.ascontiguousarray(arr, dtype=np.int32)
            continue
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            bad = np.unravel_index(int(np.flatnonzero(~np.isfinite(arr))[0]), arr.shape)
            raise VQExportError(f"{where}: tensor {name} has a non-finite value at index {list(map(int, bad))}")
        out[name] = arr
    return out


def _partition(members: np.ndarray, cfg: HeadConfig, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A member table must hold every token of [0, V) exactly once (-1 pads a short cluster); returns it and the map."""
    if not np.issubdtype(members.dtype, np.integer):
        raise VQExportError(f"{where}: tensor members has dtype {members.dtype}, expected integers")
    V = cfg.vocab_size
    flat = members.reshape(-1).astype(np.int64)
    bad = np.flatnonzero((flat < -1) | (flat >= V))
    if bad.size:
        raise VQExportError(f"{where}: members holds {int(flat[bad[0]])}, outside [0, vocab_size={V}) (-1 pads)")
    ids = flat[flat >= 0]
    counts = np.bincount(ids, minlength=V)
    if (counts > 1).any():
        raise VQExportError(f"{where}: members is not a partition of [0, {V}): token {int(np.flatnonzero(counts > 1)[0])} is in "
                            "more than one place")
    if (counts == 0).any():
        raise VQExportError(f"{where}: members is not a partition of [0, {V}): token {int(np.flatnonzero(counts == 0)[0])} is in "
                            "no cluster")
    empty = np.flatnonzero((members < 0).all(axis=1))
    if empty.size:
        raise VQExportError(f"{where}: cluster {int(empty[0])} of members has no token")
    mapping = np.empty(V, np.int32)
    rows = np.repeat(np.arange(members.shape[0]), members.shape[1])
    mapping[ids] = rows[flat >= 0]
    return np.ascontiguousarray(members, dtype=np.int32), mapping


def has_head(directory: Path) -> bool:
    return (Path(directory) / CONFIG_FILE).exists() or (Path(directory) / WEIGHTS_FILE).exists()


def read_head(directory: Path) -> Head | None:
    """The head beside a model (None when the directory has neither head file); every problem is one line."""
    directory = Path(directory)
    cfg_file, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_file.exists() and not weights.exists():
        return None
    if not cfg_file.exists():
        raise VQExportError(f"{weights}: head weights without their config {CONFIG_FILE}; both files make a head")
    cfg = read_head_config(directory)
    if not weights.exists():
        kept = (" (a two-stage head's artifact keeps its config alone: read_artifact_head reads it)"
                if cfg.type == "two-stage" else "")
        raise VQExportError(f"{cfg_file}: head config without its weights {WEIGHTS_FILE}; both files make a head{kept}")
    header = read_header(weights)
    for name, (shape, dtypes) in expected_tensors(cfg).items():
        if name in header and header[name]["dtype"] not in dtypes:
            kind = "integer" if dtypes == INT_DTYPES else "floating-point"
            raise VQExportError(f"{weights}: tensor {name} has dtype {header[name]['dtype']}, expected {kind} ({', '.join(dtypes)})")
    arrays, _ = read_arrays(weights)
    return Head(cfg, _checked(cfg, arrays, str(weights)))


def read_head_config(directory: Path) -> HeadConfig:
    """The config of the head beside a model or in an artifact (``vq_head.json`` only; one line on a problem)."""
    cfg_file = Path(directory) / CONFIG_FILE
    return _parse(read_json_object(cfg_file), str(cfg_file))


def write_head(directory: Path, head: Head) -> None:
    """Write ``vq_head.json`` and ``vq_head.safetensors`` (same head -> same bytes)."""
    directory = Path(directory)
    (directory / CONFIG_FILE).write_text(head.config.to_json(), encoding="utf-8")
    stored = expected_tensors(head.config)  # a two-stage head's map is derived, not stored
    save_arrays(directory / WEIGHTS_FILE, {k: v for k, v in head.tensors.items() if k in stored}, metadata={"format": FORMAT})


def write_artifact_head(artifact: Path, head: Head) -> None:
    """The head's definition an artifact keeps for its tools: a plain head whole (exact sampling reads its map and
    bias, its dense twin its codebook); a two-stage head's ``vq_head.json`` alone. Every tensor of a two-stage head
    is in the graph, and its dense twin is the model's own rows, so its tensors would be dead weight: the fp32
    codebook alone is K x d x 4 bytes (34 MB at the Qwen2.5-0.5B shape)."""
    if head.two_stage:
        Path(artifact, CONFIG_FILE).write_text(head.config.to_json(), encoding="utf-8")
    else:
        write_head(artifact, head)


def read_artifact_head(artifact: Path) -> Head:
    """The head an artifact keeps (``write_artifact_head``): a two-stage head may be its config alone, and is then a
    ``Head`` with no tensors (``config_only``: what its dense twin needs; reading a tensor of it is an error); an
    artifact built when the tensors were kept reads whole."""
    artifact = Path(artifact)
    cfg_file = artifact / CONFIG_FILE
    if cfg_file.is_file() and not (artifact / WEIGHTS_FILE).exists():
        cfg = read_head_config(artifact)
        if cfg.type == "two-stage":
            return Head(cfg, {})
    head = read_head(artifact)
    if head is None:
        raise VQExportError(f"{artifact}: the head's definition is missing ({CONFIG_FILE}, and a plain head's {WEIGHTS_FILE}); "
                            "rebuild the artifact")
    return head


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _parse(raw: dict, where: str) -> HeadConfig:
    def fail(msg: str):
        raise VQExportError(f"{where}: {msg}")

    if raw.get("format", FORMAT) != FORMAT:
        fail(f"format is {raw.get('format')!r}, expected {FORMAT!r}")
    if raw.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        fail(f"format_version {raw.get('format_version')!r} is not supported (this vqexport reads {FORMAT_VERSION})")
    known = {"format", "format_version", "type", "vocab_size", "hidden_size", "codebook_size", "bias", "rank",
             "cluster_size", "probes", "route_bias"}
    unknown = sorted(set(raw) - known)
    if unknown:
        fail(f"unknown key(s): {', '.join(unknown)}")
    htype = raw.get("type", "vq")
    if htype not in TYPES:
        fail(f"type must be one of {', '.join(TYPES)}, got {htype!r}")
    kw = {}
    for name in ("vocab_size", "hidden_size", "codebook_size"):
        if name not in raw:
            fail(f"missing key {name!r}")
        if not _is_int(raw[name]) or raw[name] < 1:
            fail(f"{name} must be an integer >= 1, got {raw[name]!r}")
        kw[name] = raw[name]
    if kw["codebook_size"] > kw["vocab_size"]:
        fail(f"codebook_size must be in [1, vocab_size={kw['vocab_size']}], got {kw['codebook_size']}")
    bias = raw.get("bias", True)
    if not isinstance(bias, bool):
        fail(f"bias must be true or false, got {bias!r}")
    rank = raw.get("rank", 0)
    if not _is_int(rank):
        fail(f"rank must be an integer, got {type(rank).__name__} {rank!r}")
    if not 0 <= rank <= min(kw["vocab_size"], kw["hidden_size"]):
        fail(f"rank must be in [0, min(vocab_size, hidden_size) = {min(kw['vocab_size'], kw['hidden_size'])}], got {rank}")
    extra = {}
    if htype == "two-stage":
        for name in ("cluster_size", "probes"):
            if name not in raw:
                fail(f"missing key {name!r} (a two-stage head needs cluster_size and probes)")
            if not _is_int(raw[name]) or raw[name] < 1:
                fail(f"{name} must be an integer >= 1, got {raw[name]!r}")
            extra[name] = raw[name]
        route_bias = raw.get("route_bias", False)
        if not isinstance(route_bias, bool):
            fail(f"route_bias must be true or false, got {route_bias!r}")
        extra["route_bias"] = route_bias
        if extra["cluster_size"] * kw["codebook_size"] < kw["vocab_size"]:
            fail(f"codebook_size x cluster_size = {extra['cluster_size'] * kw['codebook_size']} cannot hold vocab_size "
                 f"{kw['vocab_size']} tokens")
    else:
        stray = sorted({"cluster_size", "probes", "route_bias"} & set(raw))
        if stray:
            fail(f"{', '.join(stray)} applies to a two-stage head only")
    cfg = HeadConfig(type=htype, bias=bias, rank=rank, **kw, **extra)
    if htype == "two-stage":
        _check_probes(cfg, where)
    return cfg

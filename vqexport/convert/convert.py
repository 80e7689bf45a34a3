"""``convert``: a Hugging Face model directory -> the same model with a VQ-Logits head beside it.

The trunk's files (config, weights, tokenizer) are copied byte for byte; only ``vq_head.json``,
``vq_head.safetensors`` and ``MODEL_CARD.md`` are new. Seeded and deterministic.

    1. map       M = clustering of the dense output layer's rows W [V, d] into K codes (vqexport.convert.clustering:
                 k-means, euclidean or spherical, optionally size-balanced, or with text euclidean in the metric of
                 the hidden states' covariance; with --clustering auto every method is measured on held-out text and
                 the lowest perplexity kept; a two-stage head's clusters are of equal size, with text in that
                 metric: equal-metric)
    2. codebook  C[k] = mean of the rows in code k
    3. bias      b[v] = b_dense[v] + (W[v] - C[M[v]]) . mean hidden state   (with --no-bias: none)
    3b. rank r   optional correction (h·Pᵀ)·Uᵀ: the best rank-r fit U P of the residual W - C[M]
    4. distill   optionally train C, b (and P, U) on a text file so the VQ head matches the dense model's
                 next-token distribution (KL); the trunk stays frozen (and untouched on disk). A two-stage head
                 instead fits its router (C and a per-cluster route bias, vqexport.convert.router) to the dense
                 model's probability mass per cluster and refits b to the new codebook; a rank-r tail is fitted to
                 the residual, then distilled with the two-stage KL (router and rows fixed)
    5. report    held-out perplexity of dense vs VQ and top-1 agreement, written into MODEL_CARD.md

The hidden states come from transformers' own model of the directory (any architecture it loads as a causal LM).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..artifact import staged_dir
from ..errors import VQExportError
from ..head.module import DenseHead, VQLogitsHead, head_logits, head_module
from ..head.spec import HeadConfig, check_probes, expected_tensors, write_head
from ..source import Source, load_source
from .clustering import EQUAL, EQUAL_METRIC, IN_METRIC, METHODS, METRIC, NAMED, cluster, state_metric
from .init import head_from_assignment
from .router import distill_tail, fit_router, hidden_pool, kl_step, positions_within_budget, refit_tail_bias

SEQ = 128
HEAD_POSITIONS = 8 * SEQ  # positions at a time when measuring: through the trunk, and at most through the heads
# (fewer where their [positions, V] logits would pass router.LOGIT_BUDGET)
HELD_OUT = 0.1  # the distillation text's last tenth is held out


def _split(n: int) -> int:
    """Where a text of ``n`` tokens splits into training and held-out tokens."""
    return int(n * (1 - HELD_OUT))


def _two_windows(n: int) -> bool:
    """Both sides of the split hold two windows and the token after them."""
    return (_split(n) - 1) // SEQ >= 2 and (n - _split(n) - 1) // SEQ >= 2


MIN_TEXT_TOKENS = next(n for n in range(2 * SEQ + 1, 64 * SEQ) if _two_windows(n))
CARD = "MODEL_CARD.md"


@dataclass
class ConvertResult:
    out: Path
    report: dict


def _noop(label: str, done: int, total: int) -> None:
    pass


def _check_inputs(src: Path, k: int, out: Path, text: Path | None, rank: int = 0) -> Source:
    if out.exists():
        raise VQExportError(f"{out}: already exists; choose a new --out directory")
    import os

    parent = out.resolve().parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise VQExportError(f"{parent}: cannot write the new model directory there")
    source = load_source(src, need_head=False, read_heads=False)
    V, d = source.geometry.vocab_size, source.geometry.hidden_size
    if not 1 <= k <= V:
        raise VQExportError(f"--codebook-size must be in [1, vocab size {V}], got {k}")
    if not 0 <= rank <= min(V, d):
        raise VQExportError(f"--rank must be in [0, min(vocab size, hidden size) = {min(V, d)}], got {rank}")
    if text is not None and source.tokenizer_path is None:
        raise VQExportError(f"{src}: --distill-text needs the model's tokenizer.json")
    return source


def _read_tokens(text: Path, tokenizer_path: Path, purpose: str = "distillation", min_tokens: int = MIN_TEXT_TOKENS) -> np.ndarray:
    from tokenizers import Tokenizer

    try:
        raw = text.read_bytes()
    except OSError as e:
        raise VQExportError(f"{text}: cannot read the {purpose} text ({e.strerror})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VQExportError(f"{text}: not UTF-8 text (bad byte at offset {e.start})") from None
    ids = np.asarray(Tokenizer.from_file(str(tokenizer_path)).encode(content).ids, dtype=np.int64)
    if len(ids) < min_tokens:
        raise VQExportError(f"{text}: too short for {purpose} ({len(ids)} tokens; need at least {min_tokens})")
    return ids


def _windows(ids: np.ndarray) -> torch.Tensor:
    n = (len(ids) - 1) // SEQ
    return torch.from_numpy(ids[: n * SEQ + 1].copy())


def _batches(ids: torch.Tensor, batch: int, gen: torch.Generator):
    """Endless (inputs, next tokens) batches of ``batch`` windows of SEQ tokens, each drawn at a uniformly random start
    among every window the text holds (the last one ends at the text's last token)."""
    n = len(ids) - SEQ  # starts 0 .. len - SEQ - 1: a window needs SEQ + 1 tokens
    while True:
        starts = torch.randint(n, (batch,), generator=gen)
        chunk = torch.stack([ids[s : s + SEQ + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


class _Hidden:
    """The trunk's final hidden states for token windows (transformers' decoder, frozen)."""

    def __init__(self, trunk, geo):
        self.trunk, self.geo = trunk, geo

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        past = self.trunk.empty_past(x.shape[0])
        return self.trunk(x, torch.ones_like(x), *past)[0]


def _scored(hidden: _Hidden, ids: torch.Tensor, cache: dict | None, seq: int = SEQ, positions: int = HEAD_POSITIONS,
            progress=None):
    """(hidden states [N, d], next tokens [N]) of the text in windows of ``seq`` tokens (each window's first token has
    no context), at most ``positions`` at a time whatever the window. ``cache`` (a dict kept across calls with the
    same ids) keeps the trunk's hidden states for the next call. ``progress(done, total)``: positions scored so far
    (each chunk counted when the caller asks for the next)."""
    n = (len(ids) - 1) // seq
    done, total = 0, n * seq
    if progress is not None:
        progress(done, total)
    x = ids[: n * seq].view(n, seq)
    y = ids[1 : n * seq + 1].view(n, seq)
    step = max(1, HEAD_POSITIONS // seq)  # windows through the trunk at a time
    for i in range(0, n, step):
        h = None if cache is None else cache.get((seq, i))
        if h is None:
            h = hidden(x[i : i + step])
            if cache is not None:
                cache[(seq, i)] = h
        h, targets = h.flatten(0, -2), y[i : i + step].flatten()
        for j in range(0, len(targets), positions):
            yield h[j : j + positions], targets[j : j + positions]
            done += len(targets[j : j + positions])
            if progress is not None:
                progress(done, total)


ENTROPY_BANDS = (1.0, 2.0, 3.0, 4.0, 5.0)  # nats: the edges of ``evaluate``'s bands of dense entropy


@torch.no_grad()
def evaluate(hidden: _Hidden, dense: DenseHead, vq: VQLogitsHead, ids: torch.Tensor, cache: dict | None = None,
             ideal: bool = False, seq: int = SEQ, by_entropy: bool = False, progress=None) -> dict:
    """Held-out perplexity of the dense and the VQ head on the same hidden states, top-1 agreement and KL; for a
    two-stage head also ``probe_recall``: the share of positions whose dense argmax fell inside the probed clusters,
    and with ``ideal`` the perplexity change and top-1 agreement of the same head probing, instead of its router's
    choice, the P clusters that hold the most dense probability (``ideal_routing_*``: about the best a router could
    do with this tail; choosing by mass is not guaranteed optimal for perplexity).
    With ``by_entropy``, ``by_dense_entropy`` breaks the figures down by the dense distribution's entropy at each
    position (bands between ENTROPY_BANDS): how the cost grows where the dense model is unsure.
    The text is scored in windows of ``seq`` tokens (``_scored``; ``cache`` keeps the hidden states; ``progress(done,
    total)`` counts positions)."""
    nll_d = nll_v = agree = kl = recall = nll_i = agree_i = 0.0
    count = 0
    probes = getattr(vq, "probes", 0)
    ideal = ideal and bool(probes)
    bands = _Bands(bool(probes)) if by_entropy else None
    for h, target in _scored(hidden, ids, cache, seq, positions_within_budget(dense.weight.shape[0], HEAD_POSITIONS), progress):
        dl = dense(h)
        ld, lv = F.log_softmax(dense.cap(dl), -1), F.log_softmax(dense.cap(head_logits(vq, h, dense, dl)), -1)
        nll_d += float(F.nll_loss(ld, target, reduction="sum"))
        nll_v += float(F.nll_loss(lv, target, reduction="sum"))
        kl += float(F.kl_div(lv, ld, log_target=True, reduction="sum"))
        best = ld.argmax(-1)
        same = best == lv.argmax(-1)
        agree += float(same.sum())
        hits = probe_hits(vq, h, best, probes) if probes else None
        if probes:
            recall += float(hits.sum())
        if bands is not None:
            bands.add(ld, lv, target, same, hits)
        if ideal:
            li = F.log_softmax(dense.cap(ideally_routed(vq, h, dense, dl, ld)), -1)
            nll_i += float(F.nll_loss(li, target, reduction="sum"))
            agree_i += float((best == li.argmax(-1)).sum())
            del li
        del dl, ld, lv  # before the next chunk's: each is [positions, V]
        count += len(target)
    ppl_d, ppl_v = math.exp(nll_d / count), math.exp(nll_v / count)
    out = {"dense_ppl": ppl_d, "vq_ppl": ppl_v, "ppl_change": ppl_v / ppl_d - 1, "top1_agreement": agree / count,
           "kl_to_dense": kl / count, "tokens": count}
    if probes:
        out["probes"], out["probe_recall"] = probes, recall / count
    if ideal:
        out["ideal_routing_ppl_change"] = math.exp(nll_i / count) / ppl_d - 1
        out["ideal_routing_top1_agreement"] = agree_i / count
    if bands is not None:
        out["by_dense_entropy"] = bands.report(count)
    return out


class _Bands:
    """``evaluate``'s figures per band of dense entropy (nats): [0, 1), [1, 2), ... [5, inf)."""

    def __init__(self, probes: bool):
        self.edges, self.probes = torch.tensor(ENTROPY_BANDS), probes
        self.sums = torch.zeros(5 if probes else 4, len(ENTROPY_BANDS) + 1, dtype=torch.float64)  # n, nll d, nll v, agree, hits

    def add(self, ld: torch.Tensor, lv: torch.Tensor, target: torch.Tensor, same: torch.Tensor, hits: torch.Tensor | None) -> None:
        rows = ld.reshape(-1, ld.shape[-1])
        entropy = -torch.bmm(rows.exp().unsqueeze(1), rows.unsqueeze(2)).flatten()  # one V-wide tensor, not two
        band = torch.bucketize(entropy, self.edges, right=True)  # edges[i-1] <= entropy < edges[i]
        t = target.reshape(-1, 1)
        values = [torch.ones_like(entropy), -rows.gather(-1, t).flatten(), -lv.reshape(rows.shape).gather(-1, t).flatten(),
                  same.flatten().to(entropy.dtype)] + ([hits.flatten().to(entropy.dtype)] if hits is not None else [])
        for i, v in enumerate(values):
            self.sums[i].index_add_(0, band, v.double())

    def report(self, count: int) -> list[dict]:
        lows, highs = (0.0, *ENTROPY_BANDS), (*ENTROPY_BANDS, None)
        out = []
        for b, (lo, hi) in enumerate(zip(lows, highs)):
            n = float(self.sums[0, b])
            row = {"entropy_from": lo, "entropy_to": hi, "tokens": int(n), "share": n / count}
            if n:
                ppl_d, ppl_v = math.exp(float(self.sums[1, b]) / n), math.exp(float(self.sums[2, b]) / n)
                row.update(dense_ppl=ppl_d, vq_ppl=ppl_v, ppl_change=ppl_v / ppl_d - 1, top1_agreement=float(self.sums[3, b]) / n)
                if self.probes:
                    row["probe_recall"] = float(self.sums[4, b]) / n
            out.append(row)
        return out


@torch.no_grad()
def ideally_routed(head, h: torch.Tensor, dense: DenseHead, dense_logits: torch.Tensor,
                   dense_logp: torch.Tensor) -> torch.Tensor:
    """A two-stage head's logits when it probes the P clusters holding the most dense probability (``dense``'s logits
    on ``h`` and their log-softmax) instead of its router's choice: its tail unchanged."""
    mass = torch.zeros(*dense_logp.shape[:-1], head.config.codebook_size).index_add_(-1, head.map, dense_logp.exp())
    return head_logits(head, h, dense, dense_logits, top=torch.topk(mass, head.probes, dim=-1).indices)


def probe_hits(head: VQLogitsHead, h: torch.Tensor, tokens: torch.Tensor, probes: int) -> torch.Tensor:
    """Booleans [...]: is each token's cluster among the ``probes`` best clusters by router score at its position?"""
    top = torch.topk(head.route_scores(h), probes, dim=-1).indices
    return (top == head.map[tokens].unsqueeze(-1)).any(-1)


@torch.no_grad()
def probe_ranks(hidden: _Hidden, dense: DenseHead, head: VQLogitsHead, ids: torch.Tensor, cache: dict,
                progress=None) -> torch.Tensor:
    """[K] counts: how many held-out positions have their dense argmax in the cluster ranked r-th by the router. A
    cluster tied with others counts as ranked after all of them (TopK probes only some of a tie). ``progress(done,
    total)`` counts positions."""
    K = head.config.codebook_size
    counts = torch.zeros(K, dtype=torch.float64)
    for h, _ in _scored(hidden, ids, cache, positions=positions_within_budget(dense.weight.shape[0], HEAD_POSITIONS),
                        progress=progress):
        target = dense(h).argmax(-1)
        score = head.route_scores(h)
        rank = (score >= score.gather(-1, head.map[target].unsqueeze(-1))).sum(-1) - 1
        counts += torch.bincount(rank.reshape(-1), minlength=K).to(torch.float64)
    return counts


def recall_curve(hidden: _Hidden, dense: DenseHead, head: VQLogitsHead, ids: torch.Tensor, cache: dict) -> dict[int, float]:
    """probes P -> share of held-out positions whose dense argmax lies in the P best clusters by router score
    (P = 1, 2, 4, ... K)."""
    return recall_at_powers_of_two(probe_ranks(hidden, dense, head, ids, cache))


def _recall(ranks: torch.Tensor) -> torch.Tensor:
    """[K]: the share of the positions ``ranks`` counts whose dense argmax lies in the P = 1 ... K best clusters."""
    return ranks.cumsum(0) / ranks.sum()


def recall_at_powers_of_two(ranks: torch.Tensor) -> dict[int, float]:
    K, recall = len(ranks), _recall(ranks)
    return {p: float(recall[p - 1]) for p in sorted({min(2**i, K) for i in range(K.bit_length() + 1)})}


def fewest_probes(ranks: torch.Tensor, goal: float) -> int:
    """The fewest probes whose clusters hold the dense argmax at ``goal`` of the positions ``ranks`` counts."""
    return int(torch.searchsorted(_recall(ranks), torch.tensor([goal - 1e-12], dtype=torch.float64)).item()) + 1


RECALL_GOAL = 0.995  # the recommended probes: the fewest whose probed clusters hold the dense argmax this often
# Above this share of V computed per position a two-stage head saves little: at the Qwen2.5-0.5B shape its int8-row
# form at 18.8% of V runs 1.08x the dense int4 layer on CPU (docs/two-stage.md, "Speed"); the report says so.
COSTLY_SHARE = 0.25


def costly_probes_note(probes: int, scored: int, vocab: int, recommended: bool, codebook_size: int) -> str | None:
    """One line when P probes compute more than COSTLY_SHARE of the vocabulary's logits per position, else None."""
    if scored <= COSTLY_SHARE * vocab:
        return None
    note = (f"P = {probes} computes {scored:,} logits per position ({codebook_size:,} cluster scores and "
            f"{scored - codebook_size:,} exact), {100 * scored / vocab:.1f}% of V = {vocab:,}, more than "
            f"{COSTLY_SHARE:.0%}, where a two-stage head is no faster than a dense int4 output layer on CPU")
    if recommended:
        note += ("; the router does not narrow the vocabulary on this model and text (more text or --steps may help; "
                 "a smaller --probes trades quality for speed)")
    return note


def _init_head(cfg: HeadConfig, weight: torch.Tensor, dense_bias, assign: torch.Tensor, mean_h: torch.Tensor) -> VQLogitsHead:
    head = VQLogitsHead(cfg)
    codebook, mapping, bias = head_from_assignment(weight, dense_bias, assign, cfg.codebook_size, mean_h)
    with torch.no_grad():
        head.codebook.copy_(codebook)
        head.map.copy_(mapping.long())
        if head.bias is not None:
            head.bias.copy_(bias)
    return head.eval()


ROWS_AT_ONCE = 16384  # rows of the residual W - C[M] in float64 at a time (init_lowrank): 117 MB at d = 896


def init_lowrank(head: VQLogitsHead, weight: torch.Tensor, mean_h: torch.Tensor | None = None) -> dict:
    """U, P from the best rank-r fit of the residual E = W - C[M] (what the codebook misses): with the top r
    eigenvectors Q [d, r] of EᵀE (E's right singular vectors), P = Qᵀ [r, d] and U = E Q [V, r] = U_r S_r.
    The eigendecomposition is of a d x d matrix, so the cost is one pass over E, not an SVD of V x d; E is formed in
    float64 ROWS_AT_ONCE rows at a time, never whole (at V = 262,144, d = 1,152 it would be 2.4 GB a copy).

    The bias was set so that the head equals the dense head at the mean hidden state h̄; the correction adds
    U P h̄ there, so that much comes off the bias again. Deterministic on one machine (each eigenvector's sign
    is fixed: largest |entry| positive); another BLAS may round differently. Returns the residual's size
    relative to W before and after the fit."""
    r, d = head.lowrank_p.shape
    codebook = head.codebook.detach().double()

    def residual_rows():
        for i in range(0, len(weight), ROWS_AT_ONCE):
            rows = weight[i : i + ROWS_AT_ONCE].double()
            yield i, rows, rows - codebook[head.map[i : i + ROWS_AT_ONCE]]

    with torch.no_grad():
        gram = torch.zeros(d, d, dtype=torch.float64)
        for _, _, e in residual_rows():
            gram.addmm_(e.T, e)
        _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues
        q = vecs[:, -r:].flip(1)  # [d, r], largest first
        sign = torch.sign(q[q.abs().argmax(0), torch.arange(r)])
        sign[sign == 0] = 1
        q = q * sign
        norms = torch.zeros(3, dtype=torch.float64)  # squared norms of W, E and E - U P
        for i, rows, e in residual_rows():
            u = e @ q
            head.lowrank_u[i : i + len(u)] = u.float()
            if head.bias is not None and mean_h is not None:
                head.bias[i : i + len(u)] -= (u @ (q.T @ mean_h.double())).float()
            norms += torch.stack([rows.pow(2).sum(), e.pow(2).sum(), e.sub_(u @ q.T).pow(2).sum()])
        head.lowrank_p.copy_(q.T.float())
        norm, before, after = norms.sqrt().tolist()
    return {"residual_vs_weight": before / norm, "residual_after_lowrank_vs_weight": after / norm}


def _distill(hidden: _Hidden, dense: DenseHead, vq: VQLogitsHead, ids: torch.Tensor, steps: int, seed: int, progress) -> None:
    """Head-only KL distillation: the VQ head learns the dense head's next-token distribution on the same hidden states."""
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in vq.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)
    it = _batches(ids, max(1, positions_within_budget(vq.config.vocab_size, 8 * SEQ) // SEQ), gen)  # windows a step
    vq.train()
    for step in range(steps):
        x, _ = next(it)
        loss = kl_step(vq, dense, hidden(x), opt)
        progress(f"distilling (KL {loss:.3f})", step + 1, steps)
    vq.eval()


def convert(src, codebook_size: int, out, bias: bool = True, distill_text=None, steps: int | None = None, seed: int = 0,
            clustering: str = "auto", rank: int = 0, head: str = "vq", probes: int | None = None, progress=_noop) -> ConvertResult:
    """Write the model directory ``src`` to ``out`` (atomically) with a VQ-Logits head of ``codebook_size`` codes
    beside it; ``rank`` > 0 adds the rank-r correction (fitted to the residual, then distilled with the head).

    ``clustering = "auto"`` tries every method of clustering.METHODS, and METRIC when there is text, and keeps the
    lowest held-out perplexity (without text, the lowest reconstruction error). The metric methods take the states'
    covariance from the router's pool (router.hidden_pool: as many windows of the training text as 256 MiB of states
    hold, spread evenly over it), whether a router is fitted or not.

    ``head = "two-stage"``: equal-size clusters (auto: in the metric of the text's hidden states, ``equal-metric``;
    without text spherical, ``equal-spherical``); with text, ``steps`` (default 300) of router fitting
    on it (``steps = 0`` or no text: training-free, clusters ranked by z alone); the tail's bias from the mean hidden
    state; ``probes`` recommended from the held-out recall curve (the fewest P whose clusters hold the dense argmax
    at RECALL_GOAL of positions; K/16 without text)."""
    from ..trunk.hf import load_causal_lm, make_trunk, output_bias, output_weight

    from ..source import DEMO_NAME, demo_dir

    src, out = (demo_dir() if str(src) == DEMO_NAME else Path(src)), Path(out)
    text = Path(distill_text) if distill_text is not None else None
    if head not in ("vq", "two-stage"):
        raise VQExportError(f"--head must be 'vq' or 'two-stage', got {head!r}")
    two_stage = head == "two-stage"
    steps_given, steps = steps is not None, 300 if steps is None else steps
    if clustering not in ("auto", *NAMED):
        raise VQExportError(f"--clustering must be one of auto, {', '.join(NAMED)}; got {clustering!r}")
    if clustering in IN_METRIC and text is None:
        raise VQExportError(f"--clustering {clustering} clusters in the metric of the model's hidden states: it needs --distill-text")
    if clustering == "auto" and two_stage:
        clustering = EQUAL_METRIC if text is not None else EQUAL
    if two_stage and clustering not in (EQUAL, EQUAL_METRIC):
        raise VQExportError(f"--head two-stage needs equal-size clusters (its member table and every probe's cost are set "
                            f"by the largest): --clustering auto, {EQUAL} or {EQUAL_METRIC}; got {clustering!r}")
    if probes is not None:
        probes = check_probes(probes, codebook_size)
    if probes is not None and not two_stage:
        raise VQExportError("--probes applies to --head two-stage only")
    if steps < 0:
        raise VQExportError(f"--steps must be >= 0, got {steps}")
    if steps and text is None and steps_given:
        raise VQExportError(f"--steps {steps} trains on --distill-text, and none was given")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise VQExportError(f"--rank must be an integer, got {rank!r}")
    source = _check_inputs(src, codebook_size, out, text, rank)
    ids = _read_tokens(text, source.tokenizer_path) if text is not None else None
    torch.manual_seed(seed)
    progress(f"loading the {source.model_type} model with transformers", 0, 1)
    model = load_causal_lm(source)
    for p in model.parameters():
        p.requires_grad_(False)
    trunk = make_trunk(source, model)
    hidden = _Hidden(trunk, source.geometry)
    weight = output_weight(model).detach().float()
    dense_b = output_bias(model, trunk.hidden_scale)
    dense = DenseHead(weight, dense_b, source.geometry.logit_softcap)
    dense_bias = dense_b.detach().float() if dense_b is not None else None
    V, d = weight.shape

    held = train = None
    if ids is not None:
        cut = _split(len(ids))  # _read_tokens saw to it that both sides hold two windows
        train, held = _windows(ids[:cut]), _windows(ids[cut:])
        sample = next(_batches(train, 16, torch.Generator().manual_seed(seed)))[0]
        mean_h = hidden(sample).reshape(-1, d).mean(0)
    else:
        mean_h = torch.zeros(d)

    plain = HeadConfig(vocab_size=V, hidden_size=d, codebook_size=codebook_size, bias=bias)
    variants = [clustering] if clustering != "auto" else [*METHODS, METRIC] if ids is not None else list(METHODS)
    in_metric = any(name in IN_METRIC for name in variants)
    fit_route = two_stage and ids is not None and steps > 0
    pool = metric = None
    if in_metric or fit_route:
        pool = hidden_pool(hidden, train, SEQ, progress=progress)  # once: the metric's states and the router's pool
        metric = state_metric(pool, progress=_labelled(progress, "covariance of the hidden states")) if in_metric else None
        pool = pool if fit_route else None
    scores, shared, held_h = {}, {}, {}  # shared: the balanced variants start from the k-means of their geometry
    chosen, vq, measured = None, None, {}
    # A lone candidate that a router or a rank-r term will change is not measured (minutes at V = 152k): the head
    # measured below is that one, and there is nothing to choose.
    measure_candidates = len(variants) > 1 or not (fit_route or rank)
    for i, name in enumerate(variants):
        which = f" {i + 1} of {len(variants)}" if len(variants) > 1 else ""
        label = f"clustering{which}: {V:,} rows into {codebook_size:,} codes ({name}), passes"
        assign = cluster(weight, codebook_size, name, seed=seed, _cache=shared, metric=metric,
                         progress=_labelled(progress, label))
        candidate = _init_head(plain, weight, dense_bias, assign, mean_h)
        if held is not None and measure_candidates:
            measured[name] = evaluate(hidden, dense, candidate, held, held_h,
                                      progress=_labelled(progress, f"held-out perplexity of the {name} head, positions"))
            scores[name] = measured[name]["vq_ppl"]
        elif held is None:
            scores[name] = _reconstruction_error(weight, candidate)
        if chosen is None or scores[name] < scores[chosen]:  # a lone candidate is chosen unscored
            chosen, vq = name, candidate
    shared.clear()
    route = None
    if fit_route:
        route = fit_router(vq, dense, pool, steps, seed, progress)
        refit_tail_bias(vq, weight, dense_bias, mean_h)
    lowrank = None
    if rank:
        progress(f"fitting the rank-{rank} correction to the residual", 0, 1)
        with_rank = VQLogitsHead(HeadConfig(vocab_size=V, hidden_size=d, codebook_size=codebook_size, bias=bias, rank=rank))
        with_rank.load_state_dict(vq.state_dict(), strict=False)
        vq = with_rank.eval()
        lowrank = init_lowrank(vq, weight, mean_h)
    before = after = None
    if held is not None:  # each measured once: the chosen clustering's head is measured again only if it changed
        before = measured[chosen] if route is None and not rank else evaluate(
            hidden, dense, vq, held, held_h, progress=_labelled(progress, "held-out perplexity of the head, positions"))
        after = before
    note = None
    if ids is not None and steps and not two_stage:
        _distill(hidden, dense, vq, train, steps, seed, progress)
        after = evaluate(hidden, dense, vq, held, held_h,
                         progress=_labelled(progress, "held-out perplexity of the distilled head, positions"))
        if not after["vq_ppl"] <= before["vq_ppl"]:  # worse, or not a number
            note = (f"distillation raised the held-out perplexity by {100 * (after['vq_ppl'] / before['vq_ppl'] - 1):+.3g}% "
                    f"(from {before['vq_ppl']:.6g} to {after['vq_ppl']:.6g}), and the head written is the distilled one: more "
                    f"text or more --steps may help, --steps 0 keeps the head before distillation")
    for p in vq.parameters():
        p.requires_grad_(False)
    report = {"source": str(src.resolve()), "out": str(out.resolve()), "architecture": source.model_type, "head": head,
              "codebook_size": codebook_size, "bias": bias, "rank": rank, "clustering": chosen, "clustering_scores": scores,
              "clustering_score": None if not scores else "held-out perplexity" if held is not None else "mean squared distance of head rows to their code",
              "distill_steps": steps if ids is not None and not two_stage else 0, "lowrank_init": lowrank,
              **({"router_steps": steps if ids is not None else 0} if two_stage else {}),
              "seed": seed, "before_distillation": before, "after_distillation": after, **({"note": note} if note else {})}
    result = vq.to_head()
    if two_stage:
        tail_steps = steps if rank and pool is not None else 0  # a rank-r tail is distilled, like the plain head's
        result, stage = _two_stage(vq, route, weight, dense_b, hidden, dense, held, held_h, probes, progress,
                                   pool=pool, tail_steps=tail_steps, seed=seed)
        report["tail_distill_steps"] = tail_steps
        report.update(stage)
    _write(out, source, result, report)
    return ConvertResult(out=out, report=report)


def _two_stage(vq: VQLogitsHead, route, weight, dense_b, hidden, dense, held, held_h, probes, progress, pool=None,
               tail_steps: int = 0, seed: int = 0) -> tuple:
    """The two-stage head over ``vq`` (its codebook routes, plus the fitted ``route`` bias if any; the model's rows
    rescore): probes chosen from the held-out recall curve unless given; ``tail_steps`` of tail distillation at that
    P on the hidden-state ``pool``; its fidelity on held-out text."""
    cfg = vq.config
    cap = math.ceil(cfg.vocab_size / cfg.codebook_size)
    sizes = torch.bincount(vq.map, minlength=cfg.codebook_size)
    cap = max(cap, int(sizes.max()))
    stage: dict = {"cluster_size": cap}
    if held is not None:
        router = head_module(vq.to_head(probes=1, cluster_size=cap, route_bias=route), weight, dense_b)
        ranks = probe_ranks(hidden, dense, router, held, held_h,
                            progress=_labelled(progress, "measuring the probe recall curve, positions"))
        stage["recall_curve"] = {str(p): r for p, r in recall_at_powers_of_two(ranks).items()}
        recommended = min(fewest_probes(ranks, RECALL_GOAL), cfg.codebook_size)
    else:
        recommended = max(1, cfg.codebook_size // 16)
    P = probes or recommended
    head = vq.to_head(probes=P, cluster_size=cap, route_bias=route)
    if tail_steps:
        module = head_module(head, weight, dense_b)
        distill_tail(module, dense, pool, tail_steps, seed, progress)
        head = module.to_head(probes=P, cluster_size=cap, route_bias=module.route_bias)
    stage.update(probes=P, probes_recommended=recommended, scored=head.config.scored,
                 scored_share=head.config.scored / cfg.vocab_size)
    note = costly_probes_note(P, head.config.scored, cfg.vocab_size, recommended=probes is None and held is not None,
                              codebook_size=cfg.codebook_size)
    if note:
        stage["note"] = note
    if held is not None:
        stage["two_stage"] = evaluate(hidden, dense, head_module(head, weight, dense_b), held, held_h,
                                      progress=_labelled(progress, f"measuring two-stage fidelity at P = {P}, positions"))
    return head, stage


def _labelled(progress, label: str):
    """``progress(label, done, total)`` as a ``progress(done, total)`` of one stage."""
    return lambda done, total: progress(label, done, total)


def _reconstruction_error(weight: torch.Tensor, head: VQLogitsHead) -> float:
    """Without text: mean squared distance of the head rows to their codebook rows."""
    with torch.no_grad():
        return float((weight - head.codebook[head.map]).pow(2).sum(1).mean())


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # weights in pickle formats: never passed on


def _write(out: Path, source: Source, head, report: dict) -> None:
    """The files of the source directory's top level, unchanged (chat template, license, ... included; pickled
    weights left out), and the new head beside them (any head the source had is replaced)."""
    from ..head.spec import CONFIG_FILE, WEIGHTS_FILE

    with staged_dir(out) as tmp:
        for f in sorted(source.path.iterdir()):
            if f.is_file() and f.name not in (CONFIG_FILE, WEIGHTS_FILE, CARD) and f.suffix not in PICKLED:
                shutil.copyfile(f, tmp / f.name)
        write_head(tmp, head)
        (tmp / CARD).write_text(model_card(report, head.config), encoding="utf-8")


_TENSOR_WORDS = {"codebook": "codebook", "map": "token map", "members": "member table", "route_bias": "route bias",
                 "bias": "bias", "lowrank_p": "P", "lowrank_u": "U"}


def model_card(report: dict, cfg: HeadConfig) -> str:
    V, d, K, r = cfg.vocab_size, cfg.hidden_size, cfg.codebook_size, cfg.rank
    distilled = ", then distilled" if report.get("tail_distill_steps", report["distill_steps"]) else ""
    stored = {name: math.prod(shape) for name, (shape, _) in expected_tensors(cfg).items()}
    head_vq = sum(stored.values())  # the head's own tensors, as inspect counts them
    what = ", ".join(_TENSOR_WORDS.get(name, name) for name in stored)
    head_dense = V * d
    lines = [
        "# VQ-Logits conversion", "",
        f"Converted from `{report['source']}` ({report['architecture']}) by `vqexport convert` (seed {report['seed']}). "
        "The trunk's files are the source's, unchanged; the head is `vq_head.json` + `vq_head.safetensors`.", "",
        "| | |", "|---|---|",
        f"| codebook | K = {K} codes for V = {V} tokens (clustering: {report['clustering']}) |",
        f"| bias | {'per-token bias' if cfg.bias else 'none'} |",
        f"| low-rank correction | {f'rank {r}: P [{r}, {d}], U [{V}, {r}], fitted to the residual W - C[M]{distilled}' if r else 'none'} |",
    ]
    two_stage = cfg.type == "two-stage"
    if two_stage:
        lines.append(f"| head parameters | {head_vq:,} of its own ({what}; the member table is [{K}, {cfg.cluster_size}]); "
                     f"stage 2 reads the model's own output layer ({head_dense:,} parameters, V x d), not stored in the head |")
    else:
        lines.append(f"| head parameters | {head_vq:,} ({what}) vs {head_dense:,} in the dense output layer's V x d weight "
                     f"({100 * (1 - head_vq / head_dense):.1f}% fewer) |")
    if two_stage:
        steps, tail = report.get("router_steps", 0), report.get("tail_distill_steps", 0)
        lines.append(f"| router | {f'codebook and route bias fitted to the dense cluster mass, {steps} steps' if steps else 'none: clusters ranked by codebook score (training-free)'} |")
        lines.append(f"| tail distillation (trunk frozen) | {f'{tail} steps on the two-stage distribution' if tail else 'none'} |")
    else:
        lines.append(f"| head-only distillation (trunk frozen) | {report['distill_steps']} steps |")
    lines.append("")
    measured = ((("every token its VQ logit (no probes)", "before_distillation"),) if two_stage else
                (("after conversion", "before_distillation"), ("after distillation", "after_distillation")))
    for label, key in measured:
        m = report.get(key)
        if m:
            lines.append(f"Held-out ({m['tokens']} tokens), {label}: dense ppl {m['dense_ppl']:.2f}, VQ ppl {m['vq_ppl']:.2f} "
                         f"({100 * m['ppl_change']:+.1f}%), top-1 agreement {m['top1_agreement']:.3f}, "
                         f"KL(dense || VQ) {m['kl_to_dense']:.4f} nats/token.")
    if not report.get("before_distillation"):
        lines.append("No text was given, so no perplexity was measured.")
    if report.get("note") and not two_stage:
        lines += ["", f"**Note:** {report['note']}."]
    chosen = ((["the clustering"] if len(report["clustering_scores"]) > 1 else [])
              + (["P"] if two_stage and report.get("probes") == report.get("probes_recommended") else []))
    if report.get("before_distillation") and chosen:
        lines += ["", f"The held-out text also chose {' and '.join(chosen)}, so its figures are somewhat optimistic; "
                      "`vqexport fidelity` on other text measures the head on text that chose nothing."]
    if two_stage:
        lines += ["", "## Two-stage head", "",
                  f"The codebook routes: the P = {cfg.probes} best clusters by {'router' if cfg.route_bias else 'codebook'} score (clusters of {cfg.cluster_size} "
                  f"tokens) get exact logits from the model's own output layer; every other token keeps its VQ logit. "
                  f"{cfg.scored:,} of {V:,} logits are computed per position ({100 * cfg.scored / V:.1f}%); "
                  + (f"P recommended from the held-out recall (the fewest probes whose clusters hold the dense argmax at "
                     f"{100 * RECALL_GOAL:g}% of positions, every P counted; the curve below at powers of two): "
                     if report.get("recall_curve") else "P recommended without text, where no recall can be measured: K/16 = ")
                  + f"{report.get('probes_recommended')}."]
        if report.get("note"):
            lines += ["", f"**Note:** {report['note']}."]
        m = report.get("two_stage")
        if m:
            lines += ["", f"Held-out ({m['tokens']} tokens) at P = {m['probes']}: dense ppl {m['dense_ppl']:.2f}, two-stage ppl "
                          f"{m['vq_ppl']:.2f} ({100 * m['ppl_change']:+.2f}%), top-1 agreement {m['top1_agreement']:.4f}, "
                          f"dense argmax inside the probed clusters {m['probe_recall']:.4f}, KL(dense || two-stage) "
                          f"{m['kl_to_dense']:.5f} nats/token."]
        curve = report.get("recall_curve")
        if curve:
            lines += ["", "| probes P | logits computed | dense argmax inside the probed clusters |", "|---|---|---|"]
            lines += [f"| {p} | {100 * (K + int(p) * cfg.cluster_size) / V:.1f}% of V | {r:.4f} |" for p, r in curve.items()]
    return "\n".join(lines) + "\n"

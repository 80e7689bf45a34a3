"""Parity: the same prompts through a reference Runner and a target Runner, compared step by step.

Prefill the (left-padded) prompt batch, then ``steps`` greedy decode steps. The next token is the
reference's greedy choice, fed to both runners, each of which keeps its own KV cache. Reported, in the
spirit of Polygraphy's comparator: max abs / rel logit difference, the atol and rtol that would have been
needed, top-1 agreement, top-5 overlap, mean KL(reference || target), and how many decode steps from the
first were fed a token the target would have chosen too in every row (the first step's: the prefill's greedy token).

Rankings are tie-aware: when the reference gives several tokens exactly the same logit (a VQ head without a bias
gives every member of a cluster its code's score), any of them is a correct argmax or k-th token, and the target
is not failed for picking another one of them. "Exactly" is within ``TIE`` (relative) in the reference's float32.

Routing is tie-aware too. A two-stage head probes the P clusters with the best route scores, and where the P-th and
the next score are closer than the tolerance allows a target's scores to move (2 · (atol + rtol · |score|): each side
may move by the logit tolerance, atol grown as below where it grew), a correct target may probe either. Its probed
tokens then carry exact logits where the reference's carry VQ logits, or the reverse: differences of whole logits,
not rounding. Each such near-tied cluster is compared whole against the routing the target chose (all its tokens
exact, or all VQ), with exactly P clusters probed in all; every other cluster must match the reference as it is.
The reference runner gives the parts (``Runner.routing``).

The logits' tolerance is the target's ``atol``, or ``reference_error_factor`` times the reference's own float32
error, whichever is larger. That error is measured only when ``atol`` is not met: the same prompts and decode steps
through the same model in float64 (``rounding_error``, ``with_reference_error``). Deep models can carry more
float32 rounding than a fixed ``atol`` allows PyTorch itself; a target within a few times PyTorch's own error of it
computes the model as well as PyTorch does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .backends.base import Routing, Runner
from .profiles import Parity
from .prompts import left_pad

@dataclass
class ParityReport:
    target: str
    passed: bool
    max_abs_diff: float
    max_rel_diff: float
    required_atol: float
    required_rtol: float
    top1_agreement: float
    top5_overlap: float
    kl_divergence: float
    kl_divergence_max: float
    present_max_abs_diff: float
    greedy_match_steps: int
    steps: int
    batch: int
    positions: int
    compared: str = "logits"  # "logits" | "topk" (log-probs of the target's top-k ids; KL over clusters)
    rerouted_positions: int = 0  # two-stage: positions where the target probed a near-tied cluster otherwise
    misrouted_positions: int = 0  # two-stage: positions where the target probed clusters outside the near-tie band
    misrouted_atol: float = 0.0  # the atol whose near-tie band would have held those clusters (0: none)
    nonfinite_values: int = 0  # non-finite target values where the reference is finite
    allowed_atol: float = 0.0  # the logits' tolerance applied: atol, or the reference's own error times its factor
    reference_error: float | None = None  # max |float32 - float64 reference| on the same steps, when measured
    reference_error_note: str = ""  # why the reference's own error was not measured
    reference: str = "fp32 PyTorch: transformers' model of the directory + the head's torch module"
    tolerances: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


TIE = 1e-6


def _tied_at_or_above(ref: np.ndarray, chosen: np.ndarray, rank: int) -> np.ndarray:
    """[N, c] booleans: does the reference rank each chosen token at or above its ``rank``-th best logit (ties
    counted as equal)? ``ref`` [N, V], ``chosen`` [N, c] token ids."""
    kth = -np.partition(-ref, rank - 1, axis=-1)[:, rank - 1 : rank]
    got = np.take_along_axis(ref, chosen, -1)
    return got >= kth - TIE * np.maximum(1.0, np.abs(kth))


def _routed_as_target(ref: np.ndarray, parts: dict, tgt: dict, routing: Routing | None,
                      parity: Parity) -> tuple[np.ndarray, int, list[float]]:
    """The reference logits [N, V] with the near-tied clusters (see the module's docstring) routed as the target
    routed them, how many positions that changed, and ``_misrouted``'s atol for each position where the target
    probed clusters outside the band.

    At each position the clusters above the band are probed and those below are not; of the band's clusters
    exactly as many are probed as the reference probed there (P in all). Which ones follows the target's values on
    each cluster's observed tokens (all of them for a logits output, its top-k ids for a top-k output): the clusters
    whose values are nearest their exact logits, each cluster whole; band clusters with no observed token are
    filled by router score. The result is always a routing of P clusters that scores within the tolerance allow, so
    a target probing more or fewer clusters, or half a cluster, still fails."""
    scores = parts.get("route_scores")
    if routing is None or scores is None or routing.probes >= scores.shape[-1]:
        return ref, 0, []
    observed, values = _observed(ref, tgt)
    exact, vq, clusters, P = parts["exact_logits"], parts["vq_logits"], routing.clusters, routing.probes
    out, rerouted, misrouted = ref, 0, []
    for n in range(ref.shape[0]):
        s = scores[n].astype(np.float64)
        part = np.partition(-s, [P - 1, P])
        hi, lo = -part[P - 1], -part[P]
        rtol_part = parity.rtol * max(abs(hi), abs(lo))
        slack = 2.0 * (parity.atol + rtol_part)
        band = np.nonzero((s >= hi - slack) & (s <= lo + slack))[0]  # the P-th and next cluster, if they nearly tie
        if len(band) >= 2:
            probed = P - int((s > lo + slack).sum())  # of the band's clusters: as many as the reference probed
            tokens = np.nonzero(np.isin(clusters, band))[0]  # the band's tokens
            chosen = _probed_in_band(band, probed, s, clusters, tokens[observed[n, tokens]], values[n], exact[n], vq[n])
            after = np.where(np.isin(clusters[tokens], chosen), exact[n, tokens], vq[n, tokens])
            if not np.array_equal(ref[n, tokens], after, equal_nan=True):
                if out is ref:
                    out = ref.copy()
                out[n, tokens] = after
                rerouted += 1
        gap = _misrouted(s, hi, lo, clusters, observed[n], values[n], exact[n], vq[n], out[n], parity)
        if gap > slack:
            misrouted.append(max(gap / 2.0 - rtol_part, 0.0))
    return out, rerouted, misrouted


def _misrouted(s, hi: float, lo: float, clusters, observed, values, exact, vq, ref, parity: Parity) -> float:
    """How far from the P-th / next route score (``hi`` / ``lo``) the clusters lie whose observed values the target
    gave as the other routing (exact logits where ``ref``, the reference as compared, has VQ ones, or the reverse):
    0 when there are none. A cluster counts when its worst token misses the reference's value by more than the
    tolerance (atol + rtol · |value|) and by more than 4 times the median cluster's miss (the target's rounding: the
    other clusters route as the reference), and the other routing's value by at most half as much, and its exact and
    VQ logits lie at least 10 tolerances apart (a routing, not rounding, difference)."""
    tokens = np.nonzero(observed & (exact != vq))[0]
    miss = np.abs(values[tokens] - ref[tokens])
    tol = parity.atol + parity.rtol * np.abs(ref[tokens])
    if not (miss > tol).any():  # every value within the tolerance: nothing to explain (a passing check's positions)
        return 0.0
    K = len(s)
    cl = clusters[tokens]
    was_exact = ref[tokens] == exact[tokens]
    other = np.where(was_exact, vq[tokens], exact[tokens])
    err_ref, err_other = np.zeros(K), np.zeros(K)
    over, apart = np.full(K, -np.inf), np.full(K, -np.inf)
    np.maximum.at(err_ref, cl, miss)
    np.maximum.at(err_other, cl, np.abs(values[tokens] - other))
    np.maximum.at(over, cl, miss - tol)
    np.maximum.at(apart, cl, np.abs(exact[tokens] - vq[tokens]) - 10.0 * tol)
    rounding = float(np.median(err_ref[np.unique(cl)]))
    swapped = np.nonzero((over > 0) & (apart > 0) & (err_ref > 4.0 * rounding) & (err_other <= 0.5 * err_ref))[0]
    if not len(swapped):
        return 0.0
    probed = np.zeros(K, dtype=bool)
    probed[cl[was_exact]] = True  # clusters the reference (as compared) gives exact logits
    gaps = np.where(probed[swapped], s[swapped] - lo, hi - s[swapped])
    return float(np.max(gaps))


def _probed_in_band(band, probed: int, s, clusters, tokens, values, exact, vq) -> np.ndarray:
    """The ``probed`` clusters of ``band`` the target's values say it probed: by how much nearer its values are
    to the exact logits than to the VQ ones (the worst of each cluster's observed ``tokens``), observed clusters
    first."""
    K = len(s)
    err_exact, err_vq, seen = np.zeros(K), np.zeros(K), np.zeros(K, dtype=bool)
    cl = clusters[tokens]
    np.maximum.at(err_exact, cl, np.abs(values[tokens] - exact[tokens]))
    np.maximum.at(err_vq, cl, np.abs(values[tokens] - vq[tokens]))
    seen[cl] = True
    watched, unseen = band[seen[band]], band[~seen[band]]
    prefer = np.nan_to_num(err_vq[watched] - err_exact[watched], nan=-np.inf)  # > 0: nearer the exact logits
    # as many observed clusters probed as the target shows, within what the unobserved ones leave possible
    count = min(max(int((prefer > 0).sum()), probed - len(unseen)), probed, len(watched))
    take = watched[np.argsort(-prefer, kind="stable")[:count]]
    fill = unseen[np.argsort(-s[unseen], kind="stable")[: probed - count]]
    return np.concatenate([take, fill])


def _observed(ref: np.ndarray, tgt: dict) -> tuple[np.ndarray, np.ndarray]:
    """Which tokens' logits the target shows, and their values. A top-k output's log-probabilities become logits
    by the offset that best matches the reference on its own top-k ids (the median difference: the target's
    normaliser may differ from the reference's where it routed otherwise)."""
    if tgt.get("logits") is not None:
        return np.ones(ref.shape, dtype=bool), tgt["logits"]
    ids = tgt["topk_ids"]
    lp = tgt["topk_logprobs"].astype(np.float64)
    offset = np.median(np.take_along_axis(ref.astype(np.float64), ids, -1) - lp, axis=-1, keepdims=True)
    observed, values = np.zeros(ref.shape, dtype=bool), np.zeros(ref.shape, dtype=np.float64)
    np.put_along_axis(observed, ids, True, -1)
    np.put_along_axis(values, ids, lp + offset, -1)
    return observed, values


def _round_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits (a tolerance to suggest: the rounded value still holds)."""
    if x <= 0 or not np.isfinite(x):
        return x
    step = 10.0 ** (np.floor(np.log10(x)) - digits + 1)
    return float(f"{np.ceil(x / step) * step:.{digits}g}")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class _Stats:
    def __init__(self, parity: Parity, mapping: np.ndarray | None):
        self.p = parity
        self.mapping = mapping
        self.max_abs = self.max_rel = self.req_atol = self.req_rtol = 0.0
        self.top1 = self.top5 = self.n = 0
        self.kl_sum = self.kl_max = 0.0
        self.present_max = 0.0
        self.nonfinite = 0
        self.rerouted = 0
        self.misrouted: list[float] = []
        self.compared = "logits"

    def _diff(self, ref: np.ndarray, tgt: np.ndarray) -> None:
        ref64, tgt64 = ref.astype(np.float64), tgt.astype(np.float64)
        with np.errstate(invalid="ignore"):
            diff = np.where(tgt64 == ref64, 0.0, np.abs(tgt64 - ref64))  # equal infinities match
        diff = np.where(np.isnan(diff), np.inf, diff)  # a NaN never matches
        self.nonfinite += int((~np.isfinite(tgt64) & np.isfinite(ref64)).sum())
        mag = np.abs(ref64)
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_rel = max(self.max_rel, float((diff / np.maximum(mag, 1e-12)).max()))
        self.req_atol = max(self.req_atol, float((diff - self.p.rtol * mag).max()))
        with np.errstate(divide="ignore", invalid="ignore"):
            rel_needed = np.where(diff > self.p.atol, (diff - self.p.atol) / mag, 0.0)
        self.req_rtol = max(self.req_rtol, float(np.nan_to_num(rel_needed, nan=np.inf, posinf=np.inf).max()))

    def _kl(self, lp: np.ndarray, lq: np.ndarray) -> None:
        p = np.exp(lp)
        with np.errstate(invalid="ignore"):
            kl = np.where(p > 0, p * (lp - lq), 0.0).sum(-1)
        kl = np.where(np.isnan(kl), np.inf, kl)  # NaN in the target is an infinite divergence, not zero
        self.kl_sum += float(kl.sum())
        self.kl_max = max(self.kl_max, float(kl.max()))

    def add(self, ref: np.ndarray, rerouted: int, misrouted: list[float], tgt: dict) -> None:
        """ref: [N, V] reference logits as compared (``rerouted`` positions with near-tied clusters routed as the
        target routed them; ``misrouted``: the atol that would have held each position's clusters the target probed
        outside the band); tgt: the target's outputs for the same N positions."""
        self.rerouted += rerouted
        self.misrouted += misrouted
        k = min(5, ref.shape[-1]) if tgt.get("logits") is not None else min(5, ref.shape[-1], tgt["topk_ids"].shape[-1])
        lp = _log_softmax(ref)  # a top-k graph with k < 5 is compared on its k ids
        if tgt.get("logits") is not None:
            logits = tgt["logits"]
            self._diff(ref, logits)
            t5 = np.argpartition(-logits, k - 1, axis=-1)[:, :k]
            self.top1 += int(_tied_at_or_above(ref, logits.argmax(-1)[:, None], 1).sum())
            self._kl(lp, _log_softmax(logits))
        else:  # exact top-k outputs: compare log-probabilities of the ids the target chose, and cluster mass
            self.compared = "topk"
            ids = tgt["topk_ids"]
            self._diff(np.take_along_axis(lp, ids, -1), tgt["topk_logprobs"])
            t5 = ids[:, :k]
            self.top1 += int(_tied_at_or_above(ref, ids[:, :1], 1).sum())
            if tgt.get("cluster_logprobs") is not None:
                ref_clusters = np.stack([np.bincount(self.mapping, weights=np.exp(row), minlength=tgt["cluster_logprobs"].shape[-1]) for row in lp])
                with np.errstate(divide="ignore"):
                    self._kl(np.log(ref_clusters), tgt["cluster_logprobs"].astype(np.float64))
            else:  # a head with a rank-r correction: KL over {each of the target's top-k ids, every other token}
                self._kl(_with_rest(np.take_along_axis(lp, ids, -1)), _with_rest(tgt["topk_logprobs"].astype(np.float64)))
        self.top5 += float(_tied_at_or_above(ref, t5, k).sum()) / k
        self.n += ref.shape[0]


def _with_rest(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities of k tokens plus one entry for the remaining mass (floored at 1e-12: float32 top-k
    probabilities can sum to a hair over 1 when they hold nearly all the mass)."""
    rest = np.log(np.clip(1.0 - np.exp(logp).sum(-1, keepdims=True), 1e-12, None))
    return np.concatenate([logp, rest], axis=-1)


_PER_POSITION = ("logits", "topk_ids", "topk_logprobs", "cluster_logprobs")
CHUNK = 1 << 22  # values per [n, V] block of positions compared at once: 16 positions at V = 262k (the float64
# arrays of a comparison are tens of MB then, not GBs; a long prompt's prefill is compared block by block)


def _select(out) -> dict:
    """The target's per-position outputs (``StepOutput.at`` of the positions compared)."""
    picked = {"logits": out.logits, **out.extra}
    return {name: picked[name] for name in _PER_POSITION if picked.get(name) is not None}


def _blocks(b: np.ndarray, s: np.ndarray, vocab: int):
    """(b, s) position pairs in blocks of at most ``CHUNK`` values of a [n, vocab] array."""
    n = max(1, CHUNK // max(vocab, 1))
    for i in range(0, len(b), n):
        yield b[i : i + n], s[i : i + n]


def _compared_positions(out, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of a prefill compared: every real (unpadded) one, or each row's last where ``out`` covers the
    last position only."""
    if out.length == mask.shape[1]:
        return np.nonzero(mask.astype(bool))
    return np.arange(mask.shape[0]), np.full(mask.shape[0], -1)


def _lockstep(reference: Runner, target: Runner, prompts: list[list[int]], steps: int, pad_id: int = 0):
    """Prefill one (left-padded) batch of ``prompts`` through both runners, then ``steps`` greedy decode steps on the
    reference's tokens, each runner with its own KV cache. Yields (step, reference output, target output, mask):
    step 0 is the prefill (``Runner.prefill``: read it by positions), ``mask`` the attention mask of that step."""
    ids, mask = left_pad(prompts, pad_id)
    batch = ids.shape[0]
    r = reference.prefill(ids, mask, reference.empty_past(batch))
    t = target.prefill(ids, mask, target.empty_past(batch))
    yield 0, r, t, mask
    for step in range(1, steps + 1):
        nxt = r.last().logits.argmax(-1)[:, None]
        mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        r, t = reference.step(nxt, mask, r.present), target.step(nxt, mask, t.present)
        yield step, r, t, mask


def _run(reference: Runner, target: Runner, prompts: list[list[int]], steps: int, stats, pad_id: int, tick) -> int:
    """Prefill one (left-padded) batch, then ``steps`` greedy decode steps; returns how many decode steps matched: those
    before the first whose token (the reference's greedy choice at the step before, the prefill's for the first)
    the target would not have chosen."""
    greedy_ok, matched = True, 0
    for step, r, t, mask in _lockstep(reference, target, prompts, steps, pad_id):
        last = _select(t.last())
        ref_last = _reference_rows(r.last(), last, reference.routing, stats.p)
        if step < steps:  # this step's greedy token is the next step's input
            greedy_ok = greedy_ok and bool(_tied_at_or_above(ref_last[0], _greedy(last)[:, None], 1).all())
            matched += int(greedy_ok)
        if step == 0:
            for b, s in _blocks(*_compared_positions(t, mask), reference.vocab_size):
                tgt = _select(t.at(b, s))
                stats.add(*_reference_rows(r.at(b, s), tgt, reference.routing, stats.p), tgt=tgt)
            continue
        stats.add(*ref_last, tgt=last)
        tick(step)
    # the KV cache at real positions only: a padded position's keys are masked out and may differ freely
    real = mask.astype(bool)[:, None, :, None]
    diffs = [float(np.where(real, np.abs(a - b), 0.0).max()) for a, b in zip(r.present, t.present) if a.size]
    stats.present_max = max([stats.present_max, *diffs])
    return matched


def _reference_rows(r, tgt: dict, routing: Routing | None, parity: Parity) -> tuple[np.ndarray, int, list[float]]:
    """The reference's logits at the positions of ``r`` (``StepOutput.at``) as compared (routed as the target routed
    near-tied clusters), how many of those positions that rerouted, and the misrouted positions' atols
    (``_routed_as_target``)."""
    parts = {k: v for k, v in r.extra.items() if k in ("route_scores", "exact_logits", "vq_logits")}
    return _routed_as_target(r.logits, parts, tgt, routing, parity)


def _greedy(last: dict) -> np.ndarray:
    """The target's greedy tokens from its outputs at the last positions (``_select``)."""
    if "logits" in last:
        return last["logits"].argmax(-1)
    return last["topk_ids"][:, 0]


def compare_runners(reference: Runner, target: Runner, prompts: list[list[int]], steps: int, parity: Parity,
                    target_name: str | None = None, pad_id: int = 0, progress=None,
                    mapping: np.ndarray | None = None, batched: bool = True) -> ParityReport:
    """Run both runners (already entered) on the same prompts and decode steps; return the report.

    ``batched``: the prompts go in as one left-padded batch; else one at a time (graphs whose attention kernel
    takes no left padding, such as onnxruntime-genai's GroupQueryAttention). ``mapping`` (the head's token -> code
    map) is needed only for targets that output exact top-k instead of logits: their KL is measured over the K
    clusters.
    """
    stats = _Stats(parity, mapping)
    groups = [prompts] if batched else [[p] for p in prompts]
    matched = steps
    for g, group in enumerate(groups):
        def tick(i, g=g):
            if progress is not None:
                progress(g * steps + i, len(groups) * steps)

        matched = min(matched, _run(reference, target, group, steps, stats, pad_id, tick))
    batch = len(prompts)
    report = ParityReport(
        target=target_name or target.name, passed=False, max_abs_diff=stats.max_abs, max_rel_diff=stats.max_rel,
        required_atol=max(stats.req_atol, 0.0), required_rtol=stats.req_rtol, top1_agreement=stats.top1 / stats.n,
        top5_overlap=stats.top5 / stats.n, kl_divergence=max(stats.kl_sum / stats.n, 0.0),
        kl_divergence_max=max(stats.kl_max, 0.0), present_max_abs_diff=stats.present_max, greedy_match_steps=matched,
        steps=steps, batch=batch, positions=stats.n, compared=stats.compared, rerouted_positions=stats.rerouted,
        misrouted_positions=len(stats.misrouted), misrouted_atol=_round_up(max(stats.misrouted, default=0.0)),
        nonfinite_values=stats.nonfinite, allowed_atol=parity.atol, tolerances=asdict(parity),
    )
    return judged(report, parity)


def verify_runners(reference: Runner, target: Runner, prompts: list[list[int]], steps: int, parity: Parity,
                   reference_error=None, **compare) -> ParityReport:
    """``compare_runners`` of ``reference`` (entered) and ``target`` (entered here for each comparison, and left
    again: its memory is free while the reference's own error is measured).

    ``reference_error``: a callable giving (error, note), the reference's own float32 error (see
    ``with_reference_error``); called only when ``atol`` is missed. Where the tolerance then grows and the reference
    routes (a two-stage head), the comparison runs again with the grown tolerance: the band of near-tied clusters a
    correct target may probe either way is as wide as the tolerance lets route scores move."""
    def run(p: Parity) -> ParityReport:
        with target as tgt:
            return compare_runners(reference, tgt, prompts, steps, p, **compare)

    report = run(parity)
    if reference_error is None or not needs_reference_error(report, parity):
        return report
    error, note = reference_error()
    report = with_reference_error(report, parity, error, note)
    if not report.passed and reference.routing is not None and report.allowed_atol > parity.atol:
        wider = run(replace(parity, atol=report.allowed_atol))
        report = with_reference_error(replace(wider, tolerances=asdict(parity)), parity, error, note)
    return report


_PARTS = ("exact_logits", "vq_logits", "route_scores")  # what a routing head's logits are made of


def rounding_error(reference: Runner, exact: Runner, prompts: list[list[int]], steps: int) -> float:
    """The largest difference between ``reference`` and ``exact`` (the same model, computed more exactly) over the
    values each step's logits are made of: the logits, or a routing head's exact and VQ logits and route scores.
    Those do not depend on the routing: where rounding moves a near-tied P-th cluster, the logits themselves differ
    by whole logits, which is no measure of rounding. The prompts go in one at a time (no padding); both runners
    decode the reference's greedy tokens. A non-finite difference is infinite."""
    worst = 0.0

    def compare(a, b):
        names = [k for k in _PARTS if k in a.extra] if reference.routing is not None else []
        pairs = [(a.extra[k], b.extra[k]) for k in names] if names else [(a.logits, b.logits)]
        with np.errstate(invalid="ignore"):
            diffs = [np.abs(x.astype(np.float64) - y.astype(np.float64)).max() for x, y in pairs]
        return max(float(d) if np.isfinite(d) else np.inf for d in diffs)

    for prompt in prompts:
        for step, r, e, mask in _lockstep(reference, exact, [prompt], steps):
            positions = _compared_positions(r, mask) if step == 0 else (np.zeros(1, dtype=int), np.full(1, -1))
            for b, s in _blocks(*positions, reference.vocab_size):
                worst = max(worst, compare(r.at(b, s), e.at(b, s)))
    return worst


def needs_reference_error(report: ParityReport, parity: Parity) -> bool:
    """Whether the reference's own float32 error could change the verdict: ``atol`` is not met and the target's
    tolerance may grow with that error."""
    return parity.reference_error_factor > 0 and report.required_atol > parity.atol and not report.nonfinite_values


def with_reference_error(report: ParityReport, parity: Parity, error: float | None, note: str = "") -> ParityReport:
    """``report`` judged again with the reference's own float32 error (``error``: ``rounding_error`` against the
    model in float64 on the same steps; None when it could not be measured, ``note`` says why)."""
    if error is not None and not np.isfinite(error):
        error, note = None, "the float64 reference gave non-finite logits"
    allowed = parity.atol if error is None else max(parity.atol, parity.reference_error_factor * error)
    return judged(replace(report, reference_error=error, reference_error_note=note, allowed_atol=allowed), parity)


def judged(report: ParityReport, parity: Parity) -> ParityReport:
    """``report`` with its failures (and verdict) from ``parity``'s tolerances and its ``allowed_atol``."""
    r, failures = report, []
    if r.nonfinite_values:
        failures.append(f"the target produced {r.nonfinite_values} non-finite values where the reference is finite")
    if r.required_atol > r.allowed_atol:
        if r.reference_error is not None:
            allowed = (f"allowed atol {r.allowed_atol:.3g}: the larger of {parity.atol:g} and {parity.reference_error_factor:g} x "
                       f"PyTorch's own float32 error {r.reference_error:.3g}")
        else:
            allowed = f"allowed atol {parity.atol:g}" + (f"; PyTorch's own float32 error not measured: {r.reference_error_note}"
                                                          if r.reference_error_note else "")
        failures.append(f"{r.compared} differ by up to {r.max_abs_diff:.3g} (needs atol {r.required_atol:.3g} at rtol "
                        f"{parity.rtol:g}; {allowed})")
        if r.misrouted_positions:
            where = f"{r.misrouted_positions} position" + ("s" if r.misrouted_positions > 1 else "")
            failures[-1] += (f"; at {where} the target probed clusters whose route scores "
                             f"lie outside the near-tie band of the reference's P-th, so whole clusters differ by their "
                             f"exact-vs-VQ gap: an atol of {r.misrouted_atol:.3g} would count them as near-ties")
    if r.top1_agreement < parity.top1_agreement_min:
        failures.append(f"top-1 agreement {r.top1_agreement:.4f} < {parity.top1_agreement_min}")
    if r.top5_overlap < parity.top5_overlap_min:
        failures.append(f"top-5 overlap {r.top5_overlap:.4f} < {parity.top5_overlap_min}")
    if r.kl_divergence > parity.kl_max:
        failures.append(f"mean KL {r.kl_divergence:.3g} > {parity.kl_max:g}")
    if parity.greedy_must_match and r.greedy_match_steps < r.steps:
        failures.append(f"greedy tokens diverge at decode step {r.greedy_match_steps + 1} of {r.steps} (the target "
                        "would have fed it another token)")
    shares = [f for f in failures if f.startswith(("top-1 agreement", "top-5 overlap"))]
    if shares and r.steps < parity.steps:  # a share of few positions moves a lot with one of them
        failures[failures.index(shares[-1])] += (f" (judged on {r.positions} positions; this target's tolerances are set for "
                                                 f"its {parity.steps} decode steps)")
    rankings = ("top-1 agreement", "top-5 overlap", "greedy tokens")
    if failures and all(f.startswith(rankings) for f in failures):
        failures[-1] += (f" (every logit is within the allowed atol {r.allowed_atol:.3g}, so the tokens ranked otherwise "
                         "were near-ties, which flat logits, as random weights give, make common; a target file's "
                         "[parity] top1_agreement_min, top5_overlap_min and greedy_must_match set how many may differ)")
    return replace(r, passed=not failures, failures=failures)

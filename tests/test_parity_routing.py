"""Parity of a two-stage head where two clusters' route scores nearly tie: a target may probe either, and is judged
against the routing it chose (each near-tied cluster whole); a target that routes otherwise anywhere else fails."""

import numpy as np
import pytest
import torch

from vqexport.backends.base import Runner, StepOutput
from vqexport.backends.torch_ref import TorchRunner, head_step
from vqexport.head.module import head_module
from vqexport.head.spec import make_head
from vqexport.profiles import Parity
from vqexport.verify import compare_runners, rounding_error, verify_runners

from .models import random_head

V, D, K, P = 300, 32, 20, 4
PROMPTS = [[5, 17, 42, 7], [99, 3], [250, 1, 8, 140, 77]]


def _head(gap: float):
    """A head whose router ranks clusters by their route bias alone (the codebook's scores are ~1e-6), with the
    P-th and the next cluster ``gap`` apart: every position's routing boundary sits there."""
    base = random_head(V, D, K, seed=0)
    t = dict(base.tensors)
    t["codebook"] = t["codebook"] * 1e-6
    order = np.arange(K, dtype=np.float32)[::-1].copy()  # cluster 0 best ... cluster K-1 worst, 1 apart
    order[P] = order[P - 1] - gap  # cluster P (the (P+1)-th) right below cluster P-1 (the P-th)
    t["route_bias"] = order
    return make_head(t, probes=P)


class _Runner(Runner):
    """A fixed per-token hidden state (no context) followed by a two-stage head's torch module. As a reference it
    gives the head's parts and routing; as a target its logits only, or what ``edit`` makes of the step."""

    def __init__(self, head, rows, reference=True, edit=None):
        self.kv_shapes, self.vocab_size = [(1, 2)], V
        self.module, self.reference, self.edit = head_module(head, torch.from_numpy(rows)), reference, edit
        self.table = torch.from_numpy(np.random.default_rng(5).standard_normal((V, D)).astype(np.float32))
        self.routing = TorchRunner(_NoTrunk(), self.module, V).routing if reference else None

    def step(self, input_ids, attention_mask, past):
        present = [np.zeros((input_ids.shape[0], 1, attention_mask.shape[1], 2), np.float32)] * 2
        out = head_step(self.module, self.table[torch.from_numpy(input_ids)], present)
        if self.edit is not None:
            return self.edit(out)
        return out if self.reference else StepOutput(logits=out.logits, present=present)


class _NoTrunk(torch.nn.Module):
    kv_shapes = ((1, 2),)


def _rows():
    return (np.random.default_rng(3).standard_normal((V, D)) * 0.5).astype(np.float32)


def _compare(reference, target, parity=Parity()):
    with reference as ref, target as tgt:
        return compare_runners(ref, tgt, PROMPTS, 3, parity, mapping=reference.module.map.numpy())


def _swapped(head, shift):
    """The same head with cluster P's route bias raised by ``shift``: a target whose TopK puts it above cluster P-1."""
    t = {k: v for k, v in head.tensors.items() if k != "map"}  # the member table is the head's own
    t["route_bias"] = t["route_bias"].copy()
    t["route_bias"][P] += shift
    return make_head(t, probes=P)


def test_a_target_probing_the_other_of_two_near_tied_clusters_passes():
    head, rows = _head(gap=2e-5), _rows()  # closer than 2 * atol: either cluster is a correct P-th
    report = _compare(_Runner(head, rows), _Runner(_swapped(head, 4e-5), rows, reference=False))
    assert report.passed, report.failures
    assert report.rerouted_positions == report.positions > 0
    assert report.max_abs_diff < 1e-5


def test_the_same_swap_across_a_real_gap_fails():
    head, rows = _head(gap=0.5), _rows()  # 0.5 apart: no rounding reorders them
    report = _compare(_Runner(head, rows), _Runner(_swapped(head, 1.0), rows, reference=False))
    assert not report.passed
    assert report.rerouted_positions == 0
    assert report.max_abs_diff > 1e-2


def test_a_swap_across_a_real_gap_names_the_atol_that_would_count_it_as_a_tie():
    """The failure says the logits differ by whole clusters' exact-vs-VQ gap because the target probed clusters
    outside the near-tie band, and which atol's band would hold them (half the route-score gap): at that atol the
    same target passes, a little below it it does not."""
    head, rows = _head(gap=0.5), _rows()
    target = _Runner(_swapped(head, 1.0), rows, reference=False)
    report = _compare(_Runner(head, rows), target)
    assert report.misrouted_positions == report.positions > 0
    assert 0.25 <= report.misrouted_atol <= 0.251  # half the gap, rounded up to 3 digits so that it holds
    assert any(f"an atol of {report.misrouted_atol:.3g} would count them as near-ties" in f for f in report.failures)
    assert report.required_atol > 1.0  # what the logits alone would ask for
    near = _compare(_Runner(head, rows), target, Parity(atol=report.misrouted_atol))
    assert near.passed, near.failures
    assert near.rerouted_positions == near.positions and near.misrouted_positions == 0
    below = _compare(_Runner(head, rows), target, Parity(atol=0.24))
    assert not below.passed and below.misrouted_positions == below.positions


def test_no_misrouting_is_reported_where_the_target_routes_as_the_reference():
    head, rows = _head(gap=0.5), _rows()

    def nudged(out):  # every logit off by 0.01: rounding, not routing
        return StepOutput(logits=out.logits + 0.01, present=out.present)

    report = _compare(_Runner(head, rows), _Runner(head, rows, reference=False, edit=nudged))
    assert not report.passed and report.misrouted_positions == 0 and report.misrouted_atol == 0.0
    assert not any("near-ties" in f for f in report.failures)


@pytest.mark.parametrize("probes", [P - 1, P + 1])
def test_a_target_probing_another_number_of_clusters_fails(probes):
    head, rows = _head(gap=2e-5), _rows()  # the band holds clusters P-1 and P: either alone is right, both or none not
    t = {k: v for k, v in head.tensors.items() if k != "map"}
    report = _compare(_Runner(head, rows), _Runner(make_head(t, probes=probes), rows, reference=False))
    assert not report.passed
    assert report.max_abs_diff > 1e-2


def test_a_near_tied_cluster_is_judged_whole():
    head, rows = _head(gap=2e-5), _rows()
    swapped = _swapped(head, 4e-5)
    members = np.nonzero(head_module(swapped, torch.from_numpy(rows)).map.numpy() == P)[0][::2]

    def half_vq(out):  # the cluster the target probes instead: only half its tokens exact, the rest left VQ
        logits = out.logits.copy()
        logits[..., members] = out.extra["vq_logits"][..., members]
        return StepOutput(logits=logits, present=out.present)

    report = _compare(_Runner(head, rows), _Runner(swapped, rows, reference=False, edit=half_vq))
    assert not report.passed
    assert report.max_abs_diff > 1e-2


def _topk(k, logits_of=lambda out: out.logits):
    def edit(out):
        lp = torch.log_softmax(torch.from_numpy(logits_of(out)).double(), -1)
        vals, ids = torch.topk(lp, k, dim=-1)
        return StepOutput(logits=None, present=out.present,
                          extra={"topk_ids": ids.numpy(), "topk_logprobs": vals.float().numpy()})
    return edit


@pytest.mark.parametrize("k", [V, 40])
def test_top_k_targets_are_judged_on_their_ids(k):
    head, rows = _head(gap=2e-5), _rows()
    report = _compare(_Runner(head, rows), _Runner(_swapped(head, 4e-5), rows, reference=False, edit=_topk(k)))
    assert report.compared == "topk"
    assert report.passed, report.failures
    assert report.rerouted_positions > 0


@pytest.mark.parametrize("case", ["real gap", "half a cluster"])
def test_top_k_targets_that_route_wrongly_fail(case):
    if case == "real gap":
        head, rows = _head(gap=0.5), _rows()
        target = _Runner(_swapped(head, 1.0), rows, reference=False, edit=_topk(V))
    else:
        head, rows = _head(gap=2e-5), _rows()
        swapped = _swapped(head, 4e-5)
        members = np.nonzero(head_module(swapped, torch.from_numpy(rows)).map.numpy() == P)[0][::2]

        def half_vq(out):
            logits = out.logits.copy()
            logits[..., members] = out.extra["vq_logits"][..., members]
            return logits

        target = _Runner(swapped, rows, reference=False, edit=_topk(V, half_vq))
    report = _compare(_Runner(head, rows), target)
    assert report.compared == "topk"
    assert not report.passed


@pytest.mark.parametrize("error, passes", [(1e-4, True), (2e-5, False)])
def test_the_near_tie_band_grows_with_the_tolerance_the_reference_error_gives(error, passes):
    """3e-4 apart: outside the band of atol 1e-4 (2e-4 wide), inside that of 4 x a reference error of 1e-4."""
    head, rows = _head(gap=3e-4), _rows()
    reference, target = _Runner(head, rows), _Runner(_swapped(head, 6e-4), rows, reference=False)
    asked = []

    def measured():
        asked.append(True)
        return error, ""

    with reference as ref:
        plain = verify_runners(ref, target, PROMPTS, 3, Parity(), mapping=reference.module.map.numpy())
        report = verify_runners(ref, target, PROMPTS, 3, Parity(), reference_error=measured,
                                mapping=reference.module.map.numpy())
    assert not plain.passed and plain.rerouted_positions == 0 and plain.max_abs_diff > 1e-2
    assert asked == [True] and report.reference_error == error
    assert report.passed == passes, report.failures
    assert report.tolerances["atol"] == 1e-4  # the target's own tolerance, as set
    if passes:
        assert report.rerouted_positions == report.positions > 0 and report.max_abs_diff < 1e-5
        assert report.allowed_atol == pytest.approx(4e-4)


def test_a_real_gap_still_fails_with_a_grown_tolerance():
    head, rows = _head(gap=0.5), _rows()
    reference, target = _Runner(head, rows), _Runner(_swapped(head, 1.0), rows, reference=False)
    with reference as ref:
        report = verify_runners(ref, target, PROMPTS, 3, Parity(), reference_error=lambda: (1e-3, ""),
                                mapping=reference.module.map.numpy())
    assert not report.passed and report.rerouted_positions == 0 and report.allowed_atol == pytest.approx(4e-3)


def test_a_routing_flip_in_the_exact_model_is_not_taken_for_rounding():
    """The float64 model may probe the other of two near-tied clusters: its logits then differ from float32's by
    whole logits. The rounding error is measured on what the logits are made of (route scores, exact and VQ
    logits), so a target off by 0.3 everywhere still fails."""
    head, rows = _head(gap=3e-4), _rows()
    reference, exact = _Runner(head, rows), _Runner(_swapped(head, 6e-4), rows)  # its route scores 6e-4 apart at the tie
    with reference as r, exact as e:
        error = rounding_error(r, e, PROMPTS, 3)
        routed = compare_runners(r, e, PROMPTS, 3, Parity(), mapping=reference.module.map.numpy(), batched=False)
    assert error == pytest.approx(6e-4, abs=2e-6) and routed.max_abs_diff > 1e-2  # the logits differ by whole logits

    def off(out):
        return StepOutput(logits=out.logits + 0.3, present=out.present)

    with reference as r:
        report = verify_runners(r, _Runner(head, rows, reference=False, edit=off), PROMPTS, 3, Parity(),
                                reference_error=lambda: (error, ""), mapping=reference.module.map.numpy())
    assert not report.passed and report.allowed_atol == pytest.approx(4 * error)


@pytest.mark.parametrize("rtol", [0.0, 0.01])
def test_a_rounding_miss_on_a_cluster_far_from_the_boundary_is_not_called_misrouting(rtol):
    """A cluster well below the P-th route score, off by 0.05 where its exact and VQ logits are 0.06 apart: rounding,
    which no near-tie band explains; it must not be reported as a routing (whose suggested atol would be 1)."""
    from vqexport.backends.base import Routing
    from vqexport.verify import _routed_as_target

    clusters = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    scores = np.array([[3.0, 2.0, 0.0, -1.0]])  # P = 2: clusters 0 and 1 probed, a gap of 2 to the next
    exact = np.array([[10.0, 11.0, 10.5, 9.0, 10.2, 10.1, 9.8, 9.9]])
    vq = exact + np.array([[3.0, -2.0, 2.5, 1.0, 0.06, 0.06, 2.0, 3.0]])
    ref = np.where(np.isin(clusters, [0, 1]), exact, vq)
    target = ref.copy()
    target[0, 4:6] -= 0.05
    parts = {"route_scores": scores, "exact_logits": exact, "vq_logits": vq}
    _, rerouted, misrouted = _routed_as_target(ref, parts, {"logits": target}, Routing(clusters, 2),
                                               Parity(atol=0.01, rtol=rtol))
    assert rerouted == 0 and misrouted == []
    swapped = np.where(np.isin(clusters, [0, 2]), exact, vq)  # cluster 2 probed instead of cluster 1: a routing
    _, _, misrouted = _routed_as_target(ref, parts, {"logits": swapped}, Routing(clusters, 2), Parity(atol=0.01, rtol=rtol))
    assert len(misrouted) == 1 and misrouted[0] == pytest.approx(1.0 - rtol * 2.0)  # half the route-score gap of 2


@pytest.mark.parametrize("gap, shift, passes", [(2e-5, 4e-5, True), (0.5, 1.0, False)])
def test_a_prefill_compared_a_position_at_a_time_gives_the_same_report(monkeypatch, gap, shift, passes):
    """verify compares a long prefill in blocks of positions (a [S, V] float64 comparison is GBs at V = 262k): the
    report does not depend on the block size, rerouted and misrouted positions included."""
    import vqexport.verify as verify

    head, rows = _head(gap=gap), _rows()
    whole = _compare(_Runner(head, rows), _Runner(_swapped(head, shift), rows, reference=False))
    monkeypatch.setattr(verify, "CHUNK", 1)  # one position per block
    blocks = _compare(_Runner(head, rows), _Runner(_swapped(head, shift), rows, reference=False))
    assert whole.passed is passes and whole.rerouted_positions + whole.misrouted_positions > 0
    mine, theirs = whole.to_dict(), blocks.to_dict()
    assert mine.pop("kl_divergence") == pytest.approx(theirs.pop("kl_divergence"), rel=1e-9, abs=1e-15)
    assert mine == theirs

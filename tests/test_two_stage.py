"""The two-stage head: the codebook routes, the model's own output-layer rows give the best P clusters exact logits,
every other token keeps its VQ logit — one distribution over all V tokens."""

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file, save_file

from vqexport import api
from vqexport.errors import VQExportError
from vqexport.convert.convert import ideally_routed
from vqexport.graph_io import load_graph
from vqexport.head import decoding
from vqexport.head.graph import HeadForm, head_model
from vqexport.head.module import DenseHead, head_logits, head_module
from vqexport.head.spec import (CONFIG_FILE, WEIGHTS_FILE, make_head, read_artifact_head, read_head, read_head_config,
                                 write_artifact_head, write_head)

from .conftest import assert_user_error, run_cli, sample_text
from .models import make_model, random_head

TEXT = sample_text()


def _two_stage(vocab=300, hidden=32, k=20, probes=4, bias=True, rank=0, seed=0, route=False):
    h = random_head(vocab, hidden, k, bias=bias, rank=rank, seed=seed)
    extra = {"route_bias": (np.random.default_rng(seed + 7).standard_normal(k) * 3).astype(np.float32)} if route else {}
    return make_head({**h.tensors, **extra}, probes=probes)


def _rows(vocab=300, hidden=32, seed=3):
    return (np.random.default_rng(seed).standard_normal((vocab, hidden)) * 0.5).astype(np.float32)


@pytest.mark.parametrize("route", [False, True])
def test_definition_probed_tokens_exact_the_rest_vq(route):
    head, W = _two_stage(route=route), _rows()
    h = np.random.default_rng(1).standard_normal((2, 3, 32))
    logits, tail = head.logits(h, rows=W), head.tail_logits(h)
    z = h @ head.codebook.T + (head.route_bias if route else 0)  # a fitted router ranks by z + route_bias
    top = np.argsort(-z, axis=-1)[..., :4]
    assert route == (not np.array_equal(top, np.argsort(-(h @ head.codebook.T), axis=-1)[..., :4]))
    for b in range(2):
        for s in range(3):
            probed = np.isin(head.map, top[b, s])
            np.testing.assert_allclose(logits[b, s, probed], h[b, s] @ W[probed].T, atol=1e-9)
            np.testing.assert_array_equal(logits[b, s, ~probed], tail[b, s, ~probed])
            assert 0 < probed.sum() < 300


@pytest.mark.parametrize("shape", [(0, 32), (2, 0, 32), (0, 5, 32)])
def test_definition_of_no_positions_is_empty(shape):
    head, W = _two_stage(rank=3), _rows()
    out = head.logits(np.zeros(shape), rows=W, rows_bias=np.ones(300, np.float32))
    assert out.shape == (*shape[:-1], 300)


def test_files_round_trip_and_the_map_is_derived(tmp_path):
    head = _two_stage(rank=2, route=True)
    write_head(tmp_path, head)
    back = read_head(tmp_path)
    assert back.config == head.config and back.config.type == "two-stage" and back.config.route_bias
    np.testing.assert_array_equal(back.route_bias, head.route_bias)
    assert "map" not in load_file(str(tmp_path / WEIGHTS_FILE))  # stored as the member table
    np.testing.assert_array_equal(back.map, head.map)
    np.testing.assert_array_equal(back.members, head.members)
    assert back.config.scored == 20 + 4 * head.config.cluster_size


def test_an_artifact_keeps_a_two_stage_heads_config_alone_and_a_plain_heads_tensors(tmp_path):
    head = _two_stage(rank=2, route=True)
    (tmp_path / "ts").mkdir()
    write_artifact_head(tmp_path / "ts", head)
    assert sorted(p.name for p in (tmp_path / "ts").iterdir()) == [CONFIG_FILE]
    kept = read_artifact_head(tmp_path / "ts")
    assert kept.config == head.config and kept.two_stage and kept.config_only
    for read in (lambda: kept.bias, lambda: kept.members, lambda: kept.route_bias, lambda: kept.tail_logits(np.zeros(32))):
        with pytest.raises(VQExportError, match="keeps its config alone"):  # never a silent None for a kept bias
            read()
    with pytest.raises(VQExportError, match="read_artifact_head reads it"):
        read_head(tmp_path / "ts")
    write_head(tmp_path / "ts", head)  # an artifact built when the tensors were kept reads whole
    np.testing.assert_array_equal(read_artifact_head(tmp_path / "ts").members, head.members)
    plain = make_head({"codebook": head.codebook, "map": head.map, "bias": head.bias})
    (tmp_path / "vq").mkdir()
    write_artifact_head(tmp_path / "vq", plain)  # exact sampling and the dense twin read a plain head's tensors
    np.testing.assert_array_equal(read_artifact_head(tmp_path / "vq").map, head.map)
    (tmp_path / "vq" / WEIGHTS_FILE).unlink()
    with pytest.raises(VQExportError, match="head config without its weights"):
        read_artifact_head(tmp_path / "vq")
    (tmp_path / "vq" / CONFIG_FILE).unlink()
    with pytest.raises(VQExportError, match="the head's definition is missing"):
        read_artifact_head(tmp_path / "vq")


@pytest.mark.parametrize("rank, route", [(0, False), (3, False), (0, True)])
def test_torch_module_equals_the_definition(rank, route):
    head, W = _two_stage(rank=rank, route=route), _rows()
    h = np.random.default_rng(2).standard_normal((2, 5, 32)).astype(np.float32)
    got = head_module(head, torch.from_numpy(W))(torch.from_numpy(h)).detach().numpy()
    np.testing.assert_allclose(got, head.logits(h, rows=W), atol=1e-4)


@pytest.mark.parametrize("rows, atol, route", [("fp32", 1e-4, False), ("int8", 0.25, False), ("fp32", 1e-4, True)])
def test_graph_equals_the_definition(rows, atol, route):
    head, W = _two_stage(route=route), _rows()
    proto = ir.to_proto(head_model(head, HeadForm(rows=rows), rows=W))
    names = {n.name: n for n in proto.graph.node}
    assert names["head/route/top"].op_type == "TopK" and names["head/exact/scatter"].op_type == "ScatterElements"
    assert next(a.i for a in names["head/exact/scatter"].attribute if a.name == "axis") == 2
    assert ("head/route/bias" in names) == route
    if rows == "int8":
        assert names["head/exact/MatMulInteger"].op_type == "MatMulInteger"
        q = next(t for t in proto.graph.initializer if t.name == "head.rows_q")
        assert q.data_type == 3  # int8, 7-bit codes
    h = np.random.default_rng(4).standard_normal((2, 3, 32)).astype(np.float32)
    out = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"hidden_states": h})[0]
    ref = head.logits(h, rows=W)
    np.testing.assert_allclose(out, ref, atol=atol)
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_ideal_routing_probes_the_clusters_holding_the_most_dense_mass():
    head, W = _two_stage(route=True), _rows()
    module = head_module(head, torch.from_numpy(W))
    h = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 3, 32)).astype(np.float32))
    dense = torch.matmul(h, torch.from_numpy(W).t())
    logp = torch.log_softmax(dense, -1)
    got = ideally_routed(module, h, DenseHead(torch.from_numpy(W).clone()), dense, logp).numpy()  # its own product
    reused = ideally_routed(module, h, DenseHead(torch.from_numpy(W)), dense, logp).numpy()  # the dense logits
    np.testing.assert_allclose(reused, got, atol=1e-5)
    stand_in = torch.zeros_like(dense)  # not the layer's logits: the probed tokens show which path was taken
    np.testing.assert_array_equal(ideally_routed(module, h, DenseHead(torch.from_numpy(W).clone()), stand_in, logp).numpy(), got)
    zeros = ideally_routed(module, h, DenseHead(torch.from_numpy(W)), stand_in, logp).numpy()
    tail = head.tail_logits(h.numpy().astype(np.float64))
    for b in range(2):
        for s in range(3):
            p = np.exp(dense[b, s].double().numpy() - dense[b, s].double().logsumexp(-1).item())
            best = np.argsort(-np.bincount(head.map, weights=p, minlength=20))[:4]
            probed = np.isin(head.map, best)
            np.testing.assert_allclose(got[b, s, probed], dense[b, s, probed].numpy(), atol=1e-5)
            np.testing.assert_allclose(got[b, s, ~probed], tail[b, s, ~probed], atol=1e-4)
            assert (zeros[b, s, probed] == 0).all() and np.array_equal(zeros[b, s, ~probed], got[b, s, ~probed])



def test_dense_logits_are_reused_as_exact_logits_only_from_the_same_layer():
    head, W = _two_stage(route=True), torch.from_numpy(_rows())
    module = head_module(head, W)
    h = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 3, 32)).astype(np.float32))
    same, copy = DenseHead(W), DenseHead(W.clone())
    assert module.reads(same) and not module.reads(copy) and not module.reads(DenseHead(W, torch.zeros(300)))
    assert torch.equal(head_logits(module, h, same, same(h)), module(h))
    stand_in = torch.zeros(2, 3, 300)  # not the layer's logits: shows which path was taken
    reused = head_logits(module, h, same, stand_in)
    probed = reused != module.stages(h)["vq_logits"]
    assert torch.equal(reused[probed], torch.zeros(int(probed.sum()))) and probed.sum() >= 2 * 3
    assert torch.equal(head_logits(module, h, copy, stand_in), module(h))
    plain = head_module(random_head(300, 32, 20))
    with pytest.raises(ValueError, match="only a two-stage head"):
        head_logits(plain, h, same, same(h), top=torch.zeros(2, 3, 1, dtype=torch.long))


def test_measuring_in_long_windows_runs_the_heads_in_chunks_with_the_same_result():
    """A context-free stand-in trunk: every window length scores the same positions alike, also windows longer than
    the positions the heads take at a time (2,048 > 1,024), and with one cache shared by two window lengths."""
    from vqexport.convert.convert import HEAD_POSITIONS, evaluate, recall_curve

    head, W = _two_stage(route=True), torch.from_numpy(_rows())
    module, dense = head_module(head, W), DenseHead(W)
    table = torch.from_numpy(np.random.default_rng(6).standard_normal((300, 32)).astype(np.float32))
    calls = []
    def hidden(x):
        calls.append(tuple(x.shape))
        return table[x]
    ids = torch.from_numpy(np.random.default_rng(7).integers(0, 300, 4097))
    cache = {}
    short = evaluate(hidden, dense, module, ids, cache, ideal=True)
    assert len(calls) == 4 and calls[0] == (8, 128)
    long = evaluate(hidden, dense, module, ids, cache, ideal=True, seq=2048)
    assert calls[4:] == [(1, 2048), (1, 2048)] and 2048 > HEAD_POSITIONS  # not the 128-token windows' states
    assert short["tokens"] == long["tokens"] == 4096
    for key, value in short.items():
        assert long[key] == pytest.approx(value, rel=1e-6), key
    assert evaluate(hidden, dense, module, ids, cache, ideal=True, seq=2048) == long and len(calls) == 6  # cached
    assert recall_curve(hidden, dense, module, ids, cache)[4] == pytest.approx(short["probe_recall"])


def test_figures_by_dense_entropy_are_those_of_the_positions_in_each_band():
    """A context-free stand-in trunk whose hidden states have norms from 0.05 to 8, so that the dense entropy spreads
    over every band; each band's figures against the positions' own log-probabilities, sorted into bands here."""
    from vqexport.convert.convert import ENTROPY_BANDS, evaluate

    head, W = _two_stage(route=True), torch.from_numpy(_rows())
    module, dense = head_module(head, W), DenseHead(W)
    rng = np.random.default_rng(9)
    table = rng.standard_normal((300, 32)) * np.geomspace(0.05, 8, 300)[:, None] / np.sqrt(32)
    table = torch.from_numpy(table.astype(np.float32))
    ids = torch.from_numpy(rng.integers(0, 300, 1025))
    plain = evaluate(lambda x: table[x], dense, module, ids)
    r = evaluate(lambda x: table[x], dense, module, ids, by_entropy=True)
    assert {k: v for k, v in r.items() if k != "by_dense_entropy"} == plain  # the overall figures unchanged
    h, target = table[ids[:1024]], ids[1:1025]
    with torch.no_grad():
        ld, lv = dense(h).log_softmax(-1).double(), module(h).log_softmax(-1).double()
    entropy = -(ld.exp() * ld).sum(-1).numpy()
    band = np.searchsorted(np.asarray(ENTROPY_BANDS), entropy, side="right")
    hits = (torch.topk(module.route_scores(h), head.config.probes, -1).indices == module.map[ld.argmax(-1)][:, None]).any(-1)
    rows = r["by_dense_entropy"]
    assert [(b["entropy_from"], b["entropy_to"]) for b in rows] == list(zip((0.0, *ENTROPY_BANDS), (*ENTROPY_BANDS, None)))
    assert sum(b["tokens"] for b in rows) == 1024 and sum(b["share"] for b in rows) == pytest.approx(1.0)
    assert sum(b["tokens"] > 0 for b in rows) >= 5  # the stand-in spreads the positions over the bands
    for i, b in enumerate(rows):
        sel = torch.from_numpy(band == i)
        assert b["tokens"] == int(sel.sum()), i
        if not b["tokens"]:
            assert "ppl_change" not in b
            continue
        nll_d = -ld[sel].gather(-1, target[sel][:, None]).mean()
        nll_v = -lv[sel].gather(-1, target[sel][:, None]).mean()
        assert b["dense_ppl"] == pytest.approx(float(nll_d.exp()), rel=1e-5), i
        assert b["ppl_change"] == pytest.approx(float((nll_v - nll_d).exp()) - 1, rel=1e-4, abs=1e-6), i
        assert b["top1_agreement"] == pytest.approx(float((ld[sel].argmax(-1) == lv[sel].argmax(-1)).double().mean())), i
        assert b["probe_recall"] == pytest.approx(float(hits[sel].double().mean())), i


@pytest.mark.parametrize("shape", [(6, 50), (2, 3, 50)])
def test_distillation_loss_and_gradient_equal_those_of_kl_div(shape):
    from vqexport.convert.router import KLDiv

    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(shape, generator=gen) * 3).requires_grad_(True)
    target = torch.log_softmax(torch.randn(shape, generator=gen) * 3, -1)
    want = torch.nn.functional.kl_div(torch.log_softmax(x * 2, -1), target, log_target=True, reduction="batchmean")
    (want_grad,) = torch.autograd.grad(want, x)
    got = KLDiv.apply(x * 2, target)  # a student computed from the parameter, as the heads' logits are
    (got_grad,) = torch.autograd.grad(got, x)
    assert got.item() == pytest.approx(want.item(), rel=1e-6) and got_grad.shape == x.shape
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    got = KLDiv.apply(x * 2, target)
    (scaled,) = torch.autograd.grad(got * 3, x, retain_graph=True)  # a scaled loss, and a second backward
    torch.testing.assert_close(scaled, 3 * want_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], want_grad, rtol=1e-5, atol=1e-6)


def test_a_tail_step_changes_the_tail_as_kl_div_would():
    """The two-stage head's logits are built in place (gather, bias, rank-r term, probed exact logits) and the loss
    overwrites them with its gradient: the parameters' gradients are still those of the plain formula."""
    from vqexport.convert.router import KLDiv

    head, W = _two_stage(route=True, rank=3), torch.from_numpy(_rows())
    module, dense = head_module(head, W), DenseHead(W)
    params = [module.bias, module.lowrank_p, module.lowrank_u]
    for p in params:
        p.requires_grad_(True)
    h = torch.from_numpy(np.random.default_rng(9).standard_normal((64, 32)).astype(np.float32))
    target = torch.log_softmax(dense(h), -1)
    grads = []
    for loss in (lambda s: torch.nn.functional.kl_div(torch.log_softmax(s, -1), target, log_target=True, reduction="batchmean"),
                 lambda s: KLDiv.apply(s, target)):
        grads.append(torch.autograd.grad(loss(head_logits(module, h, dense, dense(h))), params))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_distillation_step_reports_the_kl_per_position_of_windows_too():
    """The plain head's distillation steps on windows [8, 128, d]: the loss is per window (as KLDiv's batchmean), and
    the step reports the KL per position, the same figure as on the flat positions."""
    from vqexport.convert.router import kl_step

    head, W = _two_stage(rank=3), torch.from_numpy(_rows())
    dense = DenseHead(W)
    h = torch.from_numpy(np.random.default_rng(9).standard_normal((4, 16, 32)).astype(np.float32))
    reported = [kl_step(head_module(head, W), dense, x, torch.optim.SGD(head_module(head, W).parameters(), lr=0.0))
                for x in (h, h.reshape(64, 32))]
    want = torch.nn.functional.kl_div(torch.log_softmax(head_module(head, W)(h.reshape(64, 32)), -1),
                                      torch.log_softmax(dense(h.reshape(64, 32)), -1), log_target=True, reduction="batchmean")
    assert reported == pytest.approx([want.item()] * 2, rel=1e-5)


def test_router_pool_spreads_its_windows_over_the_text_within_its_budget():
    """The router's hidden states come from windows spread evenly over the training text, as many as fit the budget."""
    from vqexport.convert.router import hidden_pool

    seq, d = 4, 3
    hidden = _Echo(d)
    tokens = torch.arange(40 * seq + 1)  # 40 windows; window i starts at token i * seq
    starts = lambda pool: pool[::seq, 0].long().tolist()  # noqa: E731
    assert starts(hidden_pool(hidden, tokens, seq, budget=10**9)) == [i * seq for i in range(40)]
    five = hidden_pool(hidden, tokens, seq, budget=5 * seq * d * 4)
    assert five.shape == (5 * seq, d)
    assert starts(five) == [0, 10 * seq, 20 * seq, 29 * seq, 39 * seq]  # first, last and evenly between
    assert starts(hidden_pool(hidden, tokens, seq, budget=1)) == [0]


@pytest.mark.parametrize("steps, once", [(3, True), (1, False)])
def test_router_targets_computed_once_for_the_pool_fit_as_those_of_every_step(monkeypatch, steps, once):
    """With more draws than pool positions the dense cluster masses are computed once (float16): the router fitted
    on them equals the one fitted on masses computed at every step, to float16's rounding."""
    from vqexport.convert import router
    from vqexport.head.module import VQLogitsHead
    from vqexport.head.spec import HeadConfig

    V, d, K = 96, 8, 12
    gen = torch.Generator().manual_seed(0)
    dense = DenseHead(torch.randn(V, d, generator=gen))
    pool = torch.randn(100, d, generator=gen)  # 3 steps of 64 draw more positions than the pool holds, 1 fewer
    monkeypatch.setattr(router, "LOGIT_BUDGET", 64 * V)  # 64 positions a step
    calls = []
    monkeypatch.setattr(router, "cluster_mass", lambda *a, f=router.cluster_mass: calls.append(len(a[1])) or f(*a))
    fits = []
    start = torch.randn(K, d, generator=gen)
    for mass_bytes in (0, 1 << 20):
        head = VQLogitsHead(HeadConfig(V, d, K))
        with torch.no_grad():
            head.codebook.copy_(start)
            head.map.copy_(torch.arange(V) % K)
        calls.clear()
        route = router.fit_router(head, dense, pool, steps, seed=0, mass_bytes=mass_bytes)
        fits.append((head.codebook.detach().clone(), route, list(calls)))
    (c0, r0, per_step), (c1, r1, cached) = fits
    assert per_step == [64] * steps
    assert cached == ([64, 36] if once else [64] * steps)  # the pool in batches, then never again
    assert (c0 - start).abs().max() > 1e-3 and r0.abs().max() > 1e-3  # the steps moved the router
    torch.testing.assert_close(c1, c0, rtol=0, atol=1e-4)
    torch.testing.assert_close(r1, r0, rtol=0, atol=1e-4)


def test_router_targets_are_cached_within_half_the_memory_available(monkeypatch):
    from vqexport.convert import router
    from vqexport.head.module import VQLogitsHead
    from vqexport.head.spec import HeadConfig

    for free, budget in ((None, router.MASS_BYTES), (4 * router.MASS_BYTES, router.MASS_BYTES), (1 << 30, 1 << 29)):
        monkeypatch.setattr(router, "available_memory", lambda f=free: f)
        assert router.mass_budget() == budget
    V, d, K = 96, 8, 12  # 100 positions x 12 clusters x 2 bytes = 2,400 bytes of masses
    gen = torch.Generator().manual_seed(0)
    dense, pool = DenseHead(torch.randn(V, d, generator=gen)), torch.randn(100, d, generator=gen)
    monkeypatch.setattr(router, "LOGIT_BUDGET", 64 * V)  # 64 positions a step: 3 steps draw more than the pool
    calls, mass = [], router.cluster_mass
    monkeypatch.setattr(router, "cluster_mass", lambda *a: calls.append(len(a[1])) or mass(*a))
    for free, expected in ((4_800, [64, 36]), (4_799, [64] * 3)):
        head = VQLogitsHead(HeadConfig(V, d, K))
        with torch.no_grad():
            head.map.copy_(torch.arange(V) % K)
        monkeypatch.setattr(router, "available_memory", lambda f=free: f)
        calls.clear()
        router.fit_router(head, dense, pool, 3, seed=0)
        assert calls == expected  # cached (the pool in two batches), or computed at every step


class _Echo:
    """A stand-in trunk whose hidden state at each position is its token id, repeated d times."""

    def __init__(self, d):
        self.geo = SimpleNamespace(hidden_size=d)

    def __call__(self, x):
        return x[..., None].float().expand(*x.shape, self.geo.hidden_size)


@pytest.mark.parametrize("rank", [0, 3])
def test_exact_decoding_without_the_v_wide_logits(rank):
    """Normaliser, top-k and sampling from z, the probed clusters and their tokens' exact logits (and, for a tail with
    a rank-r correction, h·Pᵀ) equal the full softmax over the head's V logits."""
    rng = np.random.default_rng(5)
    head, W = _two_stage(probes=5, rank=rank), _rows()
    u = head.lowrank[1] * 20 if rank else None  # a correction large enough to reorder the tail
    if rank:
        head = make_head({**{k: v for k, v in head.tensors.items() if k != "map"}, "lowrank_u": u}, probes=5)

    def position(h):
        z = h @ head.codebook.T
        probed = np.argsort(-z)[:5]
        ids = head.members[probed].ravel()
        ids = ids[ids >= 0]
        proj = head.lowrank[0] @ h if rank else None
        return z, probed, ids, W[ids] @ h, proj, head.logits(h[None], rows=W)[0]

    for T in (1.0, 0.7):
        tables = decoding.cluster_tables(head.map, head.bias, 20, width=10, temperature=T)
        lr = decoding.lowrank_tables(head.map, head.bias, u, tables) if rank else None
        for _ in range(20):
            z, probed, ids, exact, proj, full = position(rng.standard_normal(32) * 2)
            ft = full / T
            assert decoding.two_stage_normalizer(z, probed, ids, exact, tables, lr, proj) == pytest.approx(
                float(np.log(np.exp(ft - ft.max()).sum()) + ft.max()), rel=1e-9)
            ref_ids, ref_lp = decoding.reference_topk(full, 10, temperature=T)
            got_ids, got_lp = decoding.two_stage_topk(z, probed, ids, exact, tables, 10, lr, proj)
            np.testing.assert_array_equal(got_ids, ref_ids)
            np.testing.assert_allclose(got_lp, ref_lp, atol=1e-9)
            if rank:  # the correction does reorder the tail: a head without it would give other figures
                assert not np.allclose(decoding.two_stage_topk(z, probed, ids, exact, tables, 10)[1], ref_lp, atol=1e-3)
    sampler = decoding.TwoStageSampler(head.map, head.bias, 20, temperature=1.0, seed=0, lowrank_u=u)
    z, probed, ids, exact, proj, full = position(rng.standard_normal(32))
    draws = np.bincount([sampler.sample(z, probed, ids, exact, proj) for _ in range(20000)], minlength=300) / 20000
    p = np.exp(full - full.max())
    p /= p.sum()
    assert np.abs(draws - p).sum() < 0.1  # total variation of 20k draws


@pytest.fixture(scope="module")
def tied(tmp_path_factory, small_tokenizer):
    """A tiny tied Qwen2 with a two-stage head (equal clusters of 16, P = 4)."""
    model = make_model(tmp_path_factory.mktemp("ts") / "model", arch="qwen2", vocab=320, hidden=64, heads=4, kv_heads=2,
                       head=False, tokenizer=small_tokenizer)
    h = random_head(320, 64, 20)
    write_head(model, make_head({"codebook": h.codebook, "map": np.arange(320, dtype=np.int32) % 20, "bias": h.bias}, probes=4))
    return model


def test_portable_build_reads_rows_from_the_shared_embedding_table(tied, tmp_path):
    from vqexport.bench.artifact import dense_twin

    result = api.build("ort", model=tied, out=tmp_path / "art", steps=8)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4 and result.parity.greedy_match_steps == 8
    proto = load_graph(result.out / "model.onnx")
    rows = next(n for n in proto.graph.node if n.name == "head/exact/rows")
    assert rows.input[0] == "model.embed_tokens.weight"  # the embedding table itself: never copied
    assert not any(t.name.startswith("head.rows") for t in proto.graph.initializer)
    # the artifact keeps the head's config alone: every tensor of it is in the graph
    assert read_head_config(result.out) == read_head(tied).config
    assert not (result.out / WEIGHTS_FILE).exists() and WEIGHTS_FILE not in result.manifest["files"]
    twin = _twin_is_the_dense_model(result.out, tied, tmp_path / "twin")  # its output layer: the embedding table
    write_head(result.out, read_head(tied))  # as an artifact built when the head's tensors were kept: the same twin
    (tmp_path / "kept").mkdir()
    again = dense_twin(result.out, "model.onnx", tmp_path / "kept")
    assert [f.read_bytes() for f in sorted(again.parent.glob("dense.onnx*"))] == [
        f.read_bytes() for f in sorted(twin.parent.glob("dense.onnx*"))]


def test_build_says_what_a_two_stage_heads_size_leaves_out(tied, tmp_path):
    result = run_cli("build", "--target", "ort", "--model", tied, "--out", tmp_path / "art", "--steps", 2)
    assert result.exit_code == 0, result.stderr
    text = " ".join(result.stdout.split())
    cap = read_head(tied).config.cluster_size
    assert f"vs a dense head's {320 * 64 + 320:,} (same V x d + bias)" in text
    assert (f"two-stage head: 20 cluster scores + {4 * cap:,} exact rows = {20 + 4 * cap:,} logits computed per position "
            f"({100 * (20 + 4 * cap) / 320:.1f}% of V = 320); stage 2 reads its exact rows from the trunk's own table of the "
            "output rows, read in place (among the trunk's parameters, not the head's)") in text


def test_verify_against_a_model_whose_head_differs_from_the_artifacts_is_one_line(tied, tmp_path):
    import shutil

    art = api.build("ort", model=tied, out=tmp_path / "art", steps=2).out
    other = tmp_path / "other"
    shutil.copytree(tied, other)
    cfg = json.loads((other / CONFIG_FILE).read_text())
    (other / CONFIG_FILE).write_text(json.dumps({**cfg, "probes": 5}))
    assert_user_error(run_cli("verify", "--artifact", art, "--model", other, "--steps", 2),
                      "its head has probes = 5 but the artifact's has probes = 4")
    plain = tmp_path / "plain"
    shutil.copytree(tied, plain)
    h = read_head(tied)
    write_head(plain, make_head({"codebook": h.codebook, "map": h.map, "bias": h.bias}))
    assert_user_error(run_cli("verify", "--artifact", art, "--model", plain, "--steps", 2),
                      "its head is a vq head but the artifact's is a two-stage head")
    assert run_cli("verify", "--artifact", art, "--model", tied, "--steps", 2).exit_code == 0


def test_an_untied_model_ships_its_output_rows(tmp_path, small_tokenizer):
    model = make_model(tmp_path / "untied", vocab=320, hidden=32, tie=False, head=False, tokenizer=small_tokenizer)
    h = random_head(320, 32, 20)
    write_head(model, make_head({"codebook": h.codebook, "map": h.map, "bias": h.bias}, probes=3))
    result = api.build("ort", model=model, out=tmp_path / "art", steps=4)
    assert result.parity.passed
    inits = {t.name: list(t.dims) for t in load_graph(result.out / "model.onnx").graph.initializer}
    assert inits["head.rows"] == [320, 32]
    text = " ".join(run_cli("inspect", result.out).stdout.split())
    assert (f"= {20 + 3 * read_head(model).config.cluster_size:,} logits computed per position" in text
            and "stage 2 reads its exact rows from the head's own copy of the output rows (10,240 params, among the head's)" in text)
    _twin_is_the_dense_model(result.out, model, tmp_path / "twin")


@pytest.mark.parametrize("form, trunk", [("int8", "fp32"), ("int4", "fp32"), ("int8", "int4")])
def test_an_untied_models_twin_is_made_from_the_row_codes_its_artifact_keeps(form, trunk, tmp_path, small_tokenizer):
    """Without an fp32 copy of the output layer (rows stored as stage 2's codes), the dense twin's layer is those
    codes dequantized: exactly the rows the artifact's kernels compute with (on an int4 trunk, then quantized like
    it, as ort-int4-portable's artifact is)."""
    from onnx import numpy_helper

    from vqexport.bench.artifact import dense_twin
    from vqexport.head.graph import DENSE_MATMUL, NATIVE_BLOCK
    from vqexport.head.quant import dequantize_rows, quantize_rows

    model = make_model(tmp_path / "untied", vocab=320, hidden=32, tie=False, head=False, tokenizer=small_tokenizer)
    h = random_head(320, 32, 20)
    write_head(model, make_head({"codebook": h.codebook, "map": h.map, "bias": h.bias}, probes=3))
    profile = tmp_path / "codes.toml"
    int4 = ('precision = "int4"\n[trunk]\nsource = "portable"\nblock_size = 32\naccuracy_level = 4\n'
            'quantize_embedding = true\n') if trunk == "int4" else ""
    profile.write_text(f'name = "codes"\nbackend = "ort"\nopset = 21\n{int4}[two_stage]\nrows = "{form}"\n'
                       '[parity]\natol = 100.0\ntop1_agreement_min = 0.0\ntop5_overlap_min = 0.0\nkl_max = 10.0\n'
                       'greedy_must_match = false\n')
    art = api.build(str(profile), model=model, out=tmp_path / "art", steps=2).out
    assert not any(t.name == "head.rows" for t in load_graph(art / "model.onnx").graph.initializer)
    (tmp_path / "twin").mkdir()
    twin = load_graph(dense_twin(art, "model.onnx", tmp_path / "twin"), load_weights=True)
    if trunk == "fp32":
        W = load_file(str(model / "model.safetensors"))["lm_head.weight"]
        if form == "int8":  # 7-bit codes, one scale per row
            want = dequantize_rows(*quantize_rows(W, bits=7))
        else:  # 4-bit codes, one scale per block of NATIVE_BLOCK
            want = dequantize_rows(*quantize_rows(W.reshape(-1, NATIVE_BLOCK), bits=4)).reshape(W.shape)
        got = next(numpy_helper.to_array(t) for t in twin.graph.initializer if t.name == "head.rows_t")
        np.testing.assert_allclose(got.T, want, rtol=0, atol=1e-6)
        assert np.abs(want - W).max() > 1e-4  # the codes' error: the twin is not the fp32 layer
    else:
        assert next(n.op_type for n in twin.graph.node if n.name.startswith(DENSE_MATMUL)) == "MatMulNBits"
    report = json.loads(run_cli("bench", "--artifact", art, "--vs-dense", "--tokens", 2, "--repeats", 1,
                                "--prompt-length", 4, "--json").stdout)
    assert report["ratios"]["tokens_per_s"] > 0
    codes = "7-bit" if form == "int8" else "4-bit"
    assert f"only as the {codes} codes its stage 2 reads" in report["note"]
    assert ("then quantized like the trunk" in report["note"]) == (trunk == "int4")


@pytest.mark.parametrize("tie", [True, False])
def test_an_openvino_artifacts_dense_twin_is_the_dense_model(tie, tied, tmp_path, small_tokenizer):
    """The twin made from an OpenVINO artifact's IR (which ships without its ONNX graph) computes transformers' own
    dense logits at the last position, as the artifact does: the output layer its stage 2 reads rows from (the
    embedding table when tied, the head's copy of lm_head when not), the head's nodes gone."""
    import openvino as ov
    from transformers import AutoModelForCausalLM

    from vqexport.backends.openvino.runner import OvRunner
    from vqexport.backends.openvino.twin import dense_twin_ir
    from vqexport.profiles import parse_profile

    model = tied
    if not tie:
        model = make_model(tmp_path / "untied", arch="qwen2", vocab=320, hidden=64, heads=4, kv_heads=2, tie=False,
                           head=False, tokenizer=small_tokenizer)
        h = random_head(320, 64, 20)
        write_head(model, make_head({"codebook": h.codebook, "map": h.map, "bias": h.bias}, probes=3))
    art = api.build("openvino", model=model, out=tmp_path / "art", steps=2)
    assert not (art.out / "model.onnx").exists() and not (art.out / WEIGHTS_FILE).exists()  # the IR, the head's config
    (tmp_path / "twin").mkdir()
    form = parse_profile(art.manifest["profile"], "manifest", recorded=True).head_form(True)  # as bench reads it
    assert form.last_position_only
    twin, _ = dense_twin_ir(art.out, art.manifest["runtime"], read_artifact_head(art.out), None, True,
                            tmp_path / "twin")
    names = {op.get_friendly_name() for op in ov.Core().read_model(str(twin)).get_ops()}
    assert "head/dense/MatMul" in names and not any(n.startswith(("head/route", "head/exact/scatter", "head/codebook"))
                                                    for n in names)
    ids = np.arange(12).reshape(2, 6) + 100
    with OvRunner(twin) as runner:
        got = runner.step(ids, np.ones_like(ids), runner.empty_past(2)).logits
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()(input_ids=torch.from_numpy(ids)).logits
    assert got.shape == (2, 1, 320)  # the artifact's prefill gives the last position only, and so does its twin
    np.testing.assert_allclose(got, want[:, -1:].numpy(), atol=1e-4)
    if tie:
        return
    rows8 = tmp_path / "rows8.toml"  # rows only as int8 codes: no table to make the twin's layer of
    rows8.write_text('name = "rows8"\nbackend = "openvino"\n[two_stage]\nrows = "int8"\n[parity]\natol = 100.0\n'
                     'top1_agreement_min = 0.0\ntop5_overlap_min = 0.0\nkl_max = 10.0\ngreedy_must_match = false\n')
    art8 = api.build(rows8, model=model, out=tmp_path / "art8", steps=2).out
    assert_user_error(run_cli("bench", "--artifact", art8, "--vs-dense", "--tokens", 2, "--repeats", 1),
                      "reads its rows as quantized codes", 'rows = "shared" or "fp32"')


def _twin_is_the_dense_model(artifact: Path, model: Path, out: Path) -> Path:
    """A two-stage artifact's dense twin (bench --artifact --vs-dense) computes transformers' own dense logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vqexport.backends.ort.runner import OrtRunner
    from vqexport.bench.artifact import dense_twin

    out.mkdir()
    twin = dense_twin(artifact, "model.onnx", out)
    names = {n.name for n in load_graph(twin).graph.node}
    tied = AutoConfig.from_pretrained(str(model)).tie_word_embeddings  # the embedding table is the output layer
    assert ("head/dense/Gemm" if tied else "head/dense/MatMul") in names
    assert not any(n.startswith(("head/route", "head/exact", "head/codebook")) for n in names)
    ids = np.arange(12).reshape(2, 6) + 100
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(out / "optimized.onnx")
    ort.InferenceSession(str(twin), options, providers=["CPUExecutionProvider"])
    V, d = read_head_config(artifact).vocab_size, read_head_config(artifact).hidden_size
    tables = [t.name for t in load_graph(out / "optimized.onnx").graph.initializer if list(t.dims) in ([V, d], [d, V])]
    assert len(tables) == (1 if tied else 2), tables  # ONNX Runtime made no second copy of a tied model's table
    with OrtRunner(twin) as runner:
        got = runner.step(ids, np.ones_like(ids), runner.empty_past(2)).logits
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()(input_ids=torch.from_numpy(ids)).logits
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    return twin


def _int4_twin(artifact: Path, out: Path) -> None:
    """The dense twin of a two-stage head on an int4 trunk: the output layer is the trunk's int4 embedding table
    (read back through onnxruntime's own GatherBlockQuantized), int4 again as MatMulNBits, as the trunk's precision;
    its logits at the tokens the artifact scored exactly are those exact logits, up to the int8 activations of
    MatMulNBits' accuracy level 4 (the fixture's rows and head are unrelated, so every other logit differs)."""
    from vqexport.backends.ort.runner import OrtRunner
    from vqexport.bench.artifact import dense_twin

    out.mkdir()
    twin = dense_twin(artifact, "model.onnx", out)
    head = [n for n in load_graph(twin).graph.node if n.name.startswith("head/dense")]
    assert [n.op_type for n in head] == ["MatMulNBits"]
    attrs = {a.name: a.i for a in head[0].attribute}
    assert attrs["bits"] == 4 and attrs["N"] == 320 and attrs["K"] == 64
    ids = np.arange(12).reshape(2, 6) + 100
    runtime = json.loads((artifact / "manifest.json").read_text())["runtime"]
    with OrtRunner.from_artifact(artifact) as a, OrtRunner.from_runtime(twin, runtime) as b:
        ours = a.step(ids, np.ones_like(ids), a.empty_past(2)).logits[:, -1]
        dense = b.step(ids, np.ones_like(ids), b.empty_past(2)).logits[:, -1]
    # token v is in cluster v % 20 (the fixture's map): the P = 4 probed clusters got the exact logits, which the
    # twin gives too; every other cluster has its VQ logits, which it does not
    worst = np.abs(ours - dense).reshape(2, 16, 20).max(1)  # [row, cluster]
    # (rows = "int8" rescored with an int8 copy of the fp32 rows: within the int4 table's error of the twin)
    assert ((worst < 0.1).sum(1) == 4).all() and ((worst < 0.1) | (worst > 0.5)).all()


def test_int4_genai_trunk_rows_shared_or_int8(tied, tmp_path):
    """On the builder's int4 trunk, rows = "shared" reads the int4 embedding table itself (GatherBlockQuantized);
    the bundled ort-int4 reads an int8 copy (measured faster). (An int4 trunk of this random tiny model is far from
    its fp32 reference, so parity is judged on the demo model elsewhere; here the wiring.)"""
    import dataclasses

    assert importlib.util.find_spec("onnxruntime_genai"), "onnxruntime-genai, a test dependency ('.[test]'), is missing"

    profile = api.load_profile("ort-int4")
    loose = dataclasses.replace(profile.parity, atol=100.0, kl_max=10.0, top1_agreement_min=0.0, top5_overlap_min=0.0)
    shared = dataclasses.replace(profile, name="shared", parity=loose,
                                 two_stage=dataclasses.replace(profile.two_stage, rows="shared"))
    result = api.build(shared, model=tied, out=tmp_path / "shared", steps=2)
    assert np.isfinite(result.parity.max_abs_diff)
    proto = load_graph(result.out / "model.onnx")
    rows = next(n for n in proto.graph.node if n.name == "head/exact/rows")
    lookup = next(n for n in proto.graph.node if n.op_type == "GatherBlockQuantized" and "input_ids" in n.input)
    assert rows.op_type == "GatherBlockQuantized" and rows.input[0] == lookup.input[0]
    _int4_twin(result.out, tmp_path / "twin-shared")
    assert profile.two_stage.rows == "int8"
    result = api.build(dataclasses.replace(profile, parity=loose), model=tied, out=tmp_path / "int8", steps=2)
    _int4_twin(result.out, tmp_path / "twin-int8")
    inits = {t.name: t for t in load_graph(result.out / "model.onnx").graph.initializer}
    cfg = read_head(tied).config  # the int8 copy is laid out by cluster, each cluster's rows transposed
    assert list(inits["head.rows_q"].dims) == [cfg.codebook_size, 64, cfg.cluster_size] and inits["head.rows_q"].data_type == 3
    assert list(inits["head.rows_scale"].dims) == [cfg.codebook_size, cfg.cluster_size]
    out = [o for o in load_graph(result.out / "model.onnx").graph.output if o.name == "logits"][0]
    assert out.type.tensor_type.shape.dim[1].dim_value == 1  # a two-stage head's prefill computes the last position


def test_portable_int4_trunk_with_an_fp32_table_shares_it_and_its_twin_quantizes_it(tied, tmp_path):
    """quantize_embedding = false keeps the tied table fp32: the head reads its exact rows from it, and the dense
    twin's output layer is that table quantized like the trunk (int4), not an fp32 layer on an int4 trunk."""
    import dataclasses

    profile = api.load_profile("ort-int4-portable")
    loose = dataclasses.replace(profile.parity, atol=100.0, kl_max=10.0, top1_agreement_min=0.0, top5_overlap_min=0.0)
    shared = dataclasses.replace(profile, name="shared", parity=loose,
                                 trunk=dataclasses.replace(profile.trunk, quantize_embedding=False),
                                 two_stage=dataclasses.replace(profile.two_stage, rows="shared"))
    result = api.build(shared, model=tied, out=tmp_path / "shared", steps=2)
    proto = load_graph(result.out / "model.onnx")
    rows = next(n for n in proto.graph.node if n.name == "head/exact/rows")
    assert rows.op_type == "Gather" and rows.input[0] == "model.embed_tokens.weight"
    _int4_twin(result.out, tmp_path / "twin")


def test_profile_probes_and_row_forms(tied, tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('backend = "ort"\nname = "p"\n[two_stage]\nprobes = 20\nrows = "int8"\n[parity]\nsteps = 2\natol = 0.5\n'
                 'kl_max = 1e-2\ntop1_agreement_min = 0.9\ntop5_overlap_min = 0.8\ngreedy_must_match = false\n')
    result = api.build(str(f), model=tied, out=tmp_path / "art")
    proto = load_graph(result.out / "model.onnx")
    k = next(t for t in proto.graph.initializer if t.name == "head/route/k")
    assert list(np.frombuffer(k.raw_data, np.int64)) == [20]  # every cluster probed: every logit exact (up to int8)
    assert any(n.op_type == "MatMulInteger" for n in proto.graph.node) and result.parity.passed
    tensors = result.manifest["sizes"]["head"]["tensors"]
    own = tensors["head.rows_q"]["params"] + tensors["head.rows_scale"]["params"]
    assert own == 20 * 64 * 16 + 320  # the int8 copy by cluster [K, d, cap] and a scale per row
    text = " ".join(run_cli("inspect", result.out).stdout.split())
    assert ("two-stage head: 20 cluster scores + 320 exact rows = 340 logits computed per position (106.2% of V = 320); "
            f"stage 2 reads its exact rows from the head's own copy of the output rows ({own:,} params, among the head's)") in text
    f.write_text('backend = "ort"\nname = "p"\n[two_stage]\nprobes = 21\n')
    assert_user_error(run_cli("build", "--target", f, "--model", tied, "--out", tmp_path / "o"), "exceeds the head's codebook_size 20")
    f.write_text('backend = "ort"\nname = "p"\nhead = "fused"\n[ort]\nkernel = "function"\n')
    assert_user_error(run_cli("build", "--target", f, "--model", tied, "--out", tmp_path / "o"), "no second stage")
    import shutil

    ranked = shutil.copytree(tied, tmp_path / "ranked")  # the fused targets name the second stage, not the rank
    write_head(ranked, _two_stage(vocab=320, hidden=64, rank=3))
    for args in (["--target", "ort-fused", "--out", tmp_path / "o"], ["--target", "trt", "--check-only"]):
        assert_user_error(run_cli("build", "--model", ranked, *args), "no second stage", "--head standard")
    assert not (tmp_path / "o").exists()


def _edit(model, **tensors):
    t = load_file(str(model / WEIGHTS_FILE))
    t.update(tensors)
    save_file(t, str(model / WEIGHTS_FILE))


@pytest.mark.parametrize("probes, fragment", [(0, "probes must be an integer >= 1"), (21, "probes must be in [1, codebook_size=20]")])
def test_bad_probes(tied, tmp_path, probes, fragment):
    import shutil

    model = shutil.copytree(tied, tmp_path / "m")
    raw = json.loads((model / CONFIG_FILE).read_text())
    raw["probes"] = probes
    (model / CONFIG_FILE).write_text(json.dumps(raw))
    assert_user_error(run_cli("build", "--model", model, "--out", tmp_path / "o"), fragment)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.__setitem__((0, 1), m[1, 0]), "not a partition of [0, 320): token"),
    (lambda m: m.__setitem__((3, 2), -1), "not a partition of [0, 320): token"),
    (lambda m: m.__setitem__((0, 0), 999), "outside [0, vocab_size=320)"),
    (lambda m: m.__setitem__(5, -1), "not a partition"),
])
def test_member_table_that_is_not_a_partition(tied, tmp_path, change, fragment):
    import shutil

    model = shutil.copytree(tied, tmp_path / "m")
    members = load_file(str(model / WEIGHTS_FILE))["members"].copy()
    change(members)
    _edit(model, members=members)
    assert_user_error(run_cli("build", "--model", model, "--out", tmp_path / "o"), fragment)
    assert not (tmp_path / "o").exists()


def test_rows_that_disagree_or_are_missing(tied, tmp_path, monkeypatch):
    import vqexport.trunk.hf as hf

    monkeypatch.setattr(hf, "output_weight", lambda model: torch.zeros(7, 64))
    assert_user_error(run_cli("build", "--model", tied, "--out", tmp_path / "o"), "output layer", "[7, 64]", "[320, 64]")

    def none(model):
        raise api.VQExportError(f"{type(model).__name__} has no output layer to convert")

    monkeypatch.setattr(hf, "output_weight", none)
    assert_user_error(run_cli("build", "--model", tied, "--out", tmp_path / "o"), "no output layer")
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def converted(tmp_path_factory, small_tokenizer):
    tmp = tmp_path_factory.mktemp("conv")
    dense = make_model(tmp / "dense", arch="qwen2", vocab=320, hidden=32, layers=1, head=False, tokenizer=small_tokenizer)
    text = tmp / "text.txt"
    text.write_text(TEXT)
    result = run_cli("convert", "--from", dense, "-k", 20, "--head", "two-stage", "--distill-text", text, "--out", tmp / "ts",
                     "--steps", 60, "--json")
    assert result.exit_code == 0, result.stderr
    return tmp, json.loads(result.stdout)


def test_convert_two_stage_fits_the_router_on_the_text_or_is_training_free(converted, tmp_path):
    tmp, report = converted
    head = read_head(tmp / "ts")
    assert head.config.type == "two-stage" and head.config.cluster_size == 16  # 320 / 20: equal clusters
    assert np.bincount(head.map, minlength=20).tolist() == [16] * 20
    assert report["clustering"] == "equal-metric" and report["distill_steps"] == 0 and report["router_steps"] == 60
    assert head.config.route_bias and np.abs(head.route_bias).max() > 0
    assert "route bias fitted to the dense cluster mass, 60 steps" in (tmp / "ts" / "MODEL_CARD.md").read_text()
    result = run_cli("convert", "--from", tmp / "dense", "-k", 20, "--head", "two-stage", "--distill-text", tmp / "text.txt",
                     "--steps", 0, "--out", tmp_path / "free", "--json")
    assert result.exit_code == 0, result.stderr
    free, free_report = read_head(tmp_path / "free"), json.loads(result.stdout)
    assert not free.config.route_bias and free.route_bias is None and free_report["router_steps"] == 0
    np.testing.assert_array_equal(free.map, head.map)  # the same clusters; only the router differs
    # the fitted router moved the codebook and the bias, and the tail bias was refitted to the new codebook
    assert not np.allclose(free.codebook, head.codebook) and not np.allclose(free.bias, head.bias)



def test_convert_and_fidelity_count_their_progress_in_each_stage(converted, tmp_path):
    """Each stage's progress counts up to its own total and ends there (a bar sitting at 0% or 100% for minutes
    tells a user nothing): the hidden states, the clustering's passes, the recall curve and the fidelity over the
    held-out positions; fidelity's line counts the tokens its report scores."""
    tmp, report = converted
    calls: dict[str, list] = {}
    api.convert(tmp / "dense", 20, tmp_path / "again", distill_text=tmp / "text.txt", head="two-stage", steps=2,
                progress=lambda label, done, total: calls.setdefault(label, []).append((done, total)))
    for label, seen in calls.items():
        assert len({total for _, total in seen}) == 1, (label, seen)  # one total per stage
        dones = [done for done, _ in seen]
        assert dones == sorted(dones) and 0 <= dones[0] and dones[-1] <= seen[0][1], (label, seen)
    def stage(start):
        return next(seen for label, seen in calls.items() if label.startswith(start))

    for start in ("hidden states of the training text", "clustering", "measuring the probe recall curve",
                  "measuring two-stage fidelity at P = "):
        seen = stage(start)
        assert seen[-1][0] == seen[-1][1] > 1 and len(seen) >= 2, (start, seen)  # counted, and finished
    assert stage("clustering")[0][0] == 0 and len(stage("clustering")) > 3  # from 0, a step per pass
    assert stage("measuring the probe recall curve")[-1][1] == report["two_stage"]["tokens"]  # the held-out positions

    lines = []
    fid = api.fidelity(tmp / "ts", tmp / "text.txt", max_tokens=300, progress=lines.append)
    scoring = [line for line in lines if line.startswith("scoring")]
    assert scoring and scoring[-1] == f"scoring {fid['tokens']:,} tokens with both heads: {fid['tokens']:,} done"


def test_convert_two_stage_recommends_p_from_the_measured_recall_curve(converted):
    tmp, report = converted
    curve = dict(sorted((int(p), r) for p, r in report["recall_curve"].items()))
    values = list(curve.values())
    assert curve[20] == pytest.approx(1.0) and all(a <= b + 1e-12 for a, b in zip(values, values[1:]))
    p = report["probes"]  # the fewest P reaching 99.5%, every P counted: between the curve's powers of two around it
    assert p == report["probes_recommended"]
    assert max([q for q, r in curve.items() if r < 0.995], default=0) < p <= min(q for q, r in curve.items() if r >= 0.995)
    fid = report["two_stage"]
    # measured on the same held-out positions: at least the goal, at most the recall at the next power of two
    below = max([r for q, r in curve.items() if q < p], default=0.0)
    assert max(below, 0.995) <= fid["probe_recall"] <= min(r for q, r in curve.items() if q >= p) + 1e-12
    assert fid["top1_agreement"] >= fid["probe_recall"] - 1e-9
    card = (tmp / "ts" / "MODEL_CARD.md").read_text()
    assert "Two-stage head" in card and "dense argmax inside the probed clusters" in card


def test_probes_costing_most_of_a_dense_layer_are_noted(converted, tmp_path):
    from vqexport.convert.convert import costly_probes_note

    tmp, _ = converted
    for probes, noted in ((3, False), (4, True)):  # K + P * 16 against V / 4 = 80 of V = 320: 68 and 84
        out = tmp_path / f"p{probes}"
        result = run_cli("convert", "--from", tmp / "dense", "-k", 20, "--head", "two-stage", "--distill-text",
                         tmp / "text.txt", "--steps", 0, "--probes", probes, "--out", out)
        assert result.exit_code == 0, result.stderr
        card = (out / "MODEL_CARD.md").read_text()
        assert ("note: P = 4 computes 84 logits per position (20 cluster scores and 64 exact), 26.2% of V = 320"
                in result.stderr) is noted
        assert ("**Note:** P = 4 computes 84 logits" in card) is noted
        assert "router does not narrow" not in card  # the user chose P: no advice about the router
    assert costly_probes_note(5, 80, 320, recommended=True, codebook_size=20) is None
    assert "router does not narrow the vocabulary" in costly_probes_note(5, 81, 320, recommended=True, codebook_size=20)
    assert "(320 cluster scores and 16 exact), 105.0% of V = 320" in costly_probes_note(16, 336, 320, False, 320)


def test_inspect_and_the_card_describe_the_two_stage_head(converted):
    tmp, report = converted
    P = report["probes"]
    text = " ".join(run_cli("inspect", tmp / "ts").stdout.split())  # the console wraps long lines
    assert f"two-stage head K=20 clusters of 16, P={P} probed, router=fitted" in text
    assert text.count("logits computed per position") == 1  # said once, in the sizes' line
    assert "dense head (same V x d + bias, fp32)" in text
    assert (f"two-stage head: 20 cluster scores + {16 * P:,} exact rows = {20 + 16 * P:,} logits computed per position "
            f"({100 * (20 + 16 * P) / 320:.1f}% of V = 320); stage 2 reads its exact rows from the model's output layer (among "
            "the trunk's parameters; a target's [two_stage] rows may copy it)") in text
    listed = json.loads(run_cli("inspect", tmp / "ts", "--json").stdout)["head_tensors"]
    assert sorted(listed) == sorted(load_file(tmp / "ts" / WEIGHTS_FILE)) == ["bias", "codebook", "members", "route_bias"]
    card = (tmp / "ts" / "MODEL_CARD.md").read_text()
    # codebook, member table, route bias, bias (inspect's count); the rows stage 2 reads are the model's
    own = 20 * 32 + 20 * 16 + 20 + 320
    assert (f"| head parameters | {own:,} of its own (codebook, member table, route bias, bias; the member table is "
            f"[20, 16]); stage 2 reads the model's own output layer ({320 * 32:,} parameters, V x d), not stored in the "
            "head |") in card
    assert json.loads(run_cli("inspect", tmp / "ts", "--json").stdout)["sizes"]["head"]["params"] == own
    assert "The held-out text also chose P, so its figures are somewhat optimistic" in card  # one clustering: P alone
    from vqexport.convert.convert import model_card

    given = model_card({**report, "probes_recommended": P + 1}, read_head(tmp / "ts").config)  # as if --probes was given
    assert "Held-out" in given and "also chose" not in given


def test_fewest_probes_counts_every_p():
    from vqexport.convert.convert import fewest_probes

    ranks = torch.tensor([90.0, 5, 3, 1, 1, 0, 0, 0], dtype=torch.float64)  # positions by their argmax cluster's rank
    assert [fewest_probes(ranks, g) for g in (0.9, 0.95, 0.96, 0.98, 0.99, 1.0)] == [1, 2, 3, 3, 4, 5]


def test_recall_curve_counts_a_tied_cluster_after_the_others():
    """Clusters with equal router scores (identical codebook rows: untrained tokens clustered apart): TopK probes only
    some of them, so the recall curve must not count the argmax's cluster as probed at P = 1."""
    from vqexport.convert.convert import SEQ, fewest_probes, probe_ranks
    from vqexport.head.spec import HeadConfig
    from vqexport.head.module import VQLogitsHead

    rng = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, generator=rng)
    head = VQLogitsHead(HeadConfig(vocab_size=8, hidden_size=4, codebook_size=2, bias=False))
    with torch.no_grad():
        head.codebook.copy_(torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        head.map.copy_(torch.arange(8) % 2)
    states = torch.randn(2, SEQ, 4, generator=rng)
    ranks = probe_ranks(lambda x: states[: len(x)], DenseHead(weight), head, torch.zeros(2 * SEQ + 1, dtype=torch.long), {})
    assert ranks.tolist() == [0.0, 2 * SEQ] and fewest_probes(ranks, 0.995) == 2


def test_fidelity_command_measures_the_same(converted):
    tmp, report = converted
    result = run_cli("fidelity", "--model", tmp / "ts", "--text", tmp / "text.txt", "--json")
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["head"]["type"] == "two-stage" and r["probes"] == report["probes"]
    assert r["tokens"] > report["two_stage"]["tokens"]  # the whole text, not the held-out tenth
    assert 0.9 <= r["probe_recall"] <= 1 and r["ppl_change"] > -0.5
    all_probed = json.loads(run_cli("fidelity", "--model", tmp / "ts", "--text", tmp / "text.txt", "--probes", 20, "--json").stdout)
    assert all_probed["ppl_change"] == pytest.approx(0.0, abs=1e-4) and all_probed["top1_agreement"] == 1.0  # P = K: dense
    assert all_probed["ideal_routing_ppl_change"] == pytest.approx(0.0, abs=1e-4)
    assert r["ideal_routing_top1_agreement"] >= r["probe_recall"] - 0.02
    assert_user_error(run_cli("fidelity", "--model", tmp / "ts", "--text", tmp / "text.txt", "--probes", 21), "--probes must be in")
    for probes in (3.0, True):  # from the Python API: not an integer, refused as the CLI's range is
        with pytest.raises(VQExportError, match=r"--probes must be in \[1, codebook size 20\], got"):
            api.fidelity(tmp / "ts", tmp / "text.txt", probes=probes)
        with pytest.raises(VQExportError, match=r"--probes must be in"):
            api.convert(tmp / "dense", 20, tmp / "never", head="two-stage", probes=probes)
    assert_user_error(run_cli("fidelity", "--text", tmp / "text.txt", "--probes", 3), "applies to a two-stage head")


def test_fidelity_scores_windows_of_the_given_length(converted, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tmp, _ = converted
    ts, text = tmp / "ts", tmp / "text.txt"
    base = json.loads(run_cli("fidelity", "--model", ts, "--text", text, "--json").stdout)
    r = json.loads(run_cli("fidelity", "--model", ts, "--text", text, "--window", 48, "--json").stdout)
    ids = torch.tensor(Tokenizer.from_file(str(ts / "tokenizer.json")).encode(text.read_text()).ids)
    n = (len(ids) - 1) // 48
    assert (base["window"], r["window"], r["tokens"]) == (128, 48, n * 48)
    model = AutoModelForCausalLM.from_pretrained(ts).eval()  # the dense model alone, window by window
    with torch.no_grad():
        logits = model(input_ids=ids[: n * 48].view(n, 48)).logits
        h = model.model(input_ids=ids[: n * 48].view(n, 48)).last_hidden_state
        vq = head_module(read_head(ts), model.lm_head.weight)(h)
    targets = ids[1 : n * 48 + 1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), targets)
    assert r["dense_ppl"] == pytest.approx(float(nll.exp()), rel=1e-6)
    nll = torch.nn.functional.cross_entropy(vq.flatten(0, 1).double(), targets)
    assert r["vq_ppl"] == pytest.approx(float(nll.exp()), rel=1e-5)
    one = json.loads(run_cli("fidelity", "--model", ts, "--text", text, "--window", 48, "--max-tokens", 60, "--json").stdout)
    assert one["tokens"] == 48  # --max-tokens: whole windows, at least one
    assert_user_error(run_cli("fidelity", "--model", ts, "--text", text, "--window", 1), "--window must be in [2,")
    assert_user_error(run_cli("fidelity", "--model", ts, "--text", text, "--window", 257), "maximum positions 256")
    assert_user_error(run_cli("fidelity", "--model", ts, "--text", text, "--max-tokens", 0), "--max-tokens must be at least 1")
    short = tmp_path / "short.txt"
    short.write_text(text.read_text()[:60])  # fewer tokens than one window and the next token
    assert_user_error(run_cli("fidelity", "--model", ts, "--text", short), "too short for scoring")


def test_convert_two_stage_bad_input(converted, tmp_path):
    tmp, _ = converted
    assert_user_error(run_cli("convert", "--from", tmp / "dense", "-k", 20, "--probes", 3, "--out", tmp_path / "o"),
                      "--probes applies to --head two-stage only")
    assert_user_error(run_cli("convert", "--from", tmp / "dense", "-k", 20, "--head", "two-stage", "--probes", 30,
                              "--out", tmp_path / "o"), "--probes must be in [1, codebook size 20]")
    assert_user_error(run_cli("convert", "--from", tmp / "dense", "-k", 20, "--head", "two-stage", "--clustering", "equal-metric",
                              "--out", tmp_path / "o"), "--clustering equal-metric clusters in the metric of the model's hidden states: it needs --distill-text")
    for method in ("euclidean", "balanced-spherical"):  # unequal sizes: the largest cluster would set every probe's cost
        assert_user_error(run_cli("convert", "--from", tmp / "dense", "-k", 20, "--head", "two-stage", "--clustering", method,
                                  "--out", tmp_path / "o"), "--head two-stage needs equal-size clusters")
    assert not (tmp_path / "o").exists()
    # without text there are no hidden states to measure: a two-stage head's clusters are spherical
    result = run_cli("convert", "--from", tmp / "dense", "-k", 20, "--head", "two-stage", "--rank", 2, "--steps", 0,
                     "--out", tmp_path / "free", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["clustering"] == "equal-spherical" and report["out"] == str((tmp_path / "free").resolve())
    card = (tmp_path / "free" / "MODEL_CARD.md").read_text()
    assert "P recommended without text, where no recall can be measured: K/16 = 1." in card and "held-out recall" not in card
    assert "fitted to the residual W - C[M] |" in card and "then distilled" not in card  # nothing was distilled


def test_route_bias_key_and_tensor_are_checked(tmp_path):
    head = _two_stage(route=True)
    write_head(tmp_path, head)
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert cfg["route_bias"] is True
    for change, fragment in ((dict(route_bias="yes"), "route_bias must be true or false"),
                             (dict(type="vq", cluster_size=None, probes=None), "route_bias applies to a two-stage head only")):
        bad = {k: v for k, v in {**cfg, **change}.items() if v is not None}
        (tmp_path / CONFIG_FILE).write_text(json.dumps(bad))
        with pytest.raises(api.VQExportError, match=fragment):
            read_head(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    tensors = load_file(str(tmp_path / WEIGHTS_FILE))
    save_file({k: v for k, v in tensors.items() if k != "route_bias"}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(api.VQExportError, match="missing tensor.s. route_bias"):
        read_head(tmp_path)


def test_convert_two_stage_with_rank_distills_the_tail(converted, tmp_path):
    tmp, _ = converted
    result = run_cli("convert", "--from", tmp / "dense", "-k", 20, "--head", "two-stage", "--rank", 2, "--steps", 20,
                     "--distill-text", tmp / "text.txt", "--out", tmp_path / "r2", "--json")
    assert result.exit_code == 0, result.stderr
    report, head = json.loads(result.stdout), read_head(tmp_path / "r2")
    assert report["router_steps"] == 20 and report["tail_distill_steps"] == 20 and report["distill_steps"] == 0
    assert head.config.rank == 2 and head.config.route_bias and head.lowrank[0].shape == (2, 32)
    card = (tmp_path / "r2" / "MODEL_CARD.md").read_text()
    assert "| tail distillation (trunk frozen) | 20 steps on the two-stage distribution |" in card
    assert "fitted to the residual W - C[M], then distilled |" in card
    assert "head-only distillation" not in card and "after distillation" not in card  # the plain head is not distilled
    assert card.count("every token its VQ logit (no probes)") == 1
    free = run_cli("convert", "--from", tmp / "dense", "-k", 20, "--head", "two-stage", "--rank", 2, "--steps", 0,
                   "--distill-text", tmp / "text.txt", "--out", tmp_path / "r2free", "--json")
    assert json.loads(free.stdout)["tail_distill_steps"] == 0  # training-free: nothing distilled


def test_generate_notes_new_tokens_the_tokenizer_has_no_text_for(tied, tmp_path):
    """The tiny model's vocabulary (320) is larger than its tokenizer's (about 300), as Qwen2.5's is: tokens past the
    tokenizer print as nothing, and generate says so instead of printing a bare prompt."""
    from tokenizers import Tokenizer

    art = api.build("ort", model=tied, out=tmp_path / "art", steps=2).out
    size = Tokenizer.from_file(str(art / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    gen = api.generate(art, "def main(", 48, sample=True, seed=0)
    untold = sum(i >= size for i in gen.new_ids)
    assert gen.without_text == untold > 0
    result = run_cli("generate", "--artifact", art, "--prompt", "def main(", "-n", 48, "--sample", "--seed", 0)
    assert result.exit_code == 0, result.stderr
    assert f"note: {untold} of the {len(gen.new_ids)} new tokens have ids the tokenizer has no text for" in result.stderr


def test_the_dense_twin_computes_as_many_positions_as_the_two_stage_artifact(tied, tmp_path, monkeypatch):
    """A two-stage artifact gives the last position's logits only (its default): its twin must too, or the time to
    first token compares one position's head with the whole prompt's."""
    from vqexport.bench import artifact as bench_artifact

    art = api.build("ort", model=tied, out=tmp_path / "art", steps=1).out
    outputs = {o.name: o for o in load_graph(art / "model.onnx").graph.output}
    assert outputs["logits"].type.tensor_type.shape.dim[1].dim_value == 1
    seen = []
    real = bench_artifact.dense_twin
    monkeypatch.setattr(bench_artifact, "dense_twin", lambda *a, **k: seen.append(k) or real(*a, **k))
    bench_artifact.run_artifact_bench(art, vs_dense=True, prompt_len=8, tokens=2, repeats=1)
    assert seen == [{"last_position_only": True}]

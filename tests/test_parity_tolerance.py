"""The logits' tolerance: it grows to a few times PyTorch's own float32 error (the model in float64) when a target's
atol is tighter than that error, and only then; --atol / --rtol replace a profile's."""

import json

import numpy as np
import pytest
import torch

from vqexport import api
from vqexport.backends.base import Runner, StepOutput
from vqexport.backends.torch_ref import TorchRunner
from vqexport.errors import ParityError
from vqexport.profiles import Parity
from vqexport.source import resolve_source
from vqexport.verify import compare_runners, needs_reference_error, with_reference_error

from .conftest import assert_user_error, run_cli
from .models import make_model


class _Offset(Runner):
    """Logits linspace(-1, 1, V) + ``offset`` on token 0 at every position."""

    def __init__(self, offset=0.0, vocab=10):
        self.kv_shapes, self.vocab_size, self.offset = [(1, 2)], vocab, offset

    def step(self, input_ids, attention_mask, past):
        b, s = input_ids.shape
        logits = np.tile(np.linspace(-1, 1, self.vocab_size, dtype=np.float32), (b, s, 1))
        logits[..., 0] += self.offset
        return StepOutput(logits=logits, present=[np.zeros((b, 1, attention_mask.shape[1], 2), np.float32)] * 2)


def _report(offset, parity):
    with _Offset() as r, _Offset(offset) as t:
        return compare_runners(r, t, [[1, 2, 3]], 2, parity)


def test_the_tolerance_grows_to_the_factor_times_the_reference_error_and_no_further():
    parity = Parity(steps=2, atol=1e-4, kl_max=1.0)
    report = _report(3e-4, parity)
    assert not report.passed and report.allowed_atol == 1e-4 and needs_reference_error(report, parity)
    assert report.reference_error is None and "allowed atol 0.0001)" in report.failures[0]
    assert not any("near-ties" in f for f in report.failures)  # logits beyond the tolerance: no near-tie hint

    passed = with_reference_error(report, parity, 1e-4)  # 4 x 1e-4 >= 3e-4
    assert passed.passed and passed.failures == [] and passed.allowed_atol == pytest.approx(4e-4)
    assert passed.reference_error == 1e-4

    failed = with_reference_error(report, parity, 5e-5)  # 4 x 5e-5 < 3e-4
    assert not failed.passed and failed.allowed_atol == pytest.approx(2e-4)
    assert "allowed atol 0.0002: the larger of 0.0001 and 4 x PyTorch's own float32 error 5e-05" in failed.failures[0]

    small = with_reference_error(report, parity, 1e-6)  # the error only ever widens atol
    assert not small.passed and small.allowed_atol == 1e-4

    for error, note, says in ((None, "no memory", "not measured: no memory"),
                              (float("inf"), "", "not measured: the float64 reference gave non-finite logits")):
        unmeasured = with_reference_error(report, parity, error, note)
        assert not unmeasured.passed and unmeasured.reference_error is None and says in unmeasured.failures[0]


def test_the_reference_error_is_not_wanted_when_it_cannot_change_the_verdict():
    parity = Parity(steps=2, atol=1e-4, kl_max=1.0)
    assert not needs_reference_error(_report(5e-5, parity), parity)  # atol is met
    assert not needs_reference_error(_report(3e-4, parity), Parity(steps=2, atol=1e-4, kl_max=1.0, reference_error_factor=0))
    nan = _report(float("nan"), parity)
    assert nan.nonfinite_values and not needs_reference_error(nan, parity)


def test_other_criteria_still_fail_within_the_grown_tolerance():
    parity = Parity(steps=2, atol=1e-4, kl_max=1e-9)
    report = with_reference_error(_report(0.05, parity), parity, 0.1)
    assert [f.split(" ")[:2] for f in report.failures] == [["mean", "KL"]]


def _float32_and_float64(source):
    return TorchRunner.from_source(source), TorchRunner.from_source(source, dtype=torch.float64)


def test_the_float64_reference_computes_the_same_model_in_float64(tmp_path):
    src = resolve_source("demo")
    r32, r64 = _float32_and_float64(src)
    assert {p.dtype for p in r64.trunk.parameters()} == {torch.float64}
    assert {p.dtype for p in r64.head.parameters()} == {torch.float64}
    ids = np.arange(3, 12).reshape(1, -1)
    mask = np.ones_like(ids)
    with r32 as a, r64 as b:
        la, lb = a.step(ids, mask, a.empty_past(1)), b.step(ids, mask, b.empty_past(1))
    assert lb.logits.dtype == np.float64 and lb.present[0].dtype == np.float64
    diff = np.abs(la.logits - lb.logits).max()
    assert 0 < diff < 1e-4  # float32 rounding, nothing more


def test_a_two_stage_float64_reference_reads_its_rows_from_the_float64_model(tmp_path):
    dense = make_model(tmp_path / "dense", head=False, vocab=120, hidden=32)
    converted = run_cli("convert", "--from", dense, "-k", 12, "--head", "two-stage", "--probes", 3, "--out", tmp_path / "ts")
    assert converted.exit_code == 0, converted.stderr
    r64 = TorchRunner.from_source(resolve_source(tmp_path / "ts"), dtype=torch.float64)
    embed = r64.trunk.decoder.get_input_embeddings().weight
    assert r64.head.rows.dtype == torch.float64 and r64.head.rows.data_ptr() == embed.data_ptr()  # shared, not a copy


def _target(tmp_path, atol, factor):
    from vqexport.profiles import bundled_dir

    base = (bundled_dir() / "ort.toml").read_text()
    body = base.replace("atol = 1e-4", f"atol = {atol}").replace('name = "ort"', 'name = "tight"')
    body = body.replace("[parity]\n", f"[parity]\nreference_error_factor = {factor}\n")
    assert body.count(f"atol = {atol}") == 1 and "reference_error_factor" in body
    path = tmp_path / f"tight-{factor}.toml"
    path.write_text(body)
    return str(path)


def test_a_target_tighter_than_pytorch_itself_passes_within_its_own_error(tmp_path):
    result = api.build(_target(tmp_path, 1e-9, 4), out=tmp_path / "art")
    r = result.parity
    assert r.passed and r.max_abs_diff > 1e-9  # atol alone would have failed it
    assert 0 < r.reference_error < 1e-4 and r.allowed_atol == pytest.approx(4 * r.reference_error)
    assert r.max_abs_diff <= r.allowed_atol
    manifest = json.loads((result.out / "manifest.json").read_text())
    assert manifest["parity"]["reference_error"] == r.reference_error
    again = run_cli("verify", "--artifact", result.out, "--json")
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["reference_error"] == pytest.approx(r.reference_error, rel=1e-6)


@pytest.mark.parametrize("factor, says", [(0, "allowed atol 1e-09)"),
                                          (0.001, "x PyTorch's own float32 error")])
def test_a_target_beyond_its_factor_fails_and_writes_nothing(tmp_path, factor, says):
    out = tmp_path / "art"
    result = run_cli("build", "--target", _target(tmp_path, 1e-9, factor), "--out", out, "--json")
    assert result.exit_code == 1, result.stderr
    report = json.loads(result.stdout)
    assert not report["passed"] and says in report["failures"][0]
    assert (report["reference_error"] is None) == (factor == 0)
    assert not out.exists()


def test_without_memory_for_the_float64_model_it_says_so(tmp_path, monkeypatch):
    import vqexport.build as build

    monkeypatch.setattr(build, "available_memory", lambda: 1 << 20)
    with pytest.raises(ParityError) as e:
        api.build(_target(tmp_path, 1e-9, 4), out=tmp_path / "art")
    assert "not measured: the model in float64 needs" in e.value.report.failures[0]
    assert "0.0 GiB is available" in e.value.report.failures[0] and not (tmp_path / "art").exists()


def test_a_model_that_does_not_run_in_float64_says_so(tmp_path, monkeypatch):
    original = TorchRunner.from_source.__func__

    def float32_only(cls, source, trunk=None, dtype=torch.float32):
        if dtype != torch.float32:
            raise RuntimeError("expected scalar type Float but found Double\nmore lines")
        return original(cls, source, trunk, dtype)

    monkeypatch.setattr(TorchRunner, "from_source", classmethod(float32_only))
    with pytest.raises(ParityError) as e:
        api.build(_target(tmp_path, 1e-9, 4), out=tmp_path / "art")
    assert ("not measured: the model does not run in float64 (RuntimeError: expected scalar type Float but found Double)"
            in e.value.report.failures[0])


def test_a_negative_factor_is_refused(tmp_path):
    assert_user_error(run_cli("build", "--target", _target(tmp_path, 1e-4, -1), "--out", tmp_path / "art"),
                      "reference_error_factor")
    assert not (tmp_path / "art").exists()


def test_tolerances_given_on_the_command_line_are_recorded_and_can_be_replaced_for_a_check(tmp_path):
    out = tmp_path / "art"
    built = run_cli("build", "--atol", 0.25, "--rtol", 0.5, "--out", out, "--json")
    assert built.exit_code == 0, built.stderr
    manifest = json.loads(built.stdout)
    assert manifest["profile"]["parity"]["atol"] == 0.25 and manifest["profile"]["parity"]["rtol"] == 0.5
    assert manifest["parity"]["tolerances"]["atol"] == 0.25 and manifest["parity"]["reference_error"] is None

    again = json.loads(run_cli("verify", "--artifact", out, "--json").stdout)
    assert again["tolerances"]["atol"] == 0.25 and again["tolerances"]["rtol"] == 0.5
    tight = run_cli("verify", "--artifact", out, "--atol", 1e-12, "--rtol", 0, "--json")
    report = json.loads(tight.stdout)
    assert report["tolerances"]["atol"] == 1e-12 and report["tolerances"]["rtol"] == 0.0
    assert report["reference_error"] is not None  # measured because 1e-12 was missed
    assert tight.exit_code == 0 and report["passed"] and report["allowed_atol"] == pytest.approx(4 * report["reference_error"])
    assert json.loads((out / "manifest.json").read_text())["profile"]["parity"]["atol"] == 0.25  # the check changed nothing


@pytest.mark.parametrize("args, says", [(("--atol", "nan"), "--atol must be a finite number >= 0"),
                                        (("--atol", "inf"), "--atol must be a finite number >= 0, got inf"),
                                        (("--rtol", "-1"), "--rtol must be a finite number >= 0"),
                                        (("--atol", "1e-3", "--check-only"), "--check-only cannot be combined with --atol")])
def test_bad_tolerances_are_refused(tmp_path, args, says):
    assert_user_error(run_cli("build", *args, "--out", tmp_path / "art") if "--check-only" not in args
                      else run_cli("build", *args), says)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("value", ["abc", [1], True, float("inf")])
def test_tolerances_from_the_api_are_checked_as_the_cli_s(tmp_path, value):
    with pytest.raises(api.VQExportError, match="--atol must be a finite number >= 0"):
        api.build("ort", out=tmp_path / "art", atol=value)
    assert not (tmp_path / "art").exists()


@pytest.mark.parametrize("head", ["vq", "two-stage"])
def test_the_reference_s_prefill_computes_the_head_only_where_it_is_read(tmp_path, head):
    """TorchRunner.prefill holds the trunk's hidden states, not [B, S, V] logits (and a two-stage head's two more
    [B, S, V] parts): the values at the positions read are the step's own, to float32 rounding (the head's matmuls
    are of other shapes)."""
    dense = make_model(tmp_path / "dense", head=False, vocab=120, hidden=32)
    converted = run_cli("convert", "--from", dense, "-k", 12, "--head", head, "--out", tmp_path / "m")
    assert converted.exit_code == 0, converted.stderr
    ids = np.array([[0, 0, 5, 9, 33], [7, 8, 9, 10, 11]])
    mask = (np.arange(5) >= np.array([[2], [0]])).astype(np.int64)
    with TorchRunner.from_source(resolve_source(tmp_path / "m")) as ref:
        full, lazy = ref.step(ids, mask, ref.empty_past(2)), ref.prefill(ids, mask, ref.empty_past(2))
    assert lazy.logits is None and lazy.length == 5
    b, s = np.nonzero(mask)
    got = lazy.at(b, s)
    close = dict(rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.logits, full.logits[b, s], **close)
    assert set(got.extra) == set(full.extra) == ({"route_scores", "exact_logits", "vq_logits"} if head == "two-stage" else set())
    for name, value in full.extra.items():
        np.testing.assert_allclose(got.extra[name], value[b, s], **close)
    np.testing.assert_allclose(lazy.last().logits, full.logits[:, -1], **close)
    assert lazy.last().logits.shape == (2, 120)
    for a, c in zip(lazy.present, full.present):
        np.testing.assert_array_equal(a, c)

"""bench --head runs and reports every column (figures are never asserted against wall-clock goals)."""

import json

import pytest

from .conftest import assert_user_error, run_cli


def test_bench_head_json_shape():
    result = run_cli("bench", "--head", "--shapes", "tiny", "--seconds", "0.05", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"machine", "rows", "bandwidth_gbps", "variants"} <= set(out)
    (row,) = out["rows"]
    assert (row["name"], row["V"], row["d"], row["K"]) == ("tiny", 4099, 64, 256)
    for key in ("dense_ms", "dense_int8_ms", "vq_ms", "vq_int8_ms", "fused_ms", "fused_function_ms", "topk_ms"):
        assert row[key] > 0
    assert {v["variant"] for v in out["variants"]} >= {"dense", "vq_gather", "vq_gather_elements", "topk_int8_acc4", "fused_kernel",
                                                       "fused_function", "vq_int8_native_gather_elements"}
    assert all(v["bytes"] > 0 for v in out["variants"])
    # the rank-8 correction's rows: logits path, exact top-k over the V logits, exact top-k by cluster bounds
    assert row["rank"] == 8
    for key in ("vq_lowrank_ms", "vq_lowrank_best_ms", "topk_lowrank_logits_ms", "topk_lowrank_bounds_ms"):
        assert row[key] > 0
    assert 0 < row["topk_lowrank_bounds_tokens_scored"] <= 4099
    assert not row["vq_form"].startswith("vq_r")  # the plain head's figures are the plain head's
    assert {"vq_r8_gather_elements", "vq_r8_int8_native", "topk_r8_logits_int8", "prune_r8_numpy"} <= {v["variant"] for v in out["variants"]}


def test_bench_head_table_and_rank_zero():
    result = run_cli("bench", "--head", "--shapes", "tiny", "--seconds", "0.05")
    assert result.exit_code == 0, result.stderr
    assert "rank-8" in result.stdout and "bounds" in result.stdout  # the correction's table (wrapping varies with width)
    out = json.loads(run_cli("bench", "--head", "--shapes", "tiny", "--seconds", "0.05", "--rank", "0", "--json").stdout)
    assert "rank" not in out["rows"][0] and not [v for v in out["variants"] if "_r" in v["variant"]]


def test_bench_needs_a_subject_and_known_shapes():
    assert_user_error(run_cli("bench"), "--head")
    assert_user_error(run_cli("bench", "--head", "--shapes", "gpt5"), "unknown head shape(s) gpt5")


def test_bench_artifact_vs_dense(demo_artifact):
    result = run_cli("bench", "--artifact", demo_artifact, "--vs-dense", "--prompt-length", 16, "--tokens", 4, "--repeats", 2, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    for side in ("vq", "dense"):
        for key in ("ttft_ms", "decode_ms_p50", "decode_ms_p90", "decode_ms_p99", "tokens_per_s", "peak_rss_mb", "model_bytes"):
            assert out[side][key] > 0
        assert out[side]["decode_ms_p50"] <= out[side]["decode_ms_p99"]
    assert out["dense"]["model_bytes"] > out["vq"]["model_bytes"]  # the twin carries the V x d matrix
    # the demo ties its embeddings: its own dense model would not carry that matrix, and the report says so
    assert out["note"].startswith("the model ties its embeddings") and f"{4 * 8192 * 128:,} bytes" in out["note"]
    table = run_cli("bench", "--artifact", demo_artifact, "--vs-dense", "--prompt-length", 16, "--tokens", 2, "--repeats", 1)
    assert "note: the model ties its embeddings" in table.stdout
    assert set(out["ratios"]) >= {"ttft", "decode_p50", "tokens_per_s", "model_bytes", "peak_rss"}
    assert out["repeats"] == 2


def test_a_path_with_brackets_is_printed_as_it_is(demo_artifact, tmp_path):
    """Rich reads "[/x]" as a closing tag: the table's first line printed the user's path through markup and raised
    after the whole measurement."""
    import shutil

    art = shutil.copytree(demo_artifact, tmp_path / "b[/x]" / "[exp]art")
    result = run_cli("bench", "--artifact", art, "--prompt-length", 4, "--tokens", 2, "--repeats", 1)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"{art} (ort) on ")


def test_dense_twin_has_identical_logits(demo_artifact, tmp_path):
    """The twin is the artifact's own trunk with one V x d MatMul computing the same logits as the VQ head."""
    import numpy as np

    from vqexport.backends.ort.runner import OrtRunner
    from vqexport.bench.artifact import dense_twin
    from vqexport.graph_io import load_graph

    twin = dense_twin(demo_artifact, "model.onnx", tmp_path)
    proto = load_graph(twin)
    names = {n.name for n in proto.graph.node}
    assert "head/dense/MatMul" in names and not any(n.startswith(("head/select", "head/codebook")) for n in names)
    trunk = {t.name for t in load_graph(demo_artifact / "model.onnx").graph.initializer if not t.name.startswith("head")}
    assert trunk <= {t.name for t in proto.graph.initializer}
    ids = np.arange(12).reshape(2, 6) + 100
    with OrtRunner(demo_artifact / "model.onnx") as a, OrtRunner(twin) as b:
        la = a.step(ids, np.ones_like(ids), a.empty_past(2)).logits
        lb = b.step(ids, np.ones_like(ids), b.empty_past(2)).logits
    np.testing.assert_allclose(la, lb, atol=1e-4)


def test_a_prompt_whose_logits_cannot_fit_in_memory_is_refused(demo_artifact, monkeypatch):
    """The demo's graph outputs logits at every prompt position: a --prompt-length whose [1, S, V] float32 prefill
    output, three times over at its peak, exceeds the memory available is one line, exit 2, before any run starts."""
    import vqexport.bench.artifact as bench
    import vqexport.build as build

    monkeypatch.setattr(bench, "_in_worker", lambda *a, **k: pytest.fail("a run started"))
    monkeypatch.setattr(build, "available_memory", lambda: 3 * 64 * 8192 * 4 - 1)  # 64 positions of V = 8,192: 1 byte short
    assert_user_error(run_cli("bench", "--artifact", demo_artifact, "--vs-dense", "--prompt-length", 64, "--tokens", 2),
                      "bench: the target's logits need about", "a prompt of 64 tokens x V = 8,192 float32",
                      "give a shorter --prompt-length")
    monkeypatch.undo()
    monkeypatch.setattr(build, "available_memory", lambda: 3 * 64 * 8192 * 4)
    assert run_cli("bench", "--artifact", demo_artifact, "--prompt-length", 64, "--tokens", 2, "--repeats", 1).exit_code == 0

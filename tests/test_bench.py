"""bench --head runs and reports every column (figures are never asserted against wall-clock goals)."""

import json

from .conftest import assert_user_error, run_cli


def test_bench_head_json_shape():
    result = run_cli("bench", "--head", "--shapes", "tiny", "--seconds", "0.05", "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"machine", "rows", "bandwidth_gbps", "variants"} <= set(out)
    (row,) = out["rows"]
    assert (row["name"], row["V"], row["d"], row["K"]) == ("tiny", 4099, 64, 256)
    for key in ("dense_ms", "dense_int8_ms", "vq_ms", "vq_int8_ms", "topk_ms"):
        assert row[key] > 0
    assert "fused_ms" in row
    assert {v["variant"] for v in out["variants"]} >= {"dense", "vq_gather", "vq_gather_elements", "topk_int8_acc4"}
    assert all(v["bytes"] > 0 for v in out["variants"])


def test_bench_needs_a_subject_and_known_shapes():
    assert_user_error(run_cli("bench"), "--head")
    assert_user_error(run_cli("bench", "--head", "--shapes", "gpt5"), "unknown head shape(s) gpt5")

"""A real vocabulary and width: a random-weight Qwen2 of the Qwen2.5-0.5B head shape (V = 151,936, d = 896, one layer,
tied embeddings) goes through convert (K = V/32) -> build --target ort -> verify, as a user would run it; and through
convert --head two-stage (clusters of 64, router fitted and a rank-4 tail distilled on text) -> build."""

import json

import numpy as np
import pytest

from vqexport.graph_io import load_graph
from vqexport.head.spec import read_head

from .conftest import run_cli, sample_text
from .models import hf_config, save_hf

V, D = 151_936, 896
K = V // 32


@pytest.fixture(scope="module")
def dense(tmp_path_factory, small_tokenizer):
    return save_hf(tmp_path_factory.mktemp("real") / "qwen",
                   hf_config("qwen2", vocab=V, hidden=D, layers=1, heads=14, kv_heads=2, ffn=4864, max_position=32768,
                             rope_theta=1e6), tokenizer=small_tokenizer)


@pytest.fixture(scope="module")
def pipeline(dense):
    tmp = dense.parent
    converted = run_cli("convert", "--from", dense, "--codebook-size", K, "--clustering", "spherical", "--out", tmp / "vq", "--json")
    assert converted.exit_code == 0, converted.stderr
    built = run_cli("build", "--target", "ort", "--model", tmp / "vq", "--out", tmp / "art", "--steps", 8, "--json")
    assert built.exit_code == 0, built.stderr
    return tmp, json.loads(built.stdout)


def test_convert_writes_a_head_of_the_real_shape(pipeline):
    tmp, _ = pipeline
    head = read_head(tmp / "vq")
    assert head.codebook.shape == (K, D) and head.map.shape == (V,) and head.map.dtype == np.int32
    assert len(np.unique(head.map)) == K  # every code used
    assert (tmp / "vq" / "model.safetensors").read_bytes() == (tmp / "qwen" / "model.safetensors").read_bytes()


def test_build_passes_parity_with_weights_in_external_data(pipeline):
    tmp, manifest = pipeline
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-4
    files = manifest["files"]
    assert files["model.onnx.data"]["bytes"] > 500e6 and files["model.onnx"]["bytes"] < 1e6
    assert not any("optimized" in f for f in files)  # one copy of the weights
    proto = load_graph(tmp / "art" / "model.onnx")
    assert [o.dims[-1] for o in proto.graph.initializer if o.name == "head.map"] == [V]


def test_verify_reruns_parity_on_it(pipeline):
    tmp, _ = pipeline
    r = run_cli("verify", "--artifact", tmp / "art", "--steps", 4, "--json")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["passed"] is True


K2 = V // 64  # two-stage: clusters of 64, half the k-means work of V/32 (V and d are what is at stake here)
PROBES = K2 // 16


@pytest.fixture(scope="module")
def two_stage(dense, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real_two_stage")
    text = tmp / "text.txt"
    text.write_text(sample_text(8000))
    converted = run_cli("convert", "--from", dense, "--codebook-size", K2, "--head", "two-stage", "--rank", 4, "--steps", 2,
                        "--probes", PROBES, "--distill-text", text, "--out", tmp / "ts", "--json")
    assert converted.exit_code == 0, converted.stderr
    built = run_cli("build", "--target", "ort", "--model", tmp / "ts", "--out", tmp / "art", "--steps", 8, "--json")
    assert built.exit_code == 0, built.stderr
    return tmp, json.loads(converted.stdout), json.loads(built.stdout)


def test_two_stage_converts_with_router_and_tail_at_the_real_shape(two_stage):
    tmp, report, _ = two_stage
    assert report["router_steps"] == 2 and report["tail_distill_steps"] == 2 and report["probes"] == PROBES
    head = read_head(tmp / "ts")
    assert head.two_stage and head.members.shape == (K2, 64) and head.route_bias.shape == (K2,)
    assert head.lowrank[1].shape == (V, 4)


def test_two_stage_builds_reading_the_shared_table_and_passes_parity(two_stage, pipeline):
    tmp, _, manifest = two_stage
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-4
    proto = load_graph(tmp / "art" / "model.onnx")
    names = {o.name for o in proto.graph.initializer}
    assert "head.members" in names and not any(n.startswith("head.rows") for n in names)
    # no second copy of the [V, d] table: the data file outgrows the plain head's artifact by the rank-4 factors,
    # the bias and the member table only (a row copy would add V * d * 4 bytes, 545 MB)
    extra = manifest["files"]["model.onnx.data"]["bytes"] - pipeline[1]["files"]["model.onnx.data"]["bytes"]
    assert extra < V * D * 4 / 4

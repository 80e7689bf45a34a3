"""A real vocabulary and width: a random-weight Qwen2 of the Qwen2.5-0.5B head shape (V = 151,936, d = 896, one layer,
tied embeddings) goes through convert (K = V/32) -> build --target ort -> verify, as a user would run it."""

import json

import numpy as np
import pytest

from vqexport.graph_io import load_graph
from vqexport.head.spec import read_head

from .conftest import run_cli
from .models import hf_config, save_hf

V, D = 151_936, 896
K = V // 32


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    dense = save_hf(tmp / "qwen", hf_config("qwen2", vocab=V, hidden=D, layers=1, heads=14, kv_heads=2, ffn=4864,
                                            max_position=32768, rope_theta=1e6))
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

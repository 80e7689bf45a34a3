"""fp16 trunk with an fp32 head: the precision TensorRT builds strongly typed, proven on CPU with ONNX Runtime."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from vqexport.checkpoint import resolve_checkpoint
from vqexport.export import export_onnx
from vqexport.graph import find_head
from vqexport.model import from_tensors
from vqexport.passes.fp16_trunk import fp16_trunk
from vqexport.profiles import bundled_dir

from .conftest import make_checkpoint, run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    ckpt = resolve_checkpoint(make_checkpoint(tmp_path_factory.mktemp("fp16") / "ckpt"))
    proto = export_onnx(from_tensors(ckpt.config, ckpt.tensors), opset=18)
    return proto, fp16_trunk(proto)


def test_trunk_weights_fp16_head_and_io_fp32(pair):
    fp32, fp16 = pair
    types = {t.name: t.data_type for t in fp16.graph.initializer}
    assert all(t != TensorProto.FLOAT16 for n, t in types.items() if n.startswith("head."))
    assert types["head.codebook_t"] == TensorProto.FLOAT
    assert sum(t == TensorProto.FLOAT16 for t in types.values()) >= 10
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]  # noqa: E731
    assert io(fp16) == io(fp32)
    g = onnx.shape_inference.infer_shapes(fp16).graph
    vt = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output)}
    head = find_head(fp16)
    assert vt[head.matmul.output[0]] == TensorProto.FLOAT  # codebook logits in fp32
    assert vt[head.matmul.input[0]] == TensorProto.FLOAT  # the hidden state is cast up before the head


def test_mask_fill_stays_finite(pair):
    _, fp16 = pair
    for t in fp16.graph.initializer:
        if t.data_type == TensorProto.FLOAT16:
            assert np.isfinite(onnx.numpy_helper.to_array(t)).all(), t.name


def test_fp16_build_passes_parity_on_cpu(tmp_path):
    text = (bundled_dir() / "ort.toml").read_text()
    text = text.replace('name = "ort"', 'name = "ort-fp16"').replace('precision = "fp32"', 'precision = "fp16"')
    text = text[: text.index("[parity]")] + "[parity]\nsteps = 8\natol = 0.1\ntop1_agreement_min = 0.95\nkl_max = 1e-3\ngreedy_must_match = false\n"
    (tmp_path / "ort-fp16.toml").write_text(text)
    result = run_cli("build", "--target", tmp_path / "ort-fp16.toml", "--model", make_checkpoint(tmp_path / "ckpt"),
                     "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.stderr
    parity = json.loads(result.stdout)["parity"]
    assert parity["passed"] and 0 < parity["max_abs_diff"] < 0.1, parity  # really fp16 (not 0) and still close

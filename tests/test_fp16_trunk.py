"""fp16 trunk with an fp32 head: the precision TensorRT builds strongly typed, proven on CPU with ONNX Runtime."""

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

from .conftest import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return resolve_checkpoint(make_checkpoint(tmp_path_factory.mktemp("fp16") / "ckpt"))


@pytest.fixture(scope="module")
def pair(ckpt):
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


def test_fp16_graph_matches_pytorch_on_cpu(pair, ckpt):
    from vqexport.backends.ort.runner import OrtRunner
    from vqexport.backends.torch_ref import TorchRunner
    from vqexport.profiles import Parity
    from vqexport.verify import compare_runners, prompt_ids

    _, fp16 = pair
    tolerance = Parity(steps=8, atol=0.1, top1_agreement_min=0.95, kl_max=1e-3, greedy_must_match=False)
    with TorchRunner(from_tensors(ckpt.config, ckpt.tensors)) as ref, OrtRunner(fp16.SerializeToString()) as tgt:
        report = compare_runners(ref, tgt, prompt_ids(None, ckpt.config.vocab_size), 8, tolerance)
    assert report.passed, report.failures
    assert 0 < report.max_abs_diff < 0.1  # really computed in fp16 (not bit-equal), and still close


def test_fp16_is_a_profile_precision(tmp_path):
    from vqexport.profiles import load_profile

    text = (bundled_dir() / "ort.toml").read_text().replace('precision = "fp32"', 'precision = "fp16"')
    (tmp_path / "ort-fp16.toml").write_text(text)
    assert load_profile(str(tmp_path / "ort-fp16.toml")).precision == "fp16"
    assert load_profile("trt").precision == "fp16" and load_profile("trt-int8").precision == "fp32"

"""The TensorRT path for real: the VQLogits plugin through TensorRT's ONNX parser, trt-fp16 / trt-int8 builds of the
embedded demo with parity against PyTorch, verify and bench of the engine, and the Triton layout of an engine.
Runs where TensorRT and an NVIDIA GPU exist; skipped (with the reason) everywhere else."""

import importlib.util
import json

import numpy as np
import pytest

from vqexport.backends.trt import env

from .conftest import run_cli
from .models import random_head

HERE = env.probe()
pytestmark = pytest.mark.skipif(HERE["tensorrt"] is None or HERE["gpu"] is None,
                                reason=f"needs TensorRT and an NVIDIA GPU ({HERE['tensorrt_error'] or HERE['gpu_error']})")


def _needs_plugin_runtime():
    pytest.importorskip("tensorrt.plugin", reason="the VQLogits plugin needs tensorrt.plugin (TensorRT >= 10.7)")
    pytest.importorskip("triton", reason="the VQLogits plugin's kernel needs Triton")


@pytest.mark.parametrize("rank", [0, 8], ids=["4-inputs", "6-inputs"])
def test_plugin_through_the_onnx_parser(rank):
    """A fused head graph (head_model) prepared for TensorRT: the parser finds the plugin, the engine computes the
    head's definition."""
    _needs_plugin_runtime()
    import onnx_ir as ir
    import tensorrt as trt
    import torch

    from vqexport.backends.trt.plugin import register
    from vqexport.backends.trt.prepare import LOWRANK_OP_TYPE, prepare_for_trt
    from vqexport.head.graph import HeadForm, head_model

    d, K, V = 64, 37, 3001
    head = random_head(V, d, K, bias=True, rank=rank, seed=1)
    model = prepare_for_trt(ir.to_proto(head_model(head, HeadForm(fused=True))))
    assert model.graph.node[0].op_type == (LOWRANK_OP_TYPE if rank else "VQLogits")
    register()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    prof.set_shape("hidden_states", (1, 1, d), (2, 4, d), (4, 16, d))
    config.add_optimization_profile(prof)
    plan = builder.build_serialized_network(network, config)
    assert plan is not None
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(plan))
    ctx = engine.create_execution_context()
    h = np.random.default_rng(2).standard_normal((2, 5, d)).astype(np.float32)
    x = torch.from_numpy(h).cuda()
    out = torch.empty((2, 5, V), device="cuda")
    assert ctx.set_input_shape("hidden_states", h.shape)
    ctx.set_tensor_address("hidden_states", x.data_ptr())
    ctx.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.Stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    want = head.logits(h)
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=2e-4 * max(1.0, float(np.abs(want).max())), rtol=1e-5)


@pytest.mark.parametrize("target", ["trt-fp16", "trt-int8"])
def test_build_verify_bench(tmp_path, target):
    from vqexport.profiles import load_profile

    if load_profile(target).head == "fused":
        _needs_plugin_runtime()
    out = tmp_path / target
    result = run_cli("build", "--target", target, "--out", out, "--steps", "4", "--json")  # the embedded demo
    assert result.exit_code == 0, result.stderr
    m = json.loads(result.stdout)
    eng = m["runtime"]["engine"]
    assert eng["tensorrt"] == HERE["tensorrt"] and eng["compute_capability"] == HERE["gpu"]["compute_capability"]
    assert set(eng["profiles"]) == {"prefill", "decode"} and m["readiness"]["passed"] and m["parity"]["passed"]
    assert {"model.plan", "model.onnx", "model.onnx.data", "timing.cache", "vq_head.json", "vq_head.safetensors"} <= set(m["files"])
    assert eng["strongly_typed"] and eng["precision"] == ("fp16" if target == "trt-fp16" else "fp32")
    assert m["runtime"]["plugins"] == (["vqexport::VQLogits", "vqexport::VQLogitsLowRank"] if target == "trt-fp16" else [])
    verify = run_cli("verify", "--artifact", out, "--steps", "4", "--json")
    assert verify.exit_code == 0, verify.stderr
    assert json.loads(verify.stdout)["passed"]
    bench = run_cli("bench", "--artifact", out, "--repeats", "1", "--tokens", "4", "--prompt-length", "16", "--json")
    assert bench.exit_code == 0, bench.stderr
    assert json.loads(bench.stdout)["vq"]["decode_ms_p50"] > 0


def test_triton_trt_layout(tmp_path):
    assert importlib.util.find_spec("tritonclient"), "tritonclient, a test dependency ('.[test]'), is missing"
    out = tmp_path / "repo"
    result = run_cli("build", "--target", "triton-trt", "--out", out, "--steps", "2", "--json")
    assert result.exit_code == 0, result.stderr
    m = json.loads(result.stdout)
    assert (out / "vqlogits" / "1" / "model.plan").is_file() and (out / "vqlogits" / "config.pbtxt").is_file()
    assert not (out / "model.plan").exists() and (out / "model.onnx").is_file()  # the portable graph stays at the root
    assert m["runtime"]["model_file"] == "vqlogits/1/model.plan" and m["runtime"]["triton"]["platform"] == "tensorrt_plan"
    assert 'profile: [ "0", "1" ]' in (out / "vqlogits" / "config.pbtxt").read_text()
    verify = run_cli("verify", "--artifact", out, "--steps", "2")
    assert verify.exit_code == 0, verify.stderr

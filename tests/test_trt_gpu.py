"""The TensorRT path for real: the VQLogits plugin through TensorRT's ONNX parser, trt-fp16 / trt-int8 builds with
parity against PyTorch, the timing cache, and the Triton layout of an engine. Runs where TensorRT and a GPU exist."""

import json

import numpy as np
import pytest
from onnx import TensorProto, helper

from vqexport.backends.trt import env

from .conftest import make_checkpoint, run_cli

HERE = env.probe()
pytestmark = pytest.mark.skipif(HERE["tensorrt"] is None or HERE["gpu"] is None,
                                reason=f"needs TensorRT and an NVIDIA GPU ({HERE['tensorrt_error'] or HERE['gpu_error']})")


def _plugin_model(lowrank: bool, d=64, K=37, V=3001, r=8):
    names = ["hidden", "codebook_t", "map", "bias"] + (["lowrank_p_t", "lowrank_u_t"] if lowrank else [])
    node = helper.make_node("VQLogits", names, ["logits"], name="head/VQLogits", domain="ai.onnx.contrib",
                            plugin_namespace="vqexport", plugin_version="1")
    shapes = {"hidden": (TensorProto.FLOAT, ["n", d]), "codebook_t": (TensorProto.FLOAT, [d, K]), "map": (TensorProto.INT32, [V]),
              "bias": (TensorProto.FLOAT, [V]), "lowrank_p_t": (TensorProto.FLOAT, [d, r]), "lowrank_u_t": (TensorProto.FLOAT, [r, V])}
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, *shapes[n]) for n in names],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", V])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.contrib", 1)])


@pytest.mark.parametrize("lowrank", [False, True], ids=["4-inputs", "6-inputs"])
def test_plugin_through_the_onnx_parser(lowrank):
    import tensorrt as trt
    import torch

    from vqexport.backends.trt.plugin import register
    from vqexport.backends.trt.prepare import prepare_for_trt

    register()
    model = prepare_for_trt(_plugin_model(lowrank))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(model.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    config = builder.create_builder_config()
    prof = builder.create_optimization_profile()
    prof.set_shape("hidden", (1, 64), (4, 64), (16, 64))
    config.add_optimization_profile(prof)
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(builder.build_serialized_network(network, config)))
    ctx = engine.create_execution_context()
    rng = np.random.default_rng(1)
    x = {"hidden": rng.standard_normal((5, 64)).astype(np.float32), "codebook_t": (rng.standard_normal((64, 37)) / 8).astype(np.float32),
         "map": rng.integers(0, 37, 3001).astype(np.int32), "bias": rng.standard_normal(3001).astype(np.float32)}
    if lowrank:
        x["lowrank_p_t"] = (rng.standard_normal((64, 8)) / 8).astype(np.float32)
        x["lowrank_u_t"] = rng.standard_normal((8, 3001)).astype(np.float32)
    dev = {k: torch.from_numpy(v).cuda() for k, v in x.items()}
    out = torch.empty((5, 3001), device="cuda")
    ctx.set_input_shape("hidden", (5, 64))
    for k, t in dev.items():
        ctx.set_tensor_address(k, t.data_ptr())
    ctx.set_tensor_address("logits", out.data_ptr())
    stream = torch.cuda.Stream()
    assert ctx.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    want = (x["hidden"].astype(np.float64) @ x["codebook_t"])[:, x["map"]] + x["bias"]
    if lowrank:
        want = want + (x["hidden"].astype(np.float64) @ x["lowrank_p_t"]) @ x["lowrank_u_t"]
    np.testing.assert_allclose(out.cpu().numpy(), want, atol=2e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("trtgpu") / "ckpt", max_position=2048)


@pytest.mark.parametrize("target", ["trt-fp16", "trt-int8"])
def test_build_verify_bench(ckpt, tmp_path, target):
    out = tmp_path / target
    result = run_cli("build", "--target", target, "--model", ckpt, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    m = json.loads(result.stdout)
    eng = m["runtime"]["engine"]
    assert eng["tensorrt"] == HERE["tensorrt"] and eng["compute_capability"] == HERE["gpu"]["compute_capability"]
    assert set(eng["profiles"]) == {"prefill", "decode"} and m["readiness"]["passed"]
    assert {"model.plan", "model.onnx", "timing.cache"} <= set(m["files"])
    assert eng["strongly_typed"] and eng["precision"] == ("fp16" if target == "trt-fp16" else "fp32")
    assert run_cli("verify", "--artifact", out, "--steps", "4").exit_code == 0
    bench = run_cli("bench", "--artifact", out, "--repeats", "1", "--tokens", "4", "--prompt-length", "16", "--json")
    assert bench.exit_code == 0, bench.stderr
    assert json.loads(bench.stdout)["vq"]["decode_ms_p50"] > 0
    again = run_cli("build", "--target", target, "--model", ckpt, "--out", out, "--force", "--json")  # reuses timing.cache
    assert again.exit_code == 0, again.stderr


def test_triton_trt_layout(ckpt, tmp_path):
    out = tmp_path / "repo"
    result = run_cli("build", "--target", "triton-trt", "--model", ckpt, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert (out / "vqlogits" / "1" / "model.plan").is_file() and (out / "vqlogits" / "config.pbtxt").is_file()
    assert run_cli("verify", "--artifact", out, "--steps", "2").exit_code == 0

"""Any transformers causal LM: the artifact of a tiny random model whose head is its own dense output layer (K = V,
every token its own code, no bias) equals transformers' dense logits — an oracle that shares none of our code."""

import json
import re

import numpy as np
import pytest
import torch

from vqexport import api
from vqexport.backends.ort.runner import OrtRunner
from vqexport.head.spec import write_head

from .conftest import assert_user_error, run_cli
from .models import (artifact_logits, genai_greedy, hf_config, identity_head, runner_greedy, save_hf,
                     transformers_logits)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
ARCHS = {
    "llama-llama3-rope": ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "qwen2-rope-parameters": ("qwen2", {"rope_theta": 1e6}),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3", {"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]}),
    "phi3": ("phi3", {"pad_token_id": 0}),
    "mistral": ("mistral", {"sliding_window": 4}),
    # logits = lm_head(h) / logits_scaling, and Granite's other multipliers inside the decoder
    "granite-logits-scaling": ("granite", {"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                           "attention_multiplier": 0.015625}),
    "cohere-logit-scale": ("cohere", {"logit_scale": 0.0625}),  # logits = lm_head(h) * logit_scale
    # Granite 4.0 micro's form: the hybrid class with attention layers only and no experts (a dense decoder)
    "granitemoehybrid-dense": ("granitemoehybrid", {"logits_scaling": 8.0, "shared_intermediate_size": 48,
                                                    "num_local_experts": 0, "layer_types": ["attention", "attention"],
                                                    "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1}),
    "gpt2": ("gpt2", {}),
}


def _dense_model(path, arch, **extra):
    save_hf(path, hf_config(arch, vocab=101, hidden=32, layers=2, heads=4, kv_heads=2 if arch != "gpt2" else 4, **extra))
    write_head(path, identity_head(path))
    return path


def _oracle(tmp_path, model_dir, reference=None):
    """The ort artifact of ``model_dir`` gives transformers' logits of ``reference`` (default: the same directory),
    prefill with a left-padded row and one decode step."""
    reference = reference or model_dir
    result = api.build("ort", model=model_dir, out=tmp_path / "art", steps=4)
    assert result.parity.passed
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 101, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    nxt = rng.integers(0, 101, size=(2, 1))
    prefill, decode = artifact_logits(result.out, ids, mask, nxt)
    ref = transformers_logits(reference, ids, mask)
    keep = mask.astype(bool)
    np.testing.assert_allclose(prefill[keep], ref[keep], atol=1e-4, rtol=0)
    full_mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    ref_next = transformers_logits(reference, np.concatenate([ids, nxt], 1), full_mask)[:, -1]
    np.testing.assert_allclose(decode, ref_next, atol=1e-4, rtol=0)
    return result, ref


@pytest.mark.parametrize("name", list(ARCHS))
def test_identity_head_artifact_equals_transformers_dense_logits(tmp_path, name):
    arch, extra = ARCHS[name]
    model_dir = _dense_model(tmp_path / "model", arch, **extra)
    result, _ = _oracle(tmp_path, model_dir)
    assert result.manifest["config"]["model_type"] == json.loads((model_dir / "config.json").read_text())["model_type"]


def test_rope_theta_under_the_legacy_top_level_key_is_honoured(tmp_path):
    """transformers 5 writes rope settings under rope_parameters; configs written before keep top-level rope_theta.
    Both must reach the graph: the artifact equals transformers' logits over 160 positions, and those differ from
    the default theta's."""
    model_dir = _dense_model(tmp_path / "model", "qwen2", rope_theta=1e6)
    raw = json.loads((model_dir / "config.json").read_text())
    raw.pop("rope_parameters")
    raw["rope_theta"] = 1e6
    (model_dir / "config.json").write_text(json.dumps(raw))
    result, _ = _oracle(tmp_path, model_dir)
    ids = np.random.default_rng(1).integers(0, 101, size=(1, 160))
    mask = np.ones_like(ids)
    with OrtRunner.from_artifact(result.out) as r:
        got = r.step(ids, mask, r.empty_past(1)).logits
    ref = transformers_logits(model_dir, ids, mask)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    raw["rope_theta"] = 10000.0
    (model_dir / "config.json").write_text(json.dumps(raw))
    assert np.abs(transformers_logits(model_dir, ids, mask) - ref).max() > 1e-3  # 10x the tolerance above: theta matters


def test_llama3_rope_scaling_under_the_legacy_top_level_key(tmp_path):
    model_dir = _dense_model(tmp_path / "model", "llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    raw = json.loads((model_dir / "config.json").read_text())
    params = raw.pop("rope_parameters")
    raw["rope_theta"] = params.pop("rope_theta")
    raw["rope_scaling"] = params
    (model_dir / "config.json").write_text(json.dumps(raw))
    _oracle(tmp_path, model_dir)


def test_an_unknown_architecture_is_one_line(tmp_path):
    model_dir = _dense_model(tmp_path / "model", "llama")
    raw = json.loads((model_dir / "config.json").read_text())
    raw["model_type"] = "not-a-model"
    (model_dir / "config.json").write_text(json.dumps(raw))
    assert_user_error(run_cli("build", "--model", model_dir, "--out", tmp_path / "o"),
                      "does not know the architecture 'not-a-model' (config.json's model_type)", "newer transformers")
    assert not (tmp_path / "o").exists()


def test_a_long_message_from_transformers_is_cut_where_a_sentence_or_word_ends():
    from vqexport.source import _shortened

    sentences = "The checkpoint has model type `x` which is not known. " * 3 + "This could be because of an issue " * 8
    cut = _shortened(sentences.strip())
    assert len(cut) <= 300 and cut.endswith("not known.")
    words = _shortened("word " * 100)
    assert len(words) <= 300 and words.endswith("word ...")
    assert _shortened("short message") == "short message"


def test_a_model_that_is_not_a_causal_lm_is_one_line(tmp_path):
    from transformers import T5Config

    ok = _dense_model(tmp_path / "ok", "llama")
    model_dir = tmp_path / "t5"
    T5Config(vocab_size=101, d_model=32).save_pretrained(str(model_dir))
    (model_dir / "model.safetensors").write_bytes((ok / "model.safetensors").read_bytes())
    assert_user_error(run_cli("build", "--model", model_dir, "--out", tmp_path / "o"), "not a causal language model", "t5")
    assert not (tmp_path / "o").exists()


# a cap the tiny random models' logits (|l| < 0.5) reach: their logits come out visibly bent (Gemma's own is 30)
SOFTCAP = 0.4


def test_soft_capped_logits_are_the_models_own(tmp_path):
    """Gemma 2 soft-caps its logits (``cap * tanh(l / cap)``, final_logit_softcapping): the head's logits get the
    same cap in the graph, so the artifact gives transformers' logits; without the cap they differ."""
    model_dir = _dense_model(tmp_path / "model", "gemma2", final_logit_softcapping=SOFTCAP, sliding_window=4)
    result, ref = _oracle(tmp_path, model_dir)
    assert result.manifest["config"]["logit_softcap"] == SOFTCAP
    uncapped = np.arctanh(np.clip(ref / SOFTCAP, -1 + 1e-7, 1 - 1e-7)) * SOFTCAP
    assert np.abs(uncapped - ref).max() > 0.02  # the cap matters at these logits


def test_a_soft_capped_model_has_no_top_k_form(tmp_path):
    """The top-k form's cluster log-probabilities need logits that are cluster score + token terms: one line."""
    model_dir = _dense_model(tmp_path / "model", "gemma2", final_logit_softcapping=SOFTCAP, sliding_window=4)
    assert_user_error(run_cli("build", "--target", "ort-topk", "--model", model_dir, "--out", tmp_path / "o"),
                      "soft-caps its logits (final_logit_softcapping = 0.4)", "decode.mode = 'logits'")
    assert not (tmp_path / "o").exists()


# torch.onnx's own form: the step that failed, what to do next, then the cause under "## Exception summary"
STEP_FAILURE = ("Failed to convert the exported program to an ONNX model. \x1b[96mThis is step 3/3\x1b[0m of exporting the "
                "model to ONNX. Next steps:\n- If there is a missing ONNX function, implement it and register it to the "
                "registry.\n\n## Exception summary\n\n<class 'torch.onnx._internal.exporter._errors.DispatchError'>: No "
                "ONNX function found for <OpOverload(op='transformers.grouped_mm_fallback', overload='default')>. Failure "
                "message: No decompositions registered for the real-valued input\n\u2b06\ufe0f\n<class "
                "'torch.onnx._internal.exporter._errors.ConversionError'>: Error when translating node %grouped_mm_fallback\n")


@pytest.mark.parametrize("message, says", [
    ("Unsupported: data-dependent control flow in the decoder\nmore detail",
     "(RuntimeError: Unsupported: data-dependent control flow in the decoder)"),
    (STEP_FAILURE, "(DispatchError: No ONNX function found for <OpOverload(op='transformers.grouped_mm_fallback'"),
])
def test_an_architecture_torch_onnx_cannot_export_is_one_line(tmp_path, monkeypatch, message, says):
    """One line that says why (the op without an ONNX function, not "step 3/3 failed"), no terminal colour codes."""
    model_dir = _dense_model(tmp_path / "model", "mistral")

    def refuse(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch.onnx, "export", refuse)
    result = run_cli("build", "--model", model_dir, "--out", tmp_path / "o")
    assert_user_error(result, "torch.onnx cannot export the mistral decoder", says)
    assert "\x1b" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_a_decoder_with_convolution_state_is_refused(tmp_path):
    """LFM2's convolution layers (and Mamba hybrids') keep a state that is not keys and values: one line, not an
    AttributeError from the cache check, and nothing written."""
    import transformers as tf

    from .models import save_hf

    config = tf.Lfm2Config(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, layer_types=["conv", "full_attention"], bos_token_id=None,
                           eos_token_id=None, pad_token_id=None)
    model_dir = save_hf(tmp_path / "model", config)
    write_head(model_dir, identity_head(model_dir))
    assert_user_error(run_cli("build", "--model", model_dir, "--out", tmp_path / "o"),
                      "the lfm2 decoder keeps a state other than keys and values", "LinearAttentionLayer")
    assert not (tmp_path / "o").exists()


GEMMA4 = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
              head_dim=8, sliding_window=4, vocab_size_per_layer_input=101, hidden_size_per_layer_input=8,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _gemma4(path, layers=6, shared=2, **extra):
    """Gemma 4's cache as the real models have it: global layers with a head size of their own (512 against 256) and
    one key/value head, used as both keys and values (attention_k_eq_v); the last ``shared`` layers read the cache
    of the last earlier layer of their kind and keep none."""
    import transformers as tf

    config = tf.Gemma4TextConfig(**GEMMA4, num_hidden_layers=layers, global_head_dim=16, num_global_key_value_heads=1,
                                 attention_k_eq_v=True, num_kv_shared_layers=shared,
                                 layer_types=["sliding_attention", "full_attention"] * (layers // 2), **extra)
    save_hf(path, config)
    write_head(path, identity_head(path))
    return path


def test_layers_with_their_own_cache_shapes_and_shared_caches_build(tmp_path):
    """Gemma 4, soft-capped as its released checkpoints are: one past/present pair per layer that keeps a cache, each
    of its layer's shape; the artifact gives transformers' logits (prefill and decode), onnxruntime-genai runs the
    directory unchanged, and its greedy tokens are the PyTorch reference's."""
    import onnx

    from vqexport.backends.torch_ref import TorchRunner
    from vqexport.source import load_source

    model_dir = _gemma4(tmp_path / "model", final_logit_softcapping=SOFTCAP)
    result, _ = _oracle(tmp_path, model_dir)
    shapes = [[2, 8], [1, 16], [2, 8], [1, 16]]  # layers 4 and 5 share the caches of layers 2 and 3
    assert result.manifest["config"]["kv_shapes"] == shapes and result.manifest["config"]["logit_softcap"] == SOFTCAP
    graph = onnx.load(str(result.out / "model.onnx"), load_external_data=False).graph

    def dims(v):
        return [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]

    past = {v.name: dims(v) for v in graph.input if v.name.startswith("past_key_values.")}
    present = {v.name: dims(v) for v in graph.output if v.name.startswith("present.")}
    assert past == {f"past_key_values.{i}.{kind}": ["batch_size", h, "past_sequence_length", d]
                    for i, (h, d) in enumerate(shapes) for kind in ("key", "value")}
    assert present == {f"present.{i}.{kind}": ["batch_size", h, "total_sequence_length", d]
                       for i, (h, d) in enumerate(shapes) for kind in ("key", "value")}
    assert json.loads((result.out / "genai_config.json").read_text())["model"]["decoder"]["num_hidden_layers"] == 4

    prompt = [5, 17, 33, 2, 91, 44, 7]
    with TorchRunner.from_source(load_source(model_dir)) as ref:
        assert genai_greedy(result.out, prompt, 12) == runner_greedy(ref, prompt, 12)


def test_per_layer_cache_shapes_reach_openvino_and_tensorrt(tmp_path):
    """The OpenVINO IR keeps each layer's cache shape and matches PyTorch; TensorRT's optimization profiles give
    each cache input its own layer's shape."""
    from vqexport.backends.runners import runner_from_runtime
    from vqexport.backends.trt.shapes import input_shapes
    from vqexport.profiles import load_profile
    from vqexport.source import load_source

    model_dir = _gemma4(tmp_path / "model")
    result = api.build("openvino", model=model_dir, out=tmp_path / "ov", steps=4)
    assert result.parity.passed
    rt = result.manifest["runtime"]
    with runner_from_runtime(result.out / rt["model_file"], rt) as r:
        assert r.name == "openvino" and r.kv_shapes == [(2, 8), (1, 16), (2, 8), (1, 16)]
    trt = load_profile("trt").trt
    decode = input_shapes(trt, load_source(model_dir).geometry)[1]
    past = trt.decode_past.max
    assert decode["past_key_values.1.value"][2] == (trt.decode_batch.max, 1, past, 16)
    assert decode["past_key_values.2.key"][2] == (trt.decode_batch.max, 2, past, 8)
    assert "past_key_values.4.key" not in decode


def _latent_attention(path, arch):
    """Multi-head latent attention: DeepSeek-V3 (with its experts: 8 routed, 2 per token, one shared, after a dense
    first layer) or MiniCPM3 (dense, its own embedding and depth scales)."""
    import transformers as tf

    sizes = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8,
                 v_head_dim=12, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
                 eos_token_id=None, pad_token_id=None)
    if arch == "deepseek_v3":
        config = tf.DeepseekV3Config(**sizes, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                     moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1)
    else:
        config = tf.MiniCPM3Config(**sizes, scale_emb=12.0, scale_depth=1.4, dim_model_base=16)
    save_hf(path, config)
    write_head(path, identity_head(path))
    return path


@pytest.mark.parametrize("arch", ["deepseek_v3", "minicpm3"])
def test_multi_head_latent_attention_builds_with_its_latent_cache(tmp_path, arch):
    """transformers caches latent attention compressed: one head of kv_lora_rank ("keys") and one of the rotary
    part ("values"). The graph carries that cache as it is; OpenVINO runs it too. onnxruntime-genai gives values
    the keys' size, so the artifact has no genai_config.json."""
    import onnx

    from vqexport.backends.runners import runner_from_runtime

    model_dir = _latent_attention(tmp_path / "model", arch)
    result, _ = _oracle(tmp_path, model_dir)
    assert result.manifest["config"]["kv_shapes"] == [[1, 16, 8]] * 2
    graph = onnx.load(str(result.out / "model.onnx"), load_external_data=False).graph
    past = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim] for v in graph.input}
    assert past["past_key_values.1.key"] == ["batch_size", 1, "past_sequence_length", 16]
    assert past["past_key_values.1.value"] == ["batch_size", 1, "past_sequence_length", 8]
    assert not (result.out / "genai_config.json").exists()
    shown = run_cli("inspect", model_dir)
    assert shown.exit_code == 0 and "kv heads/head_dim 1/16 (values 8)" in " ".join(shown.stdout.split())

    ov = api.build("openvino", model=model_dir, out=tmp_path / "ov", steps=4)
    assert ov.parity.passed
    with runner_from_runtime(ov.out / ov.manifest["runtime"]["model_file"], ov.manifest["runtime"]) as r:
        assert r.kv_shapes == [(1, 16, 8)] * 2
        assert [p.shape for p in r.empty_past(3)] == [(3, 1, 0, 16), (3, 1, 0, 8)] * 2


def test_a_cache_other_than_the_config_implies_is_refused():
    """The decoder's own cache decides: a layer without keys among those the config says keep them (an MLP-only
    layer), a cache in a layer the config says shares one, or a shape the config does not give: one line each."""
    from types import SimpleNamespace

    from vqexport.errors import VQExportError
    from vqexport.source import Geometry
    from vqexport.trunk.hf import check_cache

    geo = Geometry("m", 11, 8, 3, 2, 2, 4, 64, True, kv_shapes=((2, 4), (1, 8)))  # the third layer shares

    def cache(*shapes):
        kv = [SimpleNamespace(keys=torch.zeros(1, *s) if s else None, values=torch.zeros(1, *s) if s else None)
              for s in shapes]
        return SimpleNamespace(cache=SimpleNamespace(layers=kv))

    src = SimpleNamespace(path="m")
    check_cache(cache((2, 3, 4), (1, 3, 8), None), geo, src)
    for bad, words in ((cache((2, 3, 4), None, None), "keeps keys and values in 1 of its layers, where its config "
                                                      "implies the first 2 (layer 1 differs"),
                       (cache((2, 3, 4), (1, 3, 8), (1, 3, 8)), "layer 2 differs"),
                       (cache((2, 3, 4), (2, 3, 4), None), "layer 1 keeps keys and values of (heads, head_dim) [(2, 4), "
                                                           "(2, 4)], not the [(1, 8), (1, 8)] its config gives")):
        with pytest.raises(VQExportError, match=re.escape(words)):
            check_cache(bad, geo, src)


def _as_multimodal(text_dir, out, composite_config, prefix, towers):
    """The text model in ``text_dir`` as a multimodal checkpoint would hold it: ``composite_config`` (its text config
    inside), the language model's weights under ``prefix`` and the ``towers``' weights beside them."""
    from safetensors.numpy import load_file, save_file

    out.mkdir()
    weights = {prefix + k.removeprefix("model."): v for k, v in load_file(str(text_dir / "model.safetensors")).items()}
    rng = np.random.default_rng(0)
    weights.update({name: rng.standard_normal(shape).astype(np.float32) for name, shape in towers.items()})
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(composite_config.to_json_string())
    for name in ("vq_head.json", "vq_head.safetensors"):
        (out / name).write_bytes((text_dir / name).read_bytes())
    return out


def test_gemma3n_builds_from_a_multimodal_checkpoints_language_model(tmp_path):
    """Gemma 3n (the text model of E2B / E4B): per-layer embeddings, AltUp streams, LAuReL, caches shared by its last
    layers, soft-capped logits, and activation sparsity, whose cutoff takes the normal quantile of the sparsity
    through erfinv (no ONNX op: vqexport's translation, folded to a constant). Released checkpoints are multimodal
    (model type gemma3n): the language model under model.language_model., a vision tower transformers builds with
    timm (not installed here), an audio tower. The language model is loaded alone, its weights found by name, the
    towers' weights left out: the artifact gives the text model's logits."""
    import onnx
    import transformers as tf

    from vqexport.source import load_source
    from vqexport.trunk.hf import load_causal_lm

    text = tf.Gemma3nTextConfig(**GEMMA4, num_hidden_layers=6, num_kv_shared_layers=2,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                                laurel_rank=4, altup_num_inputs=4, final_logit_softcapping=SOFTCAP,
                                activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.0, 0.0])
    text_dir = tmp_path / "text"
    save_hf(text_dir, text)
    write_head(text_dir, identity_head(text_dir))
    assert type(load_causal_lm(load_source(text_dir))).__name__ == "Gemma3nForCausalLM"
    composite = tf.Gemma3nConfig(text_config=text.to_dict())
    towers = {"model.vision_tower.timm_model.conv_stem.conv.weight": (8, 3, 3, 3),
              "model.audio_tower.subsample_conv_projection.conv_0.conv.weight": (8, 1, 3, 3),
              "model.embed_vision.embedding.weight": (16, 32)}
    model_dir = _as_multimodal(text_dir, tmp_path / "mm", composite, "model.language_model.", towers)
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "gemma3n"
    assert type(load_causal_lm(load_source(model_dir))).__name__ == "Gemma3nForCausalLM"

    result, _ = _oracle(tmp_path, model_dir, reference=text_dir)
    assert len(result.manifest["config"]["kv_shapes"]) == 4 and result.manifest["config"]["logit_softcap"] == SOFTCAP
    ops = {n.op_type for n in onnx.load(str(result.out / "model.onnx"), load_external_data=False).graph.node}
    assert "Log" not in ops  # erfinv of the constant sparsity was folded away


def test_a_multimodal_gemma3_checkpoint_loads_its_language_model_alone(tmp_path, small_tokenizer):
    """Gemma 3 4B and up: the language model alone gives the multimodal model's own logits on text."""
    from vqexport.source import load_source
    from vqexport.trunk.hf import load_causal_lm

    model_dir = _gemma3_multimodal(tmp_path / "mm", GEMMA3_ROPE, small_tokenizer)
    model = load_causal_lm(load_source(model_dir))
    assert type(model).__name__ == "Gemma3ForCausalLM" and not any("vision" in n for n, _ in model.named_parameters())
    ids = np.arange(3, 12).reshape(1, -1)
    with torch.no_grad():
        ours = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_array_equal(ours, transformers_logits(model_dir, ids, np.ones_like(ids)))


def test_a_language_model_not_found_by_name_loads_with_the_whole_model(tmp_path, small_tokenizer, monkeypatch):
    """Where the language model's weights are not where the names say, the multimodal model is loaded as before."""
    from vqexport.source import load_source
    from vqexport.trunk import hf

    model_dir = _gemma3_multimodal(tmp_path / "mm", GEMMA3_ROPE, small_tokenizer)
    found = hf.language_model

    def misnamed(cfg, source):
        cls, kwargs, towers = found(cfg, source)
        return cls, {**kwargs, "key_mapping": {"^no-such-prefix": "model."}}, towers

    monkeypatch.setattr(hf, "language_model", misnamed)
    assert type(hf.load_causal_lm(load_source(model_dir))).__name__ == "Gemma3ForConditionalGeneration"


def test_a_towers_output_layer_is_not_taken_for_the_language_models(tmp_path, small_tokenizer):
    """A [V, d] matrix named lm_head inside a tower is not the language model's output layer: the checkpoint is
    loaded whole, and its tensor without a place there is refused in one line."""
    from safetensors.numpy import load_file, save_file

    from vqexport.errors import VQExportError
    from vqexport.source import hf_config as model_config
    from vqexport.source import load_source
    from vqexport.trunk.hf import language_model, load_causal_lm

    model_dir = _gemma3_multimodal(tmp_path / "mm", GEMMA3_ROPE, small_tokenizer)
    weights = load_file(str(model_dir / "model.safetensors"))
    weights["audio_tower.lm_head.weight"] = np.ones((320, 64), np.float32)
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    source = load_source(model_dir)
    assert language_model(model_config(model_dir), source) is None
    with pytest.raises(VQExportError, match="audio_tower.lm_head.weight"):
        load_causal_lm(source)


def test_erfinv_translation_matches_torch():
    """Where erfinv's input is not a constant, the translation computes it: within float32 rounding of torch's, with
    +-inf at +-1, for float32 and float64 inputs."""
    import onnxruntime as ort

    from vqexport.quiet import quiet
    from vqexport.trunk.portable import TRANSLATIONS

    class Quantile(torch.nn.Module):
        def forward(self, x):
            return torch.erfinv(x)

    for dtype in (torch.float32, torch.float64):
        x = torch.cat([torch.linspace(-0.999999, 0.999999, 20001, dtype=dtype), torch.tensor([-1.0, 1.0], dtype=dtype)])
        with quiet():  # torch.export's own deprecation warnings
            program = torch.onnx.export(Quantile().eval(), (x,), dynamo=True, custom_translation_table=TRANSLATIONS,
                                        verbose=False)
        got = ort.InferenceSession(program.model_proto.SerializeToString()).run(None, {"x": x.numpy()})[0]
        want = torch.erfinv(x.float().double()).numpy()  # computed in float32: of x rounded to float32
        assert got.dtype == x.numpy().dtype
        np.testing.assert_array_equal(got[-2:], [-np.inf, np.inf])
        np.testing.assert_allclose(got[:-2], want[:-2], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("form, kv_heads", [(dict(multi_query=True), 1),  # Falcon-7B: one key/value head
                                             (dict(new_decoder_architecture=True, num_kv_heads=2), 4),  # Falcon-40B
                                             (dict(multi_query=False), 4)])  # Falcon-RW: one per attention head
def test_falcons_cache_has_the_heads_its_attention_keeps(tmp_path, form, kv_heads):
    """Falcon's cache: one key/value head in its first, multi-query form; in its new form (Falcon-40B) transformers
    broadcasts its num_kv_heads to every attention head before caching them."""
    import transformers as tf

    config = tf.FalconConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None, **form)
    model_dir = tmp_path / "model"
    save_hf(model_dir, config)
    write_head(model_dir, identity_head(model_dir))
    result, _ = _oracle(tmp_path, model_dir)
    assert result.manifest["config"]["kv_shapes"] == [[kv_heads, 8]] * 2


def test_a_config_whose_every_layer_shares_its_cache_is_one_line(tmp_path):
    model_dir = _gemma4(tmp_path / "model", layers=4)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_kv_shared_layers"] = 4
    (model_dir / "config.json").write_text(json.dumps(config))
    assert_user_error(run_cli("build", "--model", model_dir, "--out", tmp_path / "o"),
                      "num_kv_shared_layers = 4 leaves no layer of the 4 that keeps keys and values of its own")
    assert not (tmp_path / "o").exists()


def test_a_decoder_without_a_kv_cache_is_one_line(tmp_path):
    """GPT-1 (openai-gpt) returns no cache at all: one line, not an AttributeError from the cache check."""
    import transformers as tf

    from .models import random_head, save_hf

    model_dir = save_hf(tmp_path / "model", tf.OpenAIGPTConfig(vocab_size=101, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    write_head(model_dir, random_head(101, 32, 11))
    assert_user_error(run_cli("build", "--model", model_dir, "--out", tmp_path / "o"),
                      "the openai-gpt decoder does not return a per-layer KV cache")
    assert not (tmp_path / "o").exists()


def test_a_decoder_without_attention_heads_is_one_line(tmp_path):
    """Mamba's config has no num_attention_heads: one line naming what is missing, not int(None)'s message."""
    import transformers as tf

    from .models import random_head, save_hf

    model_dir = save_hf(tmp_path / "model", tf.MambaConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2,
                                                           bos_token_id=None, eos_token_id=None, pad_token_id=None))
    write_head(model_dir, random_head(101, 32, 11))
    assert_user_error(run_cli("build", "--model", model_dir, "--out", tmp_path / "o"),
                      "the mamba config has no num_attention_heads", "attention heads and a key/value cache")
    assert not (tmp_path / "o").exists()


def test_a_decoder_transformers_cannot_run_is_one_line(tmp_path, monkeypatch):
    """Some hub architectures fail in their own forward on a plain prompt (Jamba and Kimi-Linear built without their
    state cache: "get_seq_length can only be called on Attention layers"): one line naming the model, nothing
    written, instead of transformers' traceback."""
    from transformers.models.llama import modeling_llama

    model_dir = _dense_model(tmp_path / "model", "llama")

    def fails(self, *args, **kwargs):
        raise ValueError("`get_seq_length` can only be called on Attention layers")

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", fails)
    assert_user_error(run_cli("build", "--model", model_dir, "--out", tmp_path / "o"),
                      "transformers' llama model fails on 8 tokens (ValueError: `get_seq_length` can only be called")
    assert not (tmp_path / "o").exists()


def test_a_two_stage_head_reads_gpt2s_flattened_embedding_lookup(tmp_path):
    """GPT-2's export reshapes input_ids before its embedding Gather: the tied two-stage head still finds that table
    and reads its exact rows from it (this used to stop the build with a traceback)."""
    from vqexport.graph_io import load_graph
    from vqexport.head.spec import make_head

    from .models import random_head

    model_dir = tmp_path / "gpt2"
    save_hf(model_dir, hf_config("gpt2", vocab=101, hidden=32, layers=2, heads=4, kv_heads=4))
    h = random_head(101, 32, 8)
    write_head(model_dir, make_head({"codebook": h.codebook, "map": np.arange(101, dtype=np.int32) % 8, "bias": h.bias},
                                    probes=2))
    result = api.build("ort", model=model_dir, out=tmp_path / "art", steps=4)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    graph = load_graph(result.out / "model.onnx").graph
    rows = next(n for n in graph.node if n.name == "head/exact/rows")
    lookup = next(n for n in graph.node if n.op_type == "Gather" and n.input[0] == rows.input[0] and n is not rows)
    producer = next(n for n in graph.node if lookup.input[1] in n.output)
    assert rows.input[0] == "transformer.wte.weight" and producer.op_type == "Reshape"  # the case this test is about
    assert not any(t.name.startswith("head.rows") for t in graph.initializer)


def test_the_builders_trunk_is_refused_where_its_graph_would_differ(tmp_path, small_tokenizer):
    """onnxruntime-genai's builder leaves Mistral's sliding window out of its attention (every position seen, where
    transformers' model sees the last 4), and its GroupQueryAttention runs head sizes of 16k only: both one line,
    nothing written; the same Mistral without a window builds and passes."""
    from .models import make_model

    windowed = make_model(tmp_path / "windowed", arch="mistral", vocab=320, hidden=64, sliding_window=4,
                          eos_token_id=0, tokenizer=small_tokenizer)
    assert_user_error(run_cli("build", "--target", "ort-genai", "--model", windowed, "--out", tmp_path / "a", "--steps", 2),
                      "builder ignores this mistral model's sliding window (4 positions)", 'source = "portable"')
    assert not (tmp_path / "a").exists()
    plain = make_model(tmp_path / "plain", arch="mistral", vocab=320, hidden=64, sliding_window=None,
                       eos_token_id=0, tokenizer=small_tokenizer)
    assert api.build("ort-genai", model=plain, out=tmp_path / "b", steps=2).parity.passed
    odd = make_model(tmp_path / "odd", vocab=320, hidden=48, heads=4, tokenizer=small_tokenizer)  # head size 12
    assert_user_error(run_cli("build", "--target", "ort-int4", "--model", odd, "--out", tmp_path / "c"),
                      "multiple of 16", "has 12")
    assert not (tmp_path / "c").exists()
    partial = make_model(tmp_path / "partial", arch="phi3", vocab=320, hidden=64, partial_rotary_factor=0.75, eos_token_id=0,
                         tokenizer=small_tokenizer)  # 12 of 16 dimensions rotated: a cos/sin cache of 6 columns
    assert_user_error(run_cli("build", "--target", "ort-genai", "--model", partial, "--out", tmp_path / "d"),
                      "multiple of 8", "rotates 12 of its 16 head dimensions")
    assert not (tmp_path / "d").exists()



def test_a_model_without_an_end_of_sequence_token_is_refused_before_the_builder_runs(tmp_path, small_tokenizer, monkeypatch):
    """The builder writes eos_token_id into genai_config.json and fails without one, after building the whole graph:
    refused up front in one line that says what to set, nothing written, the builder never started. The tokenizer's
    eos_token is enough for the builder, and for the check."""
    from vqexport.trunk import genai

    from .models import make_model

    model = make_model(tmp_path / "noeos", vocab=320, hidden=64, tokenizer=small_tokenizer)  # eos_token_id None
    started = []
    real_builder = genai.run_builder
    monkeypatch.setattr(genai, "run_builder", lambda *a, **k: started.append(a) or real_builder(*a, **k))
    assert_user_error(run_cli("build", "--target", "ort-int4", "--model", model, "--out", tmp_path / "a"),
                      "end-of-sequence token", "set eos_token_id in config.json", 'source = "portable"')
    assert not (tmp_path / "a").exists() and not started
    (model / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    assert api.build("ort-genai", model=model, out=tmp_path / "b", steps=2).parity.passed
    assert started


SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=None)
# Granite 4.0's hybrid class with attention layers only; without position_embedding_type = "rope" it has no rope
GRANITE_HYBRID = dict(SMALL, shared_intermediate_size=96, num_local_experts=0, layer_types=["attention", "attention"],
                      logits_scaling=8.0, mamba_n_heads=4, mamba_d_head=32, mamba_n_groups=1)


@pytest.mark.parametrize("arch, says", [
    ("olmo", ["olmo model", "RMSNorm"]),
    ("granitemoehybrid", ["granitemoehybrid model", "position_embedding_type = None: no rope"]),
])
def test_what_the_builder_builds_differently_is_refused(tmp_path, small_tokenizer, monkeypatch, arch, says):
    """The builder normalises OLMo with RMSNorm where transformers' OLMo uses LayerNorm, and rotates a rope-less
    Granite hybrid: refused before any work, one line, nothing written. Unrefused, the build fails parity (if a later
    builder passes, the refusal can go); the portable trunk builds the same model and passes, and so does the
    builder the Granite hybrid with rope (granite-4.0-micro's form)."""
    import transformers as tf

    from vqexport.errors import ParityError
    from vqexport.trunk import genai

    from .models import random_head, save_hf

    config = tf.OlmoConfig(**SMALL) if arch == "olmo" else tf.GraniteMoeHybridConfig(**GRANITE_HYBRID)
    model = save_hf(tmp_path / arch, config, tokenizer=small_tokenizer)
    write_head(model, random_head(320, 64, 20))
    assert_user_error(run_cli("build", "--target", "ort-genai", "--model", model, "--out", tmp_path / "a"),
                      "builder does not reproduce", *says, 'source = "portable"')
    assert not (tmp_path / "a").exists()
    assert api.build("ort", model=model, out=tmp_path / "b", steps=2).parity.passed
    if arch == "granitemoehybrid":
        roped = save_hf(tmp_path / "roped", tf.GraniteMoeHybridConfig(**GRANITE_HYBRID, position_embedding_type="rope"),
                        tokenizer=small_tokenizer)
        write_head(roped, random_head(320, 64, 20))
        assert api.build("ort-genai", model=roped, out=tmp_path / "r", steps=2).parity.passed
    monkeypatch.setattr(genai, "builder_differs", lambda text: None)
    with pytest.raises(ParityError):
        api.build("ort-genai", model=model, out=tmp_path / "c", steps=2)


def test_the_builders_graph_with_a_position_ids_input_runs(tmp_path, small_tokenizer, monkeypatch):
    """The builder makes HunYuan's rotary embedding as RotaryEmbedding nodes that read a position_ids input (which
    onnxruntime-genai feeds): the runner feeds it from the mask, and the build passes parity. A node that fails while
    running (here the runner is made to withhold position_ids) is one line naming it, exit 2, nothing written, not
    onnxruntime's traceback."""
    import transformers as tf

    from vqexport.backends.ort import runner

    from .models import random_head, save_hf

    model = save_hf(tmp_path / "hunyuan", tf.HunYuanDenseV1Config(**SMALL, head_dim=16), tokenizer=small_tokenizer)
    write_head(model, random_head(320, 64, 20))
    result = api.build("ort-genai", model=model, out=tmp_path / "a", steps=4)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    with runner.OrtRunner.from_artifact(result.out) as r:
        assert r.takes_positions
    monkeypatch.setattr(runner.OrtRunner, "_activate", _without_positions(runner.OrtRunner._activate))
    assert_user_error(run_cli("build", "--target", "ort-genai", "--model", model, "--out", tmp_path / "b"),
                      "onnxruntime cannot run", "RotaryEmbedding", "Missing Input: position_ids")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("arch", ["phi", "nemotron"])
def test_the_builder_gets_the_norms_epsilon(tmp_path, small_tokenizer, arch):
    """Phi-2 and Nemotron give their LayerNorms' epsilon (1e-5) as layer_norm_eps / norm_eps; the builder reads only
    rms_norm_eps and took 1e-6 (parity failed by 0.08 and 0.80 here). builder_config gives it under that key too
    (checked on a copy: the saved config.json keeps its own keys only). Head size 80 with 40% rotated (Phi-2's own),
    32 with half rotated (a cos/sin cache in blocks of 8)."""
    import copy

    import transformers as tf

    from vqexport.trunk.builder_main import builder_config

    from .models import random_head, save_hf

    if arch == "phi":
        config = tf.PhiConfig(**{**SMALL, "hidden_size": 160, "num_attention_heads": 2, "num_key_value_heads": 2},
                              partial_rotary_factor=0.4)
    else:
        config = tf.NemotronConfig(**{**SMALL, "num_attention_heads": 2, "num_key_value_heads": 1}, partial_rotary_factor=0.5)
    assert not hasattr(config, "rms_norm_eps") and builder_config(copy.deepcopy(config)).rms_norm_eps == 1e-5
    model = save_hf(tmp_path / arch, config, tokenizer=small_tokenizer)
    write_head(model, random_head(320, config.hidden_size, 20))
    result = api.build("ort-genai", model=model, out=tmp_path / "a", steps=4)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4


def test_builder_config_keeps_an_rms_norm_eps_it_has():
    import transformers as tf

    from vqexport.trunk.builder_main import builder_config

    assert builder_config(tf.LlamaConfig(rms_norm_eps=3e-6)).rms_norm_eps == 3e-6


def _without_positions(activate):
    def wrapped(self):
        activate(self)
        self.takes_positions = False
    return wrapped


GEMMA3_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
LONGROPE = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
            "long_factor": [2.0] * 8, "original_max_position_embeddings": 4096}


def test_the_builder_takes_transformers_5s_gemma3_and_long_rope_phi3_configs(tmp_path, small_tokenizer):
    """transformers 5 keeps Gemma 3's rope per attention type and names Phi-3's long rope ``rope_type``; the builder
    reads transformers 4's keys (KeyError 'rope_type' / 'type' without vqexport.trunk.builder_main). Both build and
    match transformers' model, Gemma 3's local layers windowed (4 positions, the parity prompts are longer) and rotated
    with their own theta; a window of 300 gets a cache buffer at least that long (onnxruntime refuses a shorter one)."""
    from vqexport.graph_io import attention_windows, load_graph

    from .models import make_model

    gemma = make_model(tmp_path / "gemma3", arch="gemma3", vocab=320, hidden=64, sliding_window=4, rope_parameters=GEMMA3_ROPE,
                       layer_types=["sliding_attention", "full_attention"], eos_token_id=0, tokenizer=small_tokenizer)
    result = api.build("ort-genai", model=gemma, out=tmp_path / "g", steps=4)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    assert attention_windows(load_graph(tmp_path / "g" / "model.onnx")) == [4, -1]
    wide = make_model(tmp_path / "wide", arch="gemma3", vocab=320, hidden=64, sliding_window=300, max_position=512,
                      rope_parameters=GEMMA3_ROPE, layer_types=["sliding_attention", "full_attention"], eos_token_id=0,
                      tokenizer=small_tokenizer)  # a window longer than the cache buffer the runner first makes
    assert api.build("ort-genai", model=wide, out=tmp_path / "w", steps=4).parity.passed
    phi = make_model(tmp_path / "phi3", arch="phi3", vocab=320, hidden=64, max_position=131072, rope_parameters=LONGROPE,
                     original_max_position_embeddings=4096, sliding_window=262144, eos_token_id=0,
                     tokenizer=small_tokenizer)  # the window Phi-3-mini-128k's config gives, longer than its positions
    result = api.build("ort-genai", model=phi, out=tmp_path / "p", steps=4)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    phi4 = {**LONGROPE, "short_factor": [1.0 + 0.05 * i for i in range(24)], "long_factor": [2.0] * 24,
            "partial_rotary_factor": 0.75}  # Phi-4-mini's form: long rope on 48 of 64 head dimensions
    model = make_model(tmp_path / "phi4", arch="phi3", vocab=320, hidden=128, heads=2, kv_heads=1, max_position=131072,
                       rope_parameters=phi4, partial_rotary_factor=0.75, original_max_position_embeddings=4096, eos_token_id=0,
                       tokenizer=small_tokenizer)
    result = api.build("ort-genai", model=model, out=tmp_path / "p4", steps=4)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4


def _gemma3_multimodal(path, rope, tokenizer):
    """Gemma 3 4B and up: Gemma3ForConditionalGeneration, the decoder's settings in ``text_config`` (a tiny vision tower)."""
    import transformers as tf

    from .models import random_head

    text = dict(vocab_size=320, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, sliding_window=4, rope_parameters=rope,
                layer_types=["sliding_attention", "full_attention"], bos_token_id=None, eos_token_id=0, pad_token_id=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=300,
                             boi_token_index=301, eoi_token_index=302, tie_word_embeddings=True)
    torch.manual_seed(0)
    tf.Gemma3ForConditionalGeneration(config).save_pretrained(str(path))
    (path / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    write_head(path, random_head(320, 64, 11))
    return path


def test_the_builder_takes_gemma3s_multimodal_config(tmp_path, small_tokenizer):
    """The 4B-and-up form keeps the per-attention-type rope in text_config: given to the builder there too."""
    model = _gemma3_multimodal(tmp_path / "mm", GEMMA3_ROPE, small_tokenizer)
    result = api.build("ort-genai", model=model, out=tmp_path / "a", steps=4)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4


def test_what_the_builders_gemma3_graph_would_get_wrong_is_refused(tmp_path, small_tokenizer):
    """Rope scaling on Gemma 3's global layers (4B and up) reaches the builder's local caches too (max |diff| 0.12
    when tried); a window longer than the positions (Gemma 3's default 4,096 here) stops onnxruntime at its first
    run. One line each, nothing written."""
    from .models import make_model

    scaled = {**GEMMA3_ROPE, "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    model = make_model(tmp_path / "scaled", arch="gemma3", vocab=320, hidden=64, sliding_window=4, rope_parameters=scaled,
                       layer_types=["sliding_attention", "full_attention"], eos_token_id=0, tokenizer=small_tokenizer)
    assert_user_error(run_cli("build", "--target", "ort-int4", "--model", model, "--out", tmp_path / "a"),
                      "does not reproduce", "full_attention layers use linear rope scaling", 'source = "portable"')
    multimodal = _gemma3_multimodal(tmp_path / "mm", scaled, small_tokenizer)
    assert_user_error(run_cli("build", "--target", "ort-int4", "--model", multimodal, "--out", tmp_path / "c"),
                      "does not reproduce", "full_attention layers use linear rope scaling")
    long = make_model(tmp_path / "long", arch="gemma3", vocab=320, hidden=64, rope_parameters=GEMMA3_ROPE,
                      layer_types=["sliding_attention", "full_attention"], eos_token_id=0, tokenizer=small_tokenizer)
    assert_user_error(run_cli("build", "--target", "ort-genai", "--model", long, "--out", tmp_path / "b"),
                      "sliding window of 4096 positions, longer than its 256")
    assert not any((tmp_path / d).exists() for d in "abc")


def test_int4_rows_need_a_hidden_size_in_blocks_of_32(tmp_path):
    from vqexport.head.spec import make_head

    from .models import make_model, random_head

    model = make_model(tmp_path / "m", vocab=101, hidden=48, heads=4, head=False)
    h = random_head(101, 48, 8)
    write_head(model, make_head({"codebook": h.codebook, "map": h.map, "bias": h.bias}, probes=2))
    target = tmp_path / "rows4.toml"
    target.write_text('name = "rows4"\nbackend = "ort"\nopset = 21\n[two_stage]\nrows = "int4"\n')
    assert_user_error(run_cli("build", "--target", target, "--model", model, "--out", tmp_path / "a"),
                      "two_stage.rows = 'int4'", "hidden size 48", "rows = 'int8'")
    assert not (tmp_path / "a").exists()


GRANITE = {"logits_scaling": 8.0, "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625}


@pytest.mark.parametrize("two_stage", [False, True])
def test_the_builders_trunk_takes_a_models_logit_scale(tmp_path, small_tokenizer, two_stage):
    """Granite divides its logits by logits_scaling: the builder's graph stops at the hidden state, before the output
    layer's scale, so the head must read the hidden state times 1/8 there too (without it: parity fails by 12.8). A
    two-stage head probing every cluster reads its rows from the builder's embedding table (the table, not its
    lookup times Granite's embedding_multiplier) and gives transformers' own logits."""
    from vqexport.head.spec import make_head

    from .models import make_model, random_head

    head = None
    if two_stage:
        h = random_head(320, 64, 20)
        head = make_head({"codebook": h.codebook, "map": np.arange(320, dtype=np.int32) % 20, "bias": h.bias}, probes=20)
    model = make_model(tmp_path / "granite", arch="granite", vocab=320, hidden=64, eos_token_id=0, tokenizer=small_tokenizer,
                       head=head, **GRANITE)
    result = api.build("ort-genai", model=model, out=tmp_path / "g", steps=4)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    if two_stage:
        ids = np.random.default_rng(0).integers(0, 320, size=(1, 9))
        with OrtRunner.from_artifact(result.out) as r:
            got = r.step(ids, np.ones_like(ids), r.empty_past(1)).logits[:, -1]
        np.testing.assert_allclose(got, transformers_logits(model, ids, np.ones_like(ids))[:, -1], atol=1e-4, rtol=0)


def test_a_model_that_scales_its_logits_converts_to_its_own_logits(tmp_path, small_tokenizer):
    """The conversion fits the model's own (scaled) logits: a two-stage head probing every cluster gives transformers'
    logits through the artifact, and fidelity's dense perplexity is the model's own on the same windows."""
    from .models import make_model

    dense = make_model(tmp_path / "dense", arch="granite", vocab=320, hidden=32, eos_token_id=0, tokenizer=small_tokenizer,
                       head=False, **GRANITE)
    result = run_cli("convert", "--from", dense, "-k", 20, "--head", "two-stage", "--probes", 20, "--out", tmp_path / "ts")
    assert result.exit_code == 0, result.stderr
    built = api.build("ort", model=tmp_path / "ts", out=tmp_path / "a", steps=4)
    assert built.parity.passed
    rng = np.random.default_rng(0)
    ids, nxt = rng.integers(0, 320, size=(2, 9)), rng.integers(0, 320, size=(2, 1))
    mask = np.ones_like(ids)
    prefill, decode = artifact_logits(built.out, ids, mask, nxt)
    assert prefill.shape == (2, 1, 320)  # a two-stage head's prefill gives the last position's logits
    np.testing.assert_allclose(prefill[:, -1], transformers_logits(dense, ids, mask)[:, -1], atol=1e-4, rtol=0)
    full = np.concatenate([ids, nxt], 1)
    np.testing.assert_allclose(decode, transformers_logits(dense, full, np.ones_like(full))[:, -1], atol=1e-4, rtol=0)

    _fidelity_is_the_models_own(tmp_path, dense, small_tokenizer)


def test_a_soft_capped_model_converts_to_its_own_logits(tmp_path, small_tokenizer):
    """convert and fidelity compare the model's distribution after its cap: a two-stage head probing every cluster
    gives transformers' logits through the artifact, and fidelity's dense perplexity is the model's own."""
    from .models import make_model

    dense = make_model(tmp_path / "dense", arch="gemma2", vocab=320, hidden=32, eos_token_id=0, tokenizer=small_tokenizer,
                       head=False, final_logit_softcapping=SOFTCAP, sliding_window=8)
    result = run_cli("convert", "--from", dense, "-k", 20, "--head", "two-stage", "--probes", 20, "--out", tmp_path / "ts")
    assert result.exit_code == 0, result.stderr
    built = api.build("ort", model=tmp_path / "ts", out=tmp_path / "a", steps=4)
    assert built.parity.passed
    ids, nxt = np.random.default_rng(0).integers(0, 320, size=(2, 9)), np.array([[3], [5]])
    prefill, decode = artifact_logits(built.out, ids, np.ones_like(ids), nxt)
    np.testing.assert_allclose(prefill[:, -1], transformers_logits(dense, ids, np.ones_like(ids))[:, -1], atol=1e-4, rtol=0)
    _fidelity_is_the_models_own(tmp_path, dense, small_tokenizer)


def _fidelity_is_the_models_own(tmp_path, dense, tokenizer):
    """``fidelity`` on the head converted into tmp_path/ts (one that probes every cluster): its dense perplexity is
    transformers' own on the same windows, and the head's equals it."""
    from pathlib import Path

    from tokenizers import Tokenizer

    text = tmp_path / "text.txt"
    text.write_text(Path(__file__).read_text())
    result = run_cli("fidelity", "--model", tmp_path / "ts", "--text", text, "--window", 64, "--max-tokens", 640, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    tokens = np.array(Tokenizer.from_file(str(tokenizer)).encode(text.read_text()).ids[:641])
    windows = tokens[:640].reshape(10, 64)
    logits = torch.from_numpy(transformers_logits(dense, windows, np.ones_like(windows)))
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 320), torch.from_numpy(tokens[1:641]).long())
    assert report["dense_ppl"] == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    assert report["ppl_change"] == pytest.approx(0.0, abs=1e-5) and report["top1_agreement"] == 1.0


def test_distilling_a_soft_capped_head_follows_the_capped_distribution():
    """kl_step's loss and gradient are those of KL(dense || head) after the model's cap, through the cap."""
    from vqexport.convert.router import kl_step
    from vqexport.head.module import DenseHead, VQLogitsHead, soft_cap

    from .models import random_head

    gen = torch.Generator().manual_seed(0)
    dense = DenseHead(torch.randn(50, 8, generator=gen), softcap=SOFTCAP)
    h = torch.randn(6, 8, generator=gen)
    heads = [VQLogitsHead.from_head(random_head(50, 8, 7)).train() for _ in range(2)]
    loss = kl_step(heads[0], dense, h, torch.optim.SGD(heads[0].parameters(), lr=0.0))
    want = torch.nn.functional.kl_div(torch.log_softmax(soft_cap(heads[1](h), SOFTCAP), -1),
                                      torch.log_softmax(soft_cap(dense(h), SOFTCAP), -1), log_target=True, reduction="batchmean")
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-5)
    for a, b in zip(heads[0].parameters(), heads[1].parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4)
    uncapped = torch.nn.functional.kl_div(torch.log_softmax(heads[1](h), -1), torch.log_softmax(dense(h), -1),
                                          log_target=True, reduction="batchmean")
    assert abs(uncapped.item() - loss) > 1e-3  # the cap changes what is fitted


def test_logits_no_head_on_the_hidden_state_can_give_are_refused(tmp_path, monkeypatch):
    """A scale under a config key vqexport does not read stands for any transform after the output layer: refused in
    one line, nothing written, where it would otherwise build a graph whose logits are not the model's."""
    from vqexport.trunk import hf

    model_dir = _dense_model(tmp_path / "model", "granite", **GRANITE)
    monkeypatch.setattr(hf, "LOGIT_SCALE_KEYS", ())
    assert_user_error(run_cli("build", "--model", model_dir, "--out", tmp_path / "o"),
                      "granite model's logits are not its output layer applied to its final hidden state")
    assert not (tmp_path / "o").exists()

"""The embedded default model, built for ONNX Runtime: artifact contract, parity goals, determinism,
onnxruntime-genai, the torch-free generate path, inspect."""

import json
import subprocess
import sys

import pytest

from vqexport import api
from vqexport.artifact import read_manifest, sha256_file
from vqexport.source import demo_dir, load_source

from .conftest import generate_in_a_fresh_process, run_cli
from .models import genai_greedy, make_model, runner_greedy

PROMPT = "def read_config(path):\n    "


def test_embedded_model_meets_its_spec():
    """A transformers Llama directory (the dense model, loadable by transformers alone) with a VQ-Logits head beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = load_source(demo_dir())
    geo, head = source.geometry, source.head.config
    assert geo.model_type == "llama" and geo.vocab_size >= 8192 and geo.tie_word_embeddings
    assert head.type == "vq" and head.bias and head.codebook_size <= geo.vocab_size // 16
    assert source.tokenizer_path is not None
    assert sum(p.stat().st_size for p in demo_dir().iterdir()) < 10 * 2**20
    model = AutoModelForCausalLM.from_pretrained(str(demo_dir()))
    assert type(model).__name__ == "LlamaForCausalLM"
    from tokenizers import Tokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_dir()))
    assert tok.encode(PROMPT) == Tokenizer.from_file(str(source.tokenizer_path)).encode(PROMPT).ids
    card = (demo_dir() / "MODEL_CARD.md").read_text()
    assert "dense ppl" in card and "VQ ppl" in card


def test_artifact_layout_and_manifest(demo_artifact):
    names = {p.name for p in demo_artifact.iterdir()}
    assert {"model.onnx", "model.onnx.data", "vq_head.json", "vq_head.safetensors", "tokenizer.json", "tokenizer_config.json",
            "genai_config.json", "manifest.json"} == names  # no second copy of the weights
    m = read_manifest(demo_artifact)
    assert set(m["files"]) == names - {"manifest.json"}
    for name, info in m["files"].items():
        assert sha256_file(demo_artifact / name) == info["sha256"]
        assert (demo_artifact / name).stat().st_size == info["bytes"]
    assert m["target"] == "ort" and m["opset"] >= 18 and m["profile"]["backend"] == "ort"
    assert {"torch", "transformers", "onnx", "onnxruntime", "vqexport", "python"} <= set(m["versions"])
    assert m["source"]["model"] == "demo"
    assert m["parity"]["passed"] is True
    source = load_source(demo_dir())
    V, d, K = source.geometry.vocab_size, source.geometry.hidden_size, source.head.config.codebook_size
    assert m["config"]["head"]["codebook_size"] == K and m["config"]["model_type"] == "llama"
    assert (demo_artifact / "model.onnx").stat().st_size < 100_000  # the weights live in model.onnx.data
    head = m["sizes"]["head"]
    assert head["params"] == K * d + V + V  # codebook + map + bias
    assert head["tensors"]["head.map"]["bytes"] == 4 * V  # int32 map
    assert m["sizes"]["dense_head"]["params"] == V * d + V
    assert m["sizes"]["trunk"]["params"] > 0


def test_verify_json_meets_the_fp32_goal(demo_artifact):
    result = run_cli("verify", "--artifact", demo_artifact, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)  # exactly one JSON object on stdout
    for key in ("target", "passed", "max_abs_diff", "top1_agreement", "kl_divergence", "greedy_match_steps", "steps"):
        assert key in report
    assert report["target"] == "ort" and report["passed"] is True
    assert report["steps"] == 32 and report["greedy_match_steps"] == 32
    assert report["max_abs_diff"] <= 1e-4
    assert report["top1_agreement"] == 1.0
    assert 0 <= report["kl_divergence"] <= 1e-6


def test_verify_human_output(demo_artifact):
    result = run_cli("verify", "--artifact", demo_artifact, "--steps", 4)
    assert result.exit_code == 0
    assert "PASSED" in result.stdout and "top-1 agreement" in result.stdout


def test_verify_on_the_users_prompts(demo_artifact, tmp_path):
    """--prompt (text, the model's tokenizer) and --prompts (a JSON list of strings or token-id lists) replace the
    built-in prompts: every given token and decode step is compared, and nothing else."""
    from tokenizers import Tokenizer

    from vqexport.source import demo_dir

    text = "import numpy as np\n\n\ndef norm(x):\n    return"
    (tmp_path / "p.json").write_text(json.dumps(["while True:\n    ", [5, 900, 77, 4000]]))
    result = run_cli("verify", "--artifact", demo_artifact, "--prompt", text, "--prompts", tmp_path / "p.json",
                     "--steps", 3, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    tok = Tokenizer.from_file(str(demo_dir() / "tokenizer.json"))
    lengths = [len(tok.encode(text).ids), len(tok.encode("while True:\n    ").ids), 4]
    assert report["passed"] and report["batch"] == 3
    assert report["positions"] == sum(lengths) + 3 * 3  # every prompt position, then 3 decode steps per prompt


def test_verify_rejects_tampered_or_incomplete_artifacts(demo_artifact, tmp_path):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(demo_artifact, copy)
    with open(copy / "genai_config.json", "a") as f:
        f.write(" ")
    r = run_cli("verify", "--artifact", copy)
    assert r.exit_code == 2 and "modified since the build" in r.stderr
    (copy / "manifest.json").unlink()
    r = run_cli("verify", "--artifact", copy)
    assert r.exit_code == 2 and "not a complete vqexport artifact" in r.stderr
    r = run_cli("verify", "--artifact", tmp_path / "missing")
    assert r.exit_code == 2 and "does not exist" in r.stderr


@pytest.mark.parametrize("change, says", [
    (lambda m: m["files"].pop("model.onnx.data"), "model.onnx.data: the model's weights are not among the files"),
    (lambda m: m["files"].pop("model.onnx"), "runtime.model_file must be one of the files it lists"),
    (lambda m: m["runtime"].update(model_file="../elsewhere.onnx"), "runtime.model_file must be one of the files it lists"),
    (lambda m: m["files"].update({"../outside": m["files"]["vq_head.json"]}), "files must name files inside the artifact"),
])
def test_verify_runs_only_files_the_manifest_vouches_for(demo_artifact, tmp_path, change, says):
    """A manifest edited to leave the weights, or the model file itself, out of its hashes, or to point outside the
    directory: refused, not run unchecked."""
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(demo_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for command in (["verify", "--artifact", copy, "--steps", 1], ["generate", "--artifact", copy, "--prompt", "x"]):
        r = run_cli(*command)
        assert r.exit_code == 2 and says in r.stderr, (command, r.stderr)


def test_two_builds_give_byte_identical_model(demo_artifact, tmp_path):
    out = tmp_path / "again"
    proc = subprocess.run([sys.executable, "-m", "vqexport", "build", "--target", "ort", "--out", str(out), "--steps", "1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in ("model.onnx", "model.onnx.data", "vq_head.safetensors", "genai_config.json"):
        assert (out / name).read_bytes() == (demo_artifact / name).read_bytes(), name


def test_builds_in_one_process_give_byte_identical_models(tmp_path):
    """The first build of a model in a process exports its trunk, the next ones copy it from a cache: the values the
    head and the passes add must be named alike in both, whatever target."""
    from vqexport import build

    model = make_model(tmp_path / "m", arch="llama", vocab=97, hidden=32, k=11)
    for target in ("ort", "ort-int8", "ort-topk"):
        build._TRUNKS.clear()  # the first build exports
        outs = [api.build(target, model=model, out=tmp_path / f"{target}-{i}", steps=1).out for i in range(2)]
        assert (outs[0] / "model.onnx").read_bytes() == (outs[1] / "model.onnx").read_bytes(), target


def _torch_greedy(prompt_ids, n):
    from vqexport.backends.torch_ref import TorchRunner

    with TorchRunner.from_source(load_source(demo_dir())) as ref:
        return runner_greedy(ref, prompt_ids, n)


def test_onnxruntime_genai_loads_the_directory_and_matches_torch(demo_artifact):
    import onnxruntime_genai as og  # a test dependency ('.[test]'): missing, the test fails
    from tokenizers import Tokenizer

    model = og.Model(str(demo_artifact))
    tok = og.Tokenizer(model)
    ids = [int(i) for i in tok.encode(PROMPT)]
    assert ids == Tokenizer.from_file(str(demo_artifact / "tokenizer.json")).encode(PROMPT).ids
    n = 24
    got = genai_greedy(demo_artifact, ids, n, stop_at_eos=True)
    expected = _torch_greedy(ids, n)
    eos = load_source(demo_dir()).geometry.eos_token_id
    if eos in expected:  # genai stops at eos
        expected = expected[: expected.index(eos) + 1]
    assert got == expected


def _until_eos(tokens):
    """The tokens generate returns for these greedy ones: it stops before the model's eos token."""
    eos = load_source(demo_dir()).geometry.eos_token_id
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def test_generate_runs_without_torch_and_matches_torch(demo_artifact):
    out = generate_in_a_fresh_process(demo_artifact, PROMPT, 12)
    expected = _torch_greedy(out["prompt"], 12)
    assert out["new"] == _until_eos(expected)  # every token, and all 12 of them unless the reference reached eos
    assert len(out["new"]) == 12 or out["stopped_at_eos"], out


def test_generate_cli(demo_artifact):
    from tokenizers import Tokenizer

    result = run_cli("generate", "--artifact", demo_artifact, "--prompt", PROMPT, "--max-new-tokens", 8)
    assert result.exit_code == 0, result.stderr
    tok = Tokenizer.from_file(str(demo_artifact / "tokenizer.json"))
    expected = _until_eos(_torch_greedy(tok.encode(PROMPT).ids, 8))
    assert len(expected) >= 1
    assert result.stdout == PROMPT + tok.decode(expected) + "\n"  # the prompt, then the 8 greedy tokens (fewer at eos)
    bad = run_cli("generate", "--artifact", demo_artifact, "--prompt", PROMPT, "--max-new-tokens", 0)
    assert bad.exit_code == 2 and "max-new-tokens" in bad.stderr


@pytest.mark.parametrize("what", ["model", "artifact", "onnx"])
def test_inspect(demo_artifact, what):
    path = {"model": demo_dir(), "artifact": demo_artifact, "onnx": demo_artifact / "model.onnx"}[what]
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    source = load_source(demo_dir())
    V, d, K = source.geometry.vocab_size, source.geometry.hidden_size, source.head.config.codebook_size
    s = info["sizes"]
    assert s["head"]["params"] == K * d + 2 * V
    assert s["dense_head"]["params"] == V * d + V
    assert s["head_params_vs_dense"] < 0.2
    n = sum(p.numel() for p in _hf_model().parameters())  # the graph adds a few constants (rotary frequencies, ...)
    assert n <= s["trunk"]["params"] <= n * 1.001
    assert "deployed" not in info  # ONNX Runtime loads the graph inspected itself
    if what != "model":
        assert [i["name"] for i in info["inputs"]][:2] == ["input_ids", "attention_mask"]
        assert info["inputs"][0]["shape"] == ["batch_size", "sequence_length"]
        assert info["outputs"][0]["shape"] == ["batch_size", "sequence_length", V]
        assert info["ops"]["MatMul"] >= 1 and info["ops"]["GatherElements"] >= 1
    human = run_cli("inspect", path)
    assert human.exit_code == 0 and "dense head" in human.stdout
    if what != "model":  # the shape column is printed as text, not swallowed as markup
        assert "[batch_size, sequence_length]" in human.stdout.replace("\n", "")


def _hf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(demo_dir()))


def test_inspect_bad_path(tmp_path):
    r = run_cli("inspect", tmp_path / "x.onnx")
    assert r.exit_code == 2 and f"{tmp_path / 'x.onnx'}: does not exist" in r.stderr
    (tmp_path / "x.onnx").write_bytes(b"garbage")
    r = run_cli("inspect", tmp_path / "x.onnx")
    assert r.exit_code == 2 and "cannot read ONNX model" in r.stderr


def test_targets_listed():
    r = run_cli("targets", "--json")
    assert r.exit_code == 0 and "ort" in json.loads(r.stdout)

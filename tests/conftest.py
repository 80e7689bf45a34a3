from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

from vqexport.checkpoint import save_checkpoint  # noqa: E402
from vqexport.config import HeadConfig, ModelConfig  # noqa: E402


def make_config(vocab=97, d=32, layers=2, heads=4, kv_heads=2, d_ff=48, head="vq", k=11, bias=True, qkv_bias=False, max_position=256,
                rank=0):
    return ModelConfig(vocab_size=vocab, d_model=d, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, d_ff=d_ff,
                       qkv_bias=qkv_bias, max_position=max_position, eos_token_id=None,
                       head=HeadConfig(type=head, codebook_size=k if head == "vq" else 0, bias=bias, rank=rank))


def make_tensors(cfg: ModelConfig, seed=0) -> dict[str, np.ndarray]:
    """Random weights for every tensor the config implies (a map that uses every code when V >= K)."""
    import torch

    from vqexport.model import VQLogitsLM, to_tensors

    torch.manual_seed(seed)
    model = VQLogitsLM(cfg)
    tensors = to_tensors(model)
    rng = np.random.default_rng(seed)
    for name, arr in tensors.items():
        if arr.dtype == np.float32 and name.endswith("norm.weight"):
            tensors[name] = (1 + 0.1 * rng.standard_normal(arr.shape)).astype(np.float32)
        elif name == "head.bias":
            tensors[name] = rng.standard_normal(arr.shape).astype(np.float32)
        elif name == "head.codebook":
            tensors[name] = rng.standard_normal(arr.shape).astype(np.float32) * cfg.d_model**-0.5 * 4
        elif name in ("head.lowrank_p", "head.lowrank_u"):  # a correction big enough to change rankings
            tensors[name] = rng.standard_normal(arr.shape).astype(np.float32) * (cfg.d_model**-0.5 if name.endswith("_p") else 1.5)
    if cfg.head.type == "vq":
        k, v = cfg.head.codebook_size, cfg.vocab_size
        m = np.concatenate([np.arange(min(k, v)), rng.integers(0, k, size=max(v - k, 0))])
        tensors["head.map"] = rng.permutation(m).astype(np.int32)
    return tensors


def make_checkpoint(path: Path, cfg: ModelConfig | None = None, seed=0, tokenizer: Path | None = None, **kw) -> Path:
    cfg = cfg or make_config(**kw)
    save_checkpoint(path, cfg, make_tensors(cfg, seed), tokenizer_path=tokenizer)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path) -> Path:
    return make_checkpoint(tmp_path / "ckpt")


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory) -> Path:
    """The embedded demo model built for the ort target once per test session."""
    from vqexport import api

    out = tmp_path_factory.mktemp("demo") / "ort"
    api.build("ort", out=out)
    return out


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer with about 300 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = Path(__file__).read_text() * 4
    tok.train_from_iterator([text], trainer=trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def run_cli(*args):
    """Invoke the CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from vqexport.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments):
    """Exit code 2 and one clear line on stderr that mentions every fragment."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    assert "Traceback" not in result.stderr

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")
# Output is judged as a pipe gives it: no terminal width from the environment (pytest-xdist's workers set COLUMNS=80);
# a test that needs one sets it.
os.environ.pop("COLUMNS", None)


def _interpret_triton_without_a_gpu() -> None:
    """Without a CUDA GPU, Triton kernels run in Triton's interpreter on CPU tensors (tests/test_gpu_kernel.py).
    Triton reads the switch when a kernel is defined, and its own library functions are kernels defined when it is
    imported: so it is set before anything imports Triton."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_a_gpu()

from .models import make_model  # noqa: E402


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    """A random-weight Llama (V 97, d 32, 2 layers, GQA) with a random VQ-Logits head (K 11, bias)."""
    return make_model(tmp_path / "model")


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


TEXT_CHARS = 150_000


def sample_text(chars: int = TEXT_CHARS) -> str:
    """Text to fit and measure on: the test files' own source, in name order, cut to ``chars`` characters, so that
    what the tests convert and score does not grow with the suite."""
    text = "".join(p.read_text() for p in sorted(Path(__file__).parent.glob("test_*.py")))
    assert len(text) >= chars, (len(text), chars)
    return text[:chars]


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


def generate_in_a_fresh_process(artifact, prompt: str, max_new_tokens: int, absent=("torch",)) -> dict:
    """``vqexport.generate.generate`` in a new interpreter; fails unless none of the modules ``absent`` was imported.
    Returns {"prompt": prompt ids, "new": generated ids, "text": the generated text, "stopped_at_eos": bool}."""
    import json
    import subprocess
    import sys

    code = (
        "import sys, json\n"
        "from vqexport.generate import generate\n"
        f"g = generate({str(artifact)!r}, {prompt!r}, max_new_tokens={max_new_tokens})\n"
        f"assert not [m for m in {tuple(absent)!r} if m in sys.modules], sorted(sys.modules)\n"
        "print(json.dumps({'prompt': g.prompt_ids, 'new': g.new_ids, 'text': g.text, 'stopped_at_eos': g.stopped_at_eos}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)

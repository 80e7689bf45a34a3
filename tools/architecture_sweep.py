"""Which of transformers' causal-LM architectures vqexport builds, and what it refuses: every model type
AutoModelForCausalLM maps, as a tiny random model, through ``vqexport build --target ort`` with the identity head
(K = V: the artifact must give transformers' own logits), then compared with transformers on a prefill of 9 tokens
(two rows, one left-padded) and one decode step.

    python tools/architecture_sweep.py [--target ort|ort-genai] [--out TABLE.md] [MODEL_TYPE ...]

With ``--target ort-genai`` the trunk is onnxruntime-genai's builder graph (each model gets a 101-word tokenizer,
which the builder needs).

Each model type ends in one of:

* ``builds``: the artifact's logits equal transformers' to 1e-4;
* ``refused``: vqexport's one-line error (the reason is printed);
* ``differs``: the artifact builds but its logits are not transformers' (a bug: the sweep exits 1);
* ``fails``: anything else raised inside vqexport (a bug: the sweep exits 1);
* ``not tried``: the generic tiny sizes do not make a working model of this type (a composite or encoder-decoder
  config, sizes its config validation rejects, or a model transformers itself cannot run on them), so nothing is
  said about it.

Tiny sizes: V = 101, d = 32 (64 for the builder, whose attention needs head sizes of 16k), 2 layers, 4 heads (2
key/value heads where the config takes them, 4 for multi-head latent attention, which expands its latent to every
head). Each model type
runs in a process of its own. Takes about 20 minutes on 2 cores for the portable trunk (its mixture-of-experts and
latent-attention types build now), 12 for the builder. Nothing is downloaded.
docs/architectures.md holds both targets' tables (``--out`` writes one table: paste it there).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import shutil
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # vqexport, and tests.models' model helpers

SIZES = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
# the builder's GroupQueryAttention runs head sizes of 16k only, with a cos/sin cache of 8k columns
GENAI_SIZES = dict(SIZES, hidden_size=64, intermediate_size=96, head_dim=16, eos_token_id=0)  # the builder needs an eos
TIME_LIMIT = 180  # seconds per model type


def _config(model_type: str, sizes: dict = SIZES):
    """A tiny config of ``model_type`` from ``sizes``, the keys its class takes (or maps) only; None if transformers
    cannot make one, or if the decoder's settings live in a sub-config (composite models)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    takes = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    if "kv_lora_rank" in takes:  # latent attention expands its latent to every head: as many key/value heads
        sizes = dict(sizes, num_key_value_heads=sizes["num_attention_heads"])
    try:
        config = cls(**{k: v for k, v in sizes.items() if k in takes})
    except Exception:
        return None
    return config if config.get_text_config(decoder=True) is config else None


def _tokenizer(path: Path) -> None:
    """A word-level tokenizer.json with one entry per token id (the builder reads the model's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, SIZES["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def untie_routers(model) -> None:
    """Random weights for mixture-of-experts routers that transformers initialises to zeros (AFMoE's): with every
    expert's score equal, which experts a token gets is arbitrary, and ONNX's TopK breaks ties otherwise than
    torch.topk does. Real checkpoints' routers are not zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name and name.endswith("weight") and p.ndim == 2 and not p.any():
                p.normal_(0.0, 0.5)


def sweep_one(model_type: str, work: Path, target: str = "ort") -> tuple[str, str]:
    """(outcome, detail) of one model type, built for ``target`` in ``work``."""
    from transformers import AutoModelForCausalLM

    from tests.models import artifact_logits, identity_head, transformers_logits
    from vqexport import api
    from vqexport.errors import ParityError, VQExportError
    from vqexport.head.spec import write_head

    config = _config(model_type, SIZES if target == "ort" else GENAI_SIZES)
    if config is None:
        return "not tried", "no tiny decoder config from the generic sizes"
    model_dir = work / "model"
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        untie_routers(model)
        model.save_pretrained(str(model_dir))
        _tokenizer(model_dir)
    except Exception as e:
        return "not tried", f"transformers cannot make it ({type(e).__name__})"
    try:
        with torch.no_grad():
            model(input_ids=torch.arange(1, 9).view(1, -1))
    except Exception as e:
        return "not tried", f"transformers' own model fails on these sizes ({type(e).__name__}: {' '.join(str(e).split())[:100]})"
    del model
    try:
        write_head(model_dir, identity_head(model_dir))
        result = api.build(target, model=model_dir, out=work / "artifact", steps=4)
        rng = np.random.default_rng(0)
        ids, nxt = rng.integers(0, SIZES["vocab_size"], size=(2, 9)), rng.integers(0, SIZES["vocab_size"], size=(2, 1))
        mask = np.ones_like(ids)
        if target == "ort":  # the builder's attention takes no left-padded batches
            mask[1, :4] = 0
        prefill, step = artifact_logits(result.out, ids, mask, nxt)
    except VQExportError as e:
        return "refused", " ".join(str(e).replace(str(model_dir), "<model>").split())
    except ParityError as e:
        return "differs", f"parity: {' '.join(str(e).split())[:200]}"
    except Exception as e:
        where = [f"{Path(f.filename).name}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__) if "vqexport" in f.filename]
        return "fails", f"{type(e).__name__}: {' '.join(str(e).split())[:160]} ({', '.join(where[-2:])})"
    keep = mask.astype(bool)
    worst = float(np.abs(prefill[keep] - transformers_logits(model_dir, ids, mask)[keep]).max())
    full, full_mask = np.concatenate([ids, nxt], 1), np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
    worst = max(worst, float(np.abs(step - transformers_logits(model_dir, full, full_mask)[:, -1]).max()))
    return ("builds", f"max |diff| {worst:.1e}") if worst <= 1e-4 else ("differs", f"max |diff| {worst:.3g} against transformers")


def _child(model_type: str, work: Path, target: str, conn) -> None:
    from vqexport.quiet import quiet

    os.setsid()  # a process group of its own: a timeout ends the builder's subprocess with it
    try:
        with quiet():
            result = sweep_one(model_type, work, target)
    except Exception as e:  # raised outside sweep_one's own handling (the comparison with transformers, ...)
        result = "fails", f"{type(e).__name__}: {' '.join(str(e).split())[:160]}"
    conn.send(result)
    conn.close()


def isolated(model_type: str, target: str) -> tuple[str, str]:
    """``sweep_one`` in a forked process (a model that exhausts memory or hangs takes only that process down)."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    work = Path(tempfile.mkdtemp(prefix=f"sweep-{model_type}-"))
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(model_type, work, target, send))
    proc.start()
    send.close()
    try:
        if recv.poll(TIME_LIMIT):
            return recv.recv()
        return ("not tried", f"took more than {TIME_LIMIT} s") if proc.is_alive() else \
            ("not tried", f"its process died (exit code {proc.exitcode}; out of memory?)")
    except EOFError:
        return "not tried", f"its process died (exit code {proc.join(5) or proc.exitcode}; out of memory?)"
    finally:
        if proc.is_alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.join()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("types", nargs="*", help="model types (default: every one AutoModelForCausalLM maps)")
    ap.add_argument("--target", default="ort", choices=["ort", "ort-genai"], help="the target built (default: ort)")
    ap.add_argument("--out", type=Path, help="also write the table as Markdown here")
    args = ap.parse_args(argv)
    types = args.types or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    for module in ("onnxruntime", "torch.onnx", "vqexport.api", "vqexport.backends.ort.runner", "tests.models"):
        importlib.import_module(module)  # once here: every forked process inherits them
    rows = []
    for i, model_type in enumerate(types, 1):
        outcome, detail = isolated(model_type, args.target)
        rows.append((model_type, outcome, detail))
        print(f"[{i}/{len(types)}] {model_type}: {outcome} ({detail})", file=sys.stderr, flush=True)
    counts = {o: sum(1 for r in rows if r[1] == o) for o in ("builds", "refused", "differs", "fails", "not tried")}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items())
    print(summary)
    if args.out:
        lines = [f"## `--target {args.target}`", "",
                 f"`python tools/architecture_sweep.py --target {args.target}`: transformers {transformers.__version__}, "
                 f"{len(rows)} model types: {summary}.", "",
                 "| model type | outcome | detail |", "|---|---|---|"]
        lines += [f"| {t} | {o} | {d.replace('|', '/')} |" for t, o, d in rows]
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 1 if counts["differs"] or counts["fails"] else 0


if __name__ == "__main__":
    sys.exit(main())

"""Train the embedded default model (vqexport/data/demo) from scratch, seeded, on this machine.

    python tools/train_demo.py [--out vqexport/data/demo] [--steps N] [--anneal-steps N] [--dense DIR]
                               [--dense-only DIR] [--hidden-size D] [--layers L]

Text: the Python standard library's own source (present wherever Python is), split by file into
train and held-out parts. Steps:

1. a byte-level BPE tokenizer (vocabulary 8192) trained on the train files, saved as a Hugging Face fast
   tokenizer (tokenizer.json + tokenizer_config.json);
2. a transformers ``LlamaForCausalLM`` (3 layers, d = 128, tied embeddings) trained for ``--steps`` at lr 3e-3,
   then ``--anneal-steps`` at lr 1e-3, saved with ``save_pretrained`` (``--dense DIR`` reuses a saved one;
   ``--dense-only DIR`` saves it there and stops; ``--hidden-size`` / ``--layers`` train a larger twin, with an
   MLP of 2.75 d and heads of 32);
3. ``vqexport convert`` (the public API) on that directory: K = V/16 spherical k-means, bias, 300 steps of
   head-only distillation on the training text, held-out perplexity in MODEL_CARD.md.

The result is a Hugging Face model directory (the dense model, untouched) with a VQ-Logits head beside it.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

EOT = "<|endoftext|>"
SEED = 1234
VOCAB = 8192
SEQ = 128
BATCH = 32


def corpus_files(max_bytes: int) -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not {"site-packages", "test", "tests", "idle_test"} & set(p.relative_to(root).parts))
    train, held, total = [], [], 0
    for i, p in enumerate(files):
        size = p.stat().st_size
        if total + size > max_bytes:
            break
        total += size
        (held if i % 20 == 0 else train).append(p)
    return train, held


def read(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def train_tokenizer(texts: list[str], out: Path):
    """A byte-level BPE tokenizer, saved as a transformers fast tokenizer (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, pad_token=EOT)
    fast.save_pretrained(str(out))
    return tok


def encode(tok, texts: list[str]) -> np.ndarray:
    eot = tok.token_to_id(EOT)
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=np.int64)


def batches(data: np.ndarray, gen: torch.Generator):
    n = len(data) - SEQ - 1
    t = torch.from_numpy(data)
    while True:
        starts = torch.randint(n, (BATCH,), generator=gen)
        chunk = torch.stack([t[s : s + SEQ + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


def loss_of(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def perplexity(model, data: np.ndarray, max_tokens: int = 65536) -> float:
    model.eval()
    t = torch.from_numpy(data[: max_tokens + 1])
    n = (len(t) - 1) // SEQ
    x = t[: n * SEQ].view(n, SEQ)
    y = t[1 : n * SEQ + 1].view(n, SEQ)
    total = 0.0
    for i in range(0, n, BATCH):
        total += float(loss_of(model, x[i : i + BATCH], y[i : i + BATCH])) * len(x[i : i + BATCH])
    model.train()
    return math.exp(total / n)


def train(model, data: np.ndarray, steps: int, lr: float, seed: int, label: str) -> None:
    if steps <= 0:
        return
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    it = batches(data, gen)
    t0 = time.time()
    for step in range(steps):
        x, y = next(it)
        loss = loss_of(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"[{label}] step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)


def distill_text(train_text: list[str], held_text: list[str]) -> str:
    """Training files, then the held-out files as the last tenth: the converter distills on the first nine tenths and
    measures perplexity on the last, so its held-out figures are on files the dense model never saw."""
    sep = f"\n{EOT}\n"
    held = sep.join(held_text)
    head, size = [], 0
    for t in train_text:
        if size >= 9 * len(held):
            break
        head.append(t)
        size += len(t)
    return sep.join(head) + sep + held


def train_dense(out: Path, train_ids: np.ndarray, steps: int, anneal: int, eot: int, hidden: int = 128, layers: int = 3) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden % 32:
        raise SystemExit(f"--hidden-size must be a multiple of 32 (heads of 32), got {hidden}")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 32, num_key_value_heads=hidden // 32, max_position_embeddings=2048,
                      rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(cfg)
    train(model, train_ids, steps, 3e-3, SEED, "dense")
    train(model, train_ids, anneal, 1e-3, SEED + 1, "dense, anneal")
    model.eval()
    model.save_pretrained(str(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "vqexport" / "data" / "demo")
    ap.add_argument("--steps", type=int, default=1200, help="dense training steps at lr 3e-3")
    ap.add_argument("--anneal-steps", type=int, default=500, help="then this many at lr 1e-3")
    ap.add_argument("--distill-steps", type=int, default=300, help="head-only distillation steps of the conversion")
    ap.add_argument("--dense", type=Path, default=None, help="reuse a dense model saved by an earlier run (skips training)")
    ap.add_argument("--dense-only", type=Path, default=None, help="train and save the dense model here, then stop")
    ap.add_argument("--hidden-size", type=int, default=128, help="d of the dense model (the demo's 128)")
    ap.add_argument("--layers", type=int, default=3, help="decoder layers of the dense model (the demo's 3)")
    ap.add_argument("--max-bytes", type=int, default=24_000_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t_start = time.time()
    train_files, held_files = corpus_files(args.max_bytes)
    train_text, held_text = read(train_files), read(held_files)
    with tempfile.TemporaryDirectory() as tmp:
        dense_dir = args.dense or args.dense_only or Path(tmp) / "dense"
        if args.dense is None:
            dense_dir.mkdir(parents=True, exist_ok=True)
            tok = train_tokenizer(train_text, dense_dir)
            train_ids = encode(tok, train_text)
            print(f"corpus: {len(train_files)} train files ({len(train_ids)} tokens), {len(held_files)} held-out")
            train_dense(dense_dir, train_ids, args.steps, args.anneal_steps, tok.token_to_id(EOT), args.hidden_size, args.layers)
            if args.dense_only:
                print(f"wrote {dense_dir} in {time.time() - t_start:.0f} s")
                return
        text = Path(tmp) / "distill.txt"
        text.write_text(distill_text(train_text, held_text), encoding="utf-8")
        from vqexport import api

        staged = Path(tmp) / "demo"
        result = api.convert(dense_dir, VOCAB // 16, staged, distill_text=text, steps=args.distill_steps, seed=SEED,
                             clustering="spherical", progress=lambda label, done, total: None)
        card = staged / "MODEL_CARD.md"
        card.write_text(card.read_text(encoding="utf-8").replace(str(dense_dir.resolve()), "a dense Llama trained by tools/train_demo.py")
                        + f"\nTrained and converted by `tools/train_demo.py` (seed {SEED}; {args.steps} + {args.anneal_steps} dense "
                          f"steps of batch {BATCH}x{SEQ} on the Python standard library's source) with torch {torch.__version__}.\n",
                        encoding="utf-8")
        if args.out.exists():
            shutil.rmtree(args.out)
        shutil.copytree(staged, args.out)
        print(f"wrote {args.out}: {result.report['after_distillation']}")


if __name__ == "__main__":
    main()

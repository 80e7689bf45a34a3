"""Train the embedded default model (vqexport/data/demo) from scratch, seeded, on this machine.

    python tools/train_demo.py [--out vqexport/data/demo] [--dense-steps N] [--vq-steps N]

Text: the Python standard library's own source (present wherever Python is), split by file into
train and held-out parts. Steps:

1. a byte-level BPE tokenizer (vocabulary 8192) trained on the train files;
2. a dense-head LM trained for ``--dense-steps``;
3. its head converted to VQ-Logits (k-means of the head rows into K = V/16 codes, bias fitted from the
   mean hidden state) and the whole model fine-tuned for ``--vq-steps`` (map fixed);
4. the dense-head baseline trained for the same ``--vq-steps`` more, so both saw the same data and compute;
5. held-out perplexity of both (and of the VQ head before fine-tuning) written to MODEL_CARD.md.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vqexport.checkpoint import save_checkpoint  # noqa: E402
from vqexport.config import HeadConfig, ModelConfig  # noqa: E402
from vqexport.model import VQLogitsLM, to_tensors  # noqa: E402
from vqexport.vq_init import vq_head_from_dense  # noqa: E402

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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out))
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


def loss_of(model: VQLogitsLM, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(x)
    logits = model(x, mask, *model.empty_cache(x.shape[0]))[0]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def perplexity(model: VQLogitsLM, data: np.ndarray, max_tokens: int = 65536) -> float:
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


def train(model: VQLogitsLM, data: np.ndarray, steps: int, lr: float, seed: int, label: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
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


@torch.no_grad()
def mean_hidden(model: VQLogitsLM, data: np.ndarray, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    it = batches(data, gen)
    acc = []
    for _ in range(8):
        x, _ = next(it)
        h, _ = model.hidden(x, torch.ones_like(x), *model.empty_cache(x.shape[0]))
        acc.append(h.reshape(-1, h.shape[-1]).mean(0))
    return torch.stack(acc).mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "vqexport" / "data" / "demo")
    ap.add_argument("--dense-steps", type=int, default=600)
    ap.add_argument("--vq-steps", type=int, default=300)
    ap.add_argument("--max-bytes", type=int, default=24_000_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    train_files, held_files = corpus_files(args.max_bytes)
    train_text, held_text = read(train_files), read(held_files)
    work = args.out.parent / (args.out.name + ".tmp")
    work.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(train_text, work / "tokenizer.json")
    train_ids, held_ids = encode(tok, train_text), encode(tok, held_text)
    print(f"corpus: {len(train_files)} train files ({len(train_ids)} tokens), {len(held_files)} held-out ({len(held_ids)} tokens)")

    eot = tok.token_to_id(EOT)
    base = dict(vocab_size=VOCAB, d_model=128, n_layers=3, n_heads=4, n_kv_heads=4, d_ff=352, max_position=2048,
                bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
    dense_cfg = ModelConfig(head=HeadConfig(type="dense", bias=True), **base)
    vq_cfg = ModelConfig(head=HeadConfig(type="vq", codebook_size=VOCAB // 16, bias=True), **base)

    dense = VQLogitsLM(dense_cfg)
    train(dense, train_ids, args.dense_steps, 3e-3, SEED, "dense")

    vq = VQLogitsLM(vq_cfg)
    state = {k: v for k, v in dense.state_dict().items() if not k.startswith("head.")}
    codebook, mapping, bias = vq_head_from_dense(dense.head.weight, dense.head.bias, VOCAB // 16, mean_hidden(dense, train_ids, SEED), seed=SEED)
    state.update({"head.codebook": codebook, "head.map": mapping, "head.bias": bias})
    vq.load_state_dict(state)
    ppl_vq_init = perplexity(vq, held_ids)
    train(vq, train_ids, args.vq_steps, 1e-3, SEED + 1, "vq")
    train(dense, train_ids, args.vq_steps, 1e-3, SEED + 1, "dense")
    ppl_dense, ppl_vq = perplexity(dense, held_ids), perplexity(vq, held_ids)
    print(f"held-out perplexity: dense {ppl_dense:.2f}, vq {ppl_vq:.2f} (vq before fine-tuning {ppl_vq_init:.2f})")

    n_head_dense = VOCAB * 128 + VOCAB
    n_head_vq = (VOCAB // 16) * 128 + VOCAB
    card = f"""# vqexport demo model

A small VQ-Logits language model, trained from scratch on this repository's machines by
`tools/train_demo.py` (seed {SEED}). It exists so that `vqexport build` works with no download.

| | |
|---|---|
| architecture | decoder-only transformer, {base['n_layers']} layers, d={base['d_model']}, {base['n_heads']} heads, SwiGLU d_ff={base['d_ff']}, RoPE, RMSNorm |
| vocabulary | V={VOCAB}, byte-level BPE trained on the same text (`tokenizer.json`) |
| head | VQ-Logits, K={VOCAB // 16} codes (V/16), per-token bias on |
| text | Python {platform.python_version()} standard library source, {len(train_files)} files for training ({len(train_ids)} tokens), every 20th file held out ({len(held_files)} files, {len(held_ids)} tokens) |
| training | dense-head model {args.dense_steps} steps, then the head converted (k-means of head rows, bias from the mean hidden state) and the whole model fine-tuned {args.vq_steps} steps with the map fixed; batch {BATCH}x{SEQ} tokens, AdamW |
| baseline | the same dense-head model trained {args.vq_steps} steps more on the same batches |

## Held-out perplexity (first 65,536 held-out tokens)

| model | perplexity | head parameters |
|---|---|---|
| dense head (baseline) | {ppl_dense:.2f} | {n_head_dense:,} |
| VQ-Logits head, right after conversion | {ppl_vq_init:.2f} | {n_head_vq:,} |
| VQ-Logits head, fine-tuned (this model) | {ppl_vq:.2f} ({100 * (ppl_vq / ppl_dense - 1):+.1f}% vs dense) | {n_head_vq:,} ({100 * (1 - n_head_vq / n_head_dense):.1f}% fewer) |

A plain VQ head on a model this small costs real perplexity; this model is for exercising the toolchain
(export, parity, latency), not for its text.

Trained in {time.time() - t_start:.0f} s with {args.threads} threads, torch {torch.__version__}.
"""
    save_checkpoint(work, vq_cfg, to_tensors(vq), extra_files={"MODEL_CARD.md": card})
    if args.out.exists():
        import shutil

        shutil.rmtree(args.out)
    work.rename(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

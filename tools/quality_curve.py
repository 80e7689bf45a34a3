"""Quality benchmark for `vqexport convert`: held-out perplexity vs codebook size, with and without bias
and head-only distillation, on a dense-head model trained the same way as the embedded default model.

    python tools/quality_curve.py [--dense-steps 1700] [--distill-steps 300] [--out quality.md]

1. trains the dense-head baseline with tools/train_demo.py's recipe (same tokenizer, text, sizes, seed);
2. for K in V/256, V/64, V/32, V/8 and bias on/off, runs `vqexport convert` with a distillation text whose
   last 10% is the held-out files (never trained on): "after conversion" and "after distillation" figures;
3. prints a markdown table (and writes it to --out).
Slow (tens of minutes on 2 cores); a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_demo  # noqa: E402

from vqexport import api  # noqa: E402
from vqexport.checkpoint import demo_dir, save_checkpoint  # noqa: E402
from vqexport.config import HeadConfig  # noqa: E402
from vqexport.model import VQLogitsLM, to_tensors  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense-steps", type=int, default=1700, help="the demo recipe: 1200 + 500")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--held-bytes", type=int, default=250_000, help="held-out text (the last 10%% of the distillation text)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(train_demo.SEED)
    torch.set_num_threads(2)
    t0 = time.time()

    demo = api.load_checkpoint(demo_dir())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo.tokenizer_path))
    train_files, held_files = train_demo.corpus_files(24_000_000)
    train_text, held_text = train_demo.read(train_files), train_demo.read(held_files)
    train_ids = train_demo.encode(tok, train_text)
    cfg = demo.config
    dense_cfg = dataclasses.replace(cfg, head=HeadConfig(type="dense", bias=True))
    dense = VQLogitsLM(dense_cfg)
    train_demo.train(dense, train_ids, args.dense_steps, 3e-3, train_demo.SEED, "dense")

    held = "".join(held_text)[: args.held_bytes]
    text = "".join(train_text)[: 9 * len(held)] + held  # convert holds out the last 10%: the held-out files
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_checkpoint(tmp / "dense", dense_cfg, to_tensors(dense), tokenizer_path=demo.tokenizer_path)
        (tmp / "text.txt").write_text(text, encoding="utf-8")
        V = cfg.vocab_size
        for div in (256, 64, 32, 8):
            for bias in (True, False):
                k = V // div
                r = api.convert(tmp / "dense", k, tmp / f"vq-{div}-{bias}", bias=bias, distill_text=tmp / "text.txt",
                                steps=args.distill_steps, clustering="euclidean").report
                before, after = r["before_distillation"], r["after_distillation"]
                head = k * cfg.d_model + (V if bias else 0)
                rows.append((f"V/{div} = {k}", "yes" if bias else "no", before["dense_ppl"], before["vq_ppl"],
                             after["vq_ppl"], after["ppl_change"], after["top1_agreement"], head / (V * cfg.d_model + V)))
                print(rows[-1], f"({time.time() - t0:.0f}s)", flush=True)
    lines = ["| K | bias | dense ppl | VQ ppl (converted) | VQ ppl (distilled) | change | top-1 agreement | head params vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {b} | {d:.2f} | {v0:.2f} | {v1:.2f} | {100 * c:+.1f}% | {a:.3f} | {100 * h:.1f}% |"
              for k, b, d, v0, v1, c, a, h in rows]
    table = "\n".join(lines) + f"\n\n({args.dense_steps} dense steps, {args.distill_steps} distillation steps, {time.time() - t0:.0f} s)\n"
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()

"""Quality benchmark for `vqexport convert`: held-out perplexity vs codebook size, with and without bias
and head-only distillation, on a dense-head model trained the same way as the embedded default model.

    python tools/quality_curve.py [--dense DIR] [--divisors 32,256,64,8] [--clustering auto]
                                  [--distill-steps 300] [--out quality.md] [--json quality.json]

1. the dense-head baseline, trained with tools/train_demo.py's recipe for the embedded model's dense twin
   (same tokenizer, text, sizes and seeds): ``--dense-steps`` at lr 3e-3, then ``--more-steps`` at lr 1e-3
   on the second seed's batches (the demo's "baseline" row: 1200 + 500). With ``--dense DIR`` the
   checkpoint is read from DIR when it exists, else trained once and saved there (so the curve can be
   run in parts). Its held-out perplexity measured as train_demo measures it is printed: the embedded
   model card's "dense head (baseline)" row, when the recipe matches;
2. for K in V/divisor and bias on/off, `vqexport convert` with a distillation text whose last 10% is the
   held-out files (never trained on): perplexity right after conversion and after distillation, the
   clustering method chosen and the held-out perplexity of every candidate;
3. a markdown table (printed, and written to --out) and the raw reports as JSON (--json), both rewritten
   after every conversion, so a run stopped early still reports the rows it finished.
Slow (tens of minutes on 2 cores); a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_demo  # noqa: E402

from vqexport import api  # noqa: E402
from vqexport.artifact import staged_dir  # noqa: E402
from vqexport.checkpoint import demo_dir, save_checkpoint  # noqa: E402
from vqexport.clustering import METHODS  # noqa: E402
from vqexport.config import HeadConfig  # noqa: E402
from vqexport.model import VQLogitsLM, to_tensors  # noqa: E402


def dense_baseline(dense_dir: Path | None, steps: int, more_steps: int, work: Path) -> Path:
    """The dense-head twin of the embedded model (train_demo's recipe), saved as a checkpoint; its path."""
    if dense_dir is not None and (dense_dir / "config.json").is_file():
        print(f"dense baseline: {dense_dir} (reused)", flush=True)
        return dense_dir
    demo = api.load_checkpoint(demo_dir())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo.tokenizer_path))
    train_files, _ = train_demo.corpus_files(24_000_000)
    train_ids = train_demo.encode(tok, train_demo.read(train_files))
    cfg = dataclasses.replace(demo.config, head=HeadConfig(type="dense", bias=True))
    torch.manual_seed(train_demo.SEED)
    dense = VQLogitsLM(cfg)
    t0 = time.time()
    train_demo.train(dense, train_ids, steps, 3e-3, train_demo.SEED, "dense")
    train_demo.train(dense, train_ids, more_steps, 1e-3, train_demo.SEED + 1, "dense")
    card = (f"Dense-head twin of the embedded model: tools/train_demo.py's recipe, {steps} steps at lr 3e-3 then "
            f"{more_steps} at lr 1e-3, trained in {time.time() - t0:.0f} s, torch {torch.__version__}.\n")
    dest = dense_dir if dense_dir is not None else work / "dense"
    with staged_dir(dest) as tmp:
        save_checkpoint(tmp, cfg, to_tensors(dense), tokenizer_path=demo.tokenizer_path, extra_files={"MODEL_CARD.md": card})
    return dest


def demo_perplexity(dense_dir: Path) -> float:
    """The dense model's held-out perplexity measured as train_demo measures it (first 65,536 held-out tokens):
    comparable with the embedded model card's "dense head (baseline)" row when the recipe matches."""
    from tokenizers import Tokenizer

    from vqexport.model import from_tensors

    ckpt = api.load_checkpoint(dense_dir)
    _, held_files = train_demo.corpus_files(24_000_000)
    held_ids = train_demo.encode(Tokenizer.from_file(str(ckpt.tokenizer_path)), train_demo.read(held_files))
    return train_demo.perplexity(from_tensors(ckpt.config, ckpt.tensors), held_ids)


def distill_text(held_bytes: int) -> str:
    """Training text followed by held-out text, 9:1, so convert's last-10% held-out split is the held-out files."""
    train_files, held_files = train_demo.corpus_files(24_000_000)
    held = "".join(train_demo.read(held_files))[:held_bytes]
    return "".join(train_demo.read(train_files))[: 9 * len(held)] + held


def table(rows: list[dict], d: int) -> str:
    methods = sorted({m for r in rows for m in r["clustering_scores"]}, key=lambda m: list(METHODS).index(m))
    lines = ["| K | bias | clustering | dense ppl | VQ ppl converted | change | VQ ppl distilled | change | top-1 agreement | "
             f"head params vs dense | converted ppl by method ({' / '.join(methods)}) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before, after = r["before_distillation"], r["after_distillation"]
        K, V = r["codebook_size"], r["vocab_size"]
        head = K * d + (V if r["bias"] else 0)
        scores = " / ".join(f"{r['clustering_scores'][m]:.1f}" if m in r["clustering_scores"] else "-" for m in methods)
        lines.append(f"| V/{r['divisor']} = {K} | {'yes' if r['bias'] else 'no'} | {r['clustering']} | {before['dense_ppl']:.2f} | "
                     f"{before['vq_ppl']:.2f} | {100 * before['ppl_change']:+.0f}% | {after['vq_ppl']:.2f} | "
                     f"{100 * after['ppl_change']:+.0f}% | {after['top1_agreement']:.3f} | {100 * head / (V * d + V):.1f}% | {scores} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", type=Path, default=None, help="dense baseline checkpoint dir: reused if present, else trained and saved there")
    ap.add_argument("--dense-steps", type=int, default=1200, help="first phase (lr 3e-3), as the embedded model")
    ap.add_argument("--more-steps", type=int, default=500, help="second phase (lr 1e-3), as the embedded model's baseline")
    ap.add_argument("--train-only", action="store_true", help="only train (and save) the dense baseline")
    ap.add_argument("--divisors", default="32,256,64,8", help="K = V / divisor, comma-separated, in the order run")
    ap.add_argument("--bias", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--clustering", default="auto", choices=("auto", "euclidean", "spherical", "balanced"))
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--held-bytes", type=int, default=250_000, help="held-out text (the last 10%% of the distillation text)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="markdown table")
    ap.add_argument("--json", type=Path, default=None, help="every conversion report, with the machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    divisors = [int(s) for s in args.divisors.split(",")]
    biases = {"both": (True, False), "yes": (True,), "no": (False,)}[args.bias]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = dense_baseline(args.dense, args.dense_steps, args.more_steps, tmp)
        if args.train_only:
            return
        cfg = api.load_checkpoint(dense).config
        recipe_ppl = demo_perplexity(dense)
        print(f"dense baseline held-out perplexity, measured as tools/train_demo.py does: {recipe_ppl:.2f}", flush=True)
        (tmp / "text.txt").write_text(distill_text(args.held_bytes), encoding="utf-8")
        V = cfg.vocab_size
        for div in divisors:
            for bias in biases:
                t = time.time()
                r = api.convert(dense, V // div, tmp / f"vq-{div}-{bias}", bias=bias, distill_text=tmp / "text.txt",
                                steps=args.distill_steps, clustering=args.clustering).report
                rows.append(dict(r, divisor=div, vocab_size=V, seconds=round(time.time() - t, 1)))
                print(f"K=V/{div} bias={bias} {r['clustering']}: {r['before_distillation']['vq_ppl']:.2f} -> "
                      f"{r['after_distillation']['vq_ppl']:.2f} (dense {r['after_distillation']['dense_ppl']:.2f}) ({time.time() - t0:.0f}s)", flush=True)
                write(args, rows, cfg.d_model, recipe_ppl, dense, time.time() - t0)  # after every row: a partial run still reports
    print(write(args, rows, cfg.d_model, recipe_ppl, dense, time.time() - t0))


def write(args, rows: list[dict], d: int, recipe_ppl: float, dense: Path, seconds: float) -> str:
    rows = sorted(rows, key=lambda r: (-r["divisor"], not r["bias"]))
    md = table(rows, d) + (
        f"\n\n(dense baseline: held-out ppl {recipe_ppl:.2f} on train_demo's measure; clustering {args.clustering}, "
        f"{args.distill_steps} distillation steps; {seconds:.0f} s with {args.threads} threads on {platform.machine()}, "
        f"torch {torch.__version__})\n")
    if args.out:
        args.out.write_text(md, encoding="utf-8")
    if args.json:
        args.json.write_text(json.dumps({"dense": str(dense), "dense_demo_measure_ppl": recipe_ppl, "clustering": args.clustering,
                                         "distill_steps": args.distill_steps, "threads": args.threads, "seconds": round(seconds, 1),
                                         "rows": rows}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return md


if __name__ == "__main__":
    main()

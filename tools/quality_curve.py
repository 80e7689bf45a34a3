"""Quality benchmark for `vqexport convert`: held-out perplexity vs codebook size, with and without bias
and head-only distillation, on a dense model trained the same way as the embedded default model.

    python tools/quality_curve.py [--dense DIR] [--divisors 32,256,64,8] [--clustering auto]
                                  [--distill-steps 300] [--out quality.md] [--json quality.json]

1. the dense baseline: a Hugging Face model directory made with tools/train_demo.py's functions, as
   ``train_demo.py --dense-only`` makes the embedded model's dense model (byte-level BPE tokenizer trained on
   the train files, then a transformers ``LlamaForCausalLM`` with the same sizes and seeds): ``--dense-steps``
   at lr 3e-3, then ``--more-steps`` at lr 1e-3 on the second seed's batches (1200 + 500, the embedded
   model's recipe). With ``--dense DIR`` the model is read from DIR when DIR/config.json exists, else trained
   once and saved there (so the curve can be run in parts). Its held-out perplexity on the first 65,536
   tokens of the held-out files (train_demo.perplexity) is printed and recorded;
2. for K in V/divisor and bias on/off, ``vqexport.api.convert`` into a temporary directory, with a
   distillation text whose last 10% is the held-out files (never trained on): perplexity right after
   conversion and after distillation, the clustering method chosen and the held-out perplexity of every
   candidate, all from the conversion's report; the head's size from the vq_head.json it wrote;
3. a markdown table (printed, and written to --out) and the raw reports as JSON (--json), both rewritten
   after every conversion, so a run stopped early still reports the rows it finished.
Slow (tens of minutes on 2 cores); a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_demo  # noqa: E402

from vqexport import api  # noqa: E402
from vqexport.artifact import staged_dir  # noqa: E402
from vqexport.convert.clustering import METHODS  # noqa: E402
from vqexport.head.spec import read_head  # noqa: E402


def dense_baseline(dense_dir: Path | None, steps: int, more_steps: int, max_bytes: int, work: Path) -> Path:
    """The embedded model's dense model (train_demo's recipe) as a Hugging Face directory; its path."""
    if dense_dir is not None and (dense_dir / "config.json").is_file():
        try:
            api.load_source(dense_dir, need_head=False)
        except api.VQExportError as e:
            sys.exit(f"dense baseline: cannot reuse {dense_dir} ({e}); delete it or choose another --dense")
        print(f"dense baseline: {dense_dir} (reused)", flush=True)
        return dense_dir
    train_files, _ = train_demo.corpus_files(max_bytes)
    train_text = train_demo.read(train_files)
    dest = dense_dir if dense_dir is not None else work / "dense"
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with staged_dir(dest) as tmp:
        tok = train_demo.train_tokenizer(train_text, tmp)
        train_ids = train_demo.encode(tok, train_text)
        print(f"corpus: {len(train_files)} train files ({len(train_ids)} tokens)", flush=True)
        train_demo.train_dense(tmp, train_ids, steps, more_steps, tok.token_to_id(train_demo.EOT))
        (tmp / "MODEL_CARD.md").write_text(
            f"Dense baseline of tools/quality_curve.py: tools/train_demo.py's recipe (corpus up to {max_bytes} bytes), "
            f"{steps} steps at lr 3e-3 then {more_steps} at lr 1e-3, trained in {time.time() - t0:.0f} s, "
            f"torch {torch.__version__}.\n", encoding="utf-8")
    return dest


def demo_perplexity(dense_dir: Path, max_bytes: int) -> float:
    """The dense model's held-out perplexity on the first 65,536 tokens of the held-out files, measured with
    train_demo.perplexity (transformers' model of the directory, its own tokenizer)."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    source = api.load_source(dense_dir, need_head=False)
    _, held_files = train_demo.corpus_files(max_bytes)
    held_ids = train_demo.encode(Tokenizer.from_file(str(source.tokenizer_path)), train_demo.read(held_files))
    model = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32, local_files_only=True)
    return train_demo.perplexity(model, held_ids)


def distill_text(held_bytes: int, max_bytes: int) -> str:
    """Training text followed by held-out text, 9:1, so convert's last-10% held-out split is the held-out files."""
    train_files, held_files = train_demo.corpus_files(max_bytes)
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
    ap.add_argument("--dense", type=Path, default=None,
                    help="dense baseline model directory: reused if DIR/config.json exists, else trained and saved there")
    ap.add_argument("--dense-steps", type=int, default=1200, help="first phase (lr 3e-3), as the embedded model")
    ap.add_argument("--more-steps", type=int, default=500, help="second phase (lr 1e-3), as the embedded model")
    ap.add_argument("--train-only", action="store_true", help="only train (and save) the dense baseline")
    ap.add_argument("--divisors", default="32,256,64,8", help="K = V / divisor, comma-separated, in the order run")
    ap.add_argument("--bias", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--clustering", default="auto", choices=("auto", *METHODS))
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--held-bytes", type=int, default=250_000, help="held-out text (the last 10%% of the distillation text)")
    ap.add_argument("--max-bytes", type=int, default=24_000_000,
                    help="stdlib source read for training and held-out text (as train_demo.py's --max-bytes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="markdown table")
    ap.add_argument("--json", type=Path, default=None, help="every conversion report, with the machine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # transformers' per-file bars stay out of the benchmark's log
    t0 = time.time()
    divisors = [int(s) for s in args.divisors.split(",")]
    biases = {"both": (True, False), "yes": (True,), "no": (False,)}[args.bias]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = dense_baseline(args.dense, args.dense_steps, args.more_steps, args.max_bytes, tmp)
        if args.train_only:
            return
        V = api.load_source(dense, need_head=False).geometry.vocab_size
        recipe_ppl = demo_perplexity(dense, args.max_bytes)
        print(f"dense baseline held-out perplexity, measured as tools/train_demo.py measures it: {recipe_ppl:.2f}", flush=True)
        (tmp / "text.txt").write_text(distill_text(args.held_bytes, args.max_bytes), encoding="utf-8")
        d = None
        for div in divisors:
            for bias in biases:
                t = time.time()
                with tempfile.TemporaryDirectory(dir=tmp) as conv:
                    out = Path(conv) / "vq"
                    r = api.convert(dense, V // div, out, bias=bias, distill_text=tmp / "text.txt",
                                    steps=args.distill_steps, clustering=args.clustering).report
                    head = read_head(out).config
                d = head.hidden_size
                rows.append(dict(r, divisor=div, vocab_size=head.vocab_size, seconds=round(time.time() - t, 1)))
                print(f"K=V/{div} bias={bias} {r['clustering']}: {r['before_distillation']['vq_ppl']:.2f} -> "
                      f"{r['after_distillation']['vq_ppl']:.2f} (dense {r['after_distillation']['dense_ppl']:.2f}) ({time.time() - t0:.0f}s)", flush=True)
                write(args, rows, d, recipe_ppl, dense, time.time() - t0)  # after every row: a partial run still reports
    print(write(args, rows, d, recipe_ppl, dense, time.time() - t0))


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

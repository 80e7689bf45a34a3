"""Quality benchmark for the rank-r correction: held-out perplexity change vs head-parameter fraction for
K in {V/64, V/32, V/8} x r in {0, 4, 8, 16, 32}, head-only distillation, on two dense-head models:

* ``demo``: the embedded default model's dense twin (tools/train_demo.py's recipe: tokenizer, text, sizes, seed);
* ``gpt2``: a small GPT-2-family model (LayerNorm, learned positions, tanh-GELU, linear biases) on the same
  tokenizer and text.

    python tools/lowrank_curve.py [--models demo,gpt2] [--dense-steps 1700] [--distill-steps 300] \
        [--work DIR] [--out-dir DIR]

Trained dense checkpoints are kept in --work and reused by later runs. Writes lowrank_quality.md, .json and
.png (matplotlib) into --out-dir. Slow (tens of minutes on 2 cores); a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
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

GPT2_ARCH = dict(norm="layernorm", position="learned", mlp="gelu_tanh", linear_bias=True, qkv_bias=True, d_ff=512)


def dense_checkpoint(name: str, work: Path, steps: int, train_ids, demo, device: str = "cpu") -> Path:
    out = work / f"dense-{name}-{steps}"
    if (out / "model.safetensors").is_file():
        print(f"[{name}] reusing {out}", flush=True)
        return out
    torch.manual_seed(train_demo.SEED)
    cfg = dataclasses.replace(demo.config, head=HeadConfig(type="dense", bias=True))
    if name == "gpt2":
        cfg = dataclasses.replace(cfg, **GPT2_ARCH)
    model = VQLogitsLM(cfg)
    if device != "cpu":  # the same recipe, batches moved to the accelerator
        plain = train_demo.batches
        train_demo.batches = lambda data, gen: ((x.to(device), y.to(device)) for x, y in plain(data, gen))
        model.to(device)
    train_demo.train(model, train_ids, steps, 3e-3, train_demo.SEED, name)
    model.cpu()
    save_checkpoint(out, cfg, to_tensors(model), tokenizer_path=demo.tokenizer_path)
    return out


def head_fraction(V: int, d: int, K: int, r: int) -> float:
    return (K * d + V + r * (V + d)) / (V * d + V)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["model"] for r in rows}), figsize=(11, 4.2), squeeze=False)
    for ax, model in zip(axes[0], sorted({r["model"] for r in rows})):
        for div in sorted({r["div"] for r in rows}, reverse=True):
            pts = sorted((r["head_fraction"], r["ppl_change"], r["rank"]) for r in rows if r["model"] == model and r["div"] == div)
            ax.plot([100 * p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=f"K = V/{div}")
            for x, y, rk in pts:
                ax.annotate(f"r={rk}", (100 * x, 100 * y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.axhline(4, color="grey", linestyle="--", linewidth=0.8)
        ax.axvline(10, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xlabel("head parameters, % of the dense head")
        ax.set_ylabel("held-out perplexity change vs dense, %")
        ax.set_yscale("log")
        ax.set_title(f"{model}: head-only distillation")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,gpt2")
    ap.add_argument("--dense-steps", type=int, default=1700, help="the demo recipe: 1200 + 500")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--divs", default="64,32,8")
    ap.add_argument("--ranks", default="0,4,8,16,32")
    ap.add_argument("--held-bytes", type=int, default=250_000)
    ap.add_argument("--work", type=Path, default=Path("build/lowrank-work"))
    ap.add_argument("--out-dir", type=Path, default=Path("build/lowrank-quality"))
    ap.add_argument("--corpus", type=Path, default=None,
                    help="JSON {train: [texts], held: [texts]} to use instead of this interpreter's stdlib sources "
                         "(so a run on another machine sees the same text)")
    ap.add_argument("--dump-corpus", type=Path, default=None, help="write that JSON from this machine's stdlib and exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-device", default="cpu", help="torch device for training the dense baselines (e.g. cuda)")
    ap.add_argument("--report-only", action="store_true", help="only write the table and plot from --out-dir's JSON")
    args = ap.parse_args()
    if args.report_only:
        report(json.loads((args.out_dir / "lowrank_quality.json").read_text()), args, None)
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    demo = api.load_checkpoint(demo_dir())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(demo.tokenizer_path))
    if args.corpus is not None:
        corpus = json.loads(args.corpus.read_text(encoding="utf-8"))
        train_text, held_text = corpus["train"], corpus["held"]
    else:
        train_files, held_files = train_demo.corpus_files(24_000_000)
        train_text, held_text = train_demo.read(train_files), train_demo.read(held_files)
    if args.dump_corpus is not None:
        args.dump_corpus.write_text(json.dumps({"train": train_text, "held": held_text}), encoding="utf-8")
        return
    train_ids = train_demo.encode(tok, train_text)
    held = "".join(held_text)[: args.held_bytes]
    text = args.work / "distill.txt"  # convert holds out the last 10%: the held-out files
    text.write_text("".join(train_text)[: 9 * len(held)] + held, encoding="utf-8")
    V, d = demo.config.vocab_size, demo.config.d_model
    json_path = args.out_dir / "lowrank_quality.json"
    rows = json.loads(json_path.read_text()) if json_path.is_file() else []  # a later run resumes
    done = {(r["model"], r["div"], r["rank"]) for r in rows}
    for model in args.models.split(","):
        src = dense_checkpoint(model, args.work, args.dense_steps, train_ids, demo, args.train_device)
        for div in map(int, args.divs.split(",")):
            for rank in map(int, args.ranks.split(",")):
                if (model, div, rank) in done:
                    continue
                K = V // div
                out = args.work / f"vq-{model}-{div}-{rank}"
                if out.exists():
                    import shutil

                    shutil.rmtree(out)
                t1 = time.time()
                rep = api.convert(src, K, out, bias=True, distill_text=text, steps=args.distill_steps,
                                  clustering="euclidean", rank=rank).report
                after = rep["after_distillation"]
                rows.append({"model": model, "div": div, "K": K, "rank": rank, "dense_ppl": after["dense_ppl"],
                             "vq_ppl": after["vq_ppl"], "ppl_change": after["ppl_change"],
                             "ppl_change_before_distillation": rep["before_distillation"]["ppl_change"],
                             "top1_agreement": after["top1_agreement"], "head_fraction": head_fraction(V, d, K, rank),
                             "seconds": time.time() - t1})
                print(json.dumps(rows[-1]), f"({time.time() - t0:.0f}s)", flush=True)
                json_path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    report(rows, args, time.time() - t0)


def report(rows: list[dict], args, seconds: float | None) -> None:
    lines = ["| model | K | r | head params vs dense | fewer head params | dense ppl | VQ ppl | change (distilled) | "
             "change (converted) | top-1 agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | V/{r['div']} = {r['K']} | {r['rank']} | {100 * r['head_fraction']:.1f}% | "
              f"{100 * (1 - r['head_fraction']):.1f}% | {r['dense_ppl']:.2f} | {r['vq_ppl']:.2f} | {100 * r['ppl_change']:+.1f}% | "
              f"{100 * r['ppl_change_before_distillation']:+.1f}% | {r['top1_agreement']:.3f} |" for r in rows]
    table = "\n".join(lines) + (f"\n\n({args.dense_steps} dense steps, {args.distill_steps} head-only distillation steps"
                                + (f", {seconds:.0f} s" if seconds is not None else "") + ")\n")
    (args.out_dir / "lowrank_quality.md").write_text(table, encoding="utf-8")
    try:
        plot(rows, args.out_dir / "lowrank_quality.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib; then --report-only)")
    print(table)


if __name__ == "__main__":
    main()

r"""Quality benchmark for the rank-r correction: held-out perplexity change vs head-parameter fraction for
K in {V/64, V/32, V/8} x r in {0, 4, 8, 16, 32}, head-only distillation, on two dense models:

* ``demo``: the embedded default model's dense model, a transformers ``LlamaForCausalLM`` made with
  tools/train_demo.py's functions (its tokenizer, text, sizes and seed; train_demo.train_dense);
* ``gpt2``: a transformers ``GPT2LMHeadModel`` of the same sizes (LayerNorm, learned positions, tanh-GELU,
  linear biases, feed-forward 512, no dropout) on the same tokenizer and text, trained by train_demo.train.

    python tools/lowrank_curve.py [--models demo,gpt2] [--dense-steps 1700] [--anneal-steps 0] \
        [--distill-steps 300] [--work DIR] [--out-dir DIR]

Each dense model is trained ``--dense-steps`` at lr 3e-3 (then ``--anneal-steps`` at lr 1e-3; none by
default), with a byte-level BPE tokenizer (train_demo.train_tokenizer) trained on the train text, and saved
as a Hugging Face model directory in --work (dense-<model>-<steps>[+<anneal>]-<digest of the training text>),
which later runs on the same text reuse.
Every row is one ``vqexport.api.convert`` (bias on, euclidean clustering, --distill-steps of head-only
distillation on a text whose last 10% is the held-out files) into a temporary directory; its figures come
from the conversion's report and the head's size from the vq_head.json it wrote. Writes lowrank_quality.md,
.json (rewritten after every row; a later run resumes from it) and .png (when matplotlib is installed) into
--out-dir.
Slow (tens of minutes on 2 cores); a benchmark, never a test.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
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
from vqexport.head.spec import read_head  # noqa: E402

MODELS = ("demo", "gpt2")


def gpt2_config(eot: int):
    """GPT-2's architecture at train_demo.train_dense's sizes (V 8192, d 128, 3 layers, 4 heads, tied embeddings)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=train_demo.VOCAB, n_embd=128, n_layer=3, n_head=4, n_inner=512, n_positions=2048,
                      activation_function="gelu_new", layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
                      attn_pdrop=0.0, tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)


@contextlib.contextmanager
def training_on(device: str):
    """train_demo's trainer for this benchmark: with a device other than the CPU, each phase runs there (the same
    recipe, batches moved to the accelerator; the model comes back to the CPU afterwards)."""
    plain_train, plain_batches = train_demo.train, train_demo.batches

    def train(model, data, steps, *rest):
        model.to(device)
        try:
            plain_train(model, data, steps, *rest)
        finally:
            model.cpu()

    train_demo.train = train
    if device != "cpu":
        train_demo.batches = lambda data, gen: ((x.to(device), y.to(device)) for x, y in plain_batches(data, gen))
    try:
        yield
    finally:
        train_demo.train, train_demo.batches = plain_train, plain_batches


class Tokens:
    """The tokenizer trained on the train text and the encoded train text, made once, when a model needs training."""

    def __init__(self, train_text: list[str], work: Path):
        self.train_text, self.work, self.dir, self.ids = train_text, work, None, None

    def get(self):
        if self.dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix="tokenizer-", dir=self.work))
            tok = train_demo.train_tokenizer(self.train_text, self.dir)
            self.ids, self.eot = train_demo.encode(tok, self.train_text), tok.token_to_id(train_demo.EOT)
            print(f"tokenizer: {tok.get_vocab_size()} tokens; train text {len(self.ids)} tokens", flush=True)
        return self.dir, self.ids, self.eot

    def digest(self) -> str:
        """A short digest of the training text (the files' texts in order)."""
        h = hashlib.sha256()
        for t in self.train_text:
            h.update(t.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()[:12]

    def close(self) -> None:
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


def dense_model(name: str, work: Path, steps: int, anneal: int, tokens: Tokens, device: str = "cpu") -> Path:
    """The dense model ``name`` as a Hugging Face directory in ``work`` (reused when present); its path. The
    directory is named by the model, its steps and a digest of the training text, so that a run on other text
    (another ``--max-bytes`` or ``--corpus``) trains its own model instead of reusing one trained on different text."""
    from vqexport.artifact import staged_dir

    out = work / (f"dense-{name}-{steps}" + (f"+{anneal}" if anneal else "") + f"-{tokens.digest()}")
    if (out / "model.safetensors").is_file():
        try:
            api.load_source(out, need_head=False)
        except api.VQExportError as e:
            sys.exit(f"[{name}] cannot reuse {out} ({e}); delete it or choose another --work")
        print(f"[{name}] reusing {out}", flush=True)
        return out
    tok_dir, ids, eot = tokens.get()
    with staged_dir(out) as tmp, training_on(device):
        for f in tok_dir.iterdir():
            shutil.copyfile(f, tmp / f.name)
        if name == "demo":
            train_demo.train_dense(tmp, ids, steps, anneal, eot)
        else:
            from transformers import GPT2LMHeadModel

            torch.manual_seed(train_demo.SEED)
            model = GPT2LMHeadModel(gpt2_config(eot))
            train_demo.train(model, ids, steps, 3e-3, train_demo.SEED, name)
            train_demo.train(model, ids, anneal, 1e-3, train_demo.SEED + 1, f"{name}, anneal")
            model.eval()
            model.save_pretrained(str(tmp))
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
    ap.add_argument("--models", default="demo,gpt2", help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--dense-steps", type=int, default=1700,
                    help="dense training steps at lr 3e-3 (the demo recipe's 1200 + 500 in one phase)")
    ap.add_argument("--anneal-steps", type=int, default=0, help="then this many at lr 1e-3 (train_demo.py's --anneal-steps)")
    ap.add_argument("--distill-steps", type=int, default=300)
    ap.add_argument("--divs", default="64,32,8", help="K = V / div, comma-separated")
    ap.add_argument("--ranks", default="0,4,8,16,32", help="r of the rank-r correction, comma-separated")
    ap.add_argument("--held-bytes", type=int, default=250_000, help="held-out text (the last 10%% of the distillation text)")
    ap.add_argument("--max-bytes", type=int, default=24_000_000,
                    help="stdlib source read for training and held-out text without --corpus (as train_demo.py's --max-bytes)")
    ap.add_argument("--work", type=Path, default=Path("build/lowrank-work"),
                    help="trained dense models (reused by later runs) and the distillation text")
    ap.add_argument("--out-dir", type=Path, default=Path("build/lowrank-quality"))
    ap.add_argument("--corpus", type=Path, default=None,
                    help="JSON {train: [texts], held: [texts]} to use instead of this interpreter's stdlib sources "
                         "(so a run on another machine sees the same text)")
    ap.add_argument("--dump-corpus", type=Path, default=None, help="write that JSON from this machine's stdlib and exit")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-device", default="cpu", help="torch device for training the dense baselines (e.g. cuda)")
    ap.add_argument("--report-only", action="store_true", help="only write the table and plot from --out-dir's JSON")
    args = ap.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    if args.report_only:
        report(json.loads((args.out_dir / "lowrank_quality.json").read_text()), args, None)
        return
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # transformers' per-file bars stay out of the benchmark's log
    t0 = time.time()

    if args.corpus is not None:
        corpus = json.loads(args.corpus.read_text(encoding="utf-8"))
        train_text, held_text = corpus["train"], corpus["held"]
    else:
        train_files, held_files = train_demo.corpus_files(args.max_bytes)
        train_text, held_text = train_demo.read(train_files), train_demo.read(held_files)
    if args.dump_corpus is not None:
        args.dump_corpus.write_text(json.dumps({"train": train_text, "held": held_text}), encoding="utf-8")
        return
    args.work.mkdir(parents=True, exist_ok=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    held = "".join(held_text)[: args.held_bytes]
    text = args.work / "distill.txt"  # convert holds out the last 10%: the held-out files
    text.write_text("".join(train_text)[: 9 * len(held)] + held, encoding="utf-8")
    json_path = args.out_dir / "lowrank_quality.json"
    rows = json.loads(json_path.read_text()) if json_path.is_file() else []  # a later run resumes
    done = {(r["model"], r["div"], r["rank"]) for r in rows}
    tokens = Tokens(train_text, args.work)
    try:
        for model in models:
            src = dense_model(model, args.work, args.dense_steps, args.anneal_steps, tokens, args.train_device)
            V = api.load_source(src, need_head=False).geometry.vocab_size
            for div in map(int, args.divs.split(",")):
                for rank in map(int, args.ranks.split(",")):
                    if (model, div, rank) in done:
                        continue
                    t1 = time.time()
                    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
                        out = Path(tmp) / "vq"
                        rep = api.convert(src, V // div, out, bias=True, distill_text=text, steps=args.distill_steps,
                                          clustering="euclidean", rank=rank).report
                        head = read_head(out).config
                    after = rep["after_distillation"]
                    rows.append({"model": model, "div": div, "K": head.codebook_size, "rank": head.rank,
                                 "dense_ppl": after["dense_ppl"], "vq_ppl": after["vq_ppl"], "ppl_change": after["ppl_change"],
                                 "ppl_change_before_distillation": rep["before_distillation"]["ppl_change"],
                                 "top1_agreement": after["top1_agreement"],
                                 "head_fraction": head_fraction(head.vocab_size, head.hidden_size, head.codebook_size, head.rank),
                                 "lowrank_init": rep["lowrank_init"], "seconds": time.time() - t1})
                    print(json.dumps(rows[-1]), f"({time.time() - t0:.0f}s)", flush=True)
                    json_path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    finally:
        tokens.close()
    report(rows, args, time.time() - t0)


def report(rows: list[dict], args, seconds: float | None) -> None:
    lines = ["| model | K | r | head params vs dense | fewer head params | dense ppl | VQ ppl | change (distilled) | "
             "change (converted) | top-1 agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | V/{r['div']} = {r['K']} | {r['rank']} | {100 * r['head_fraction']:.1f}% | "
              f"{100 * (1 - r['head_fraction']):.1f}% | {r['dense_ppl']:.2f} | {r['vq_ppl']:.2f} | {100 * r['ppl_change']:+.1f}% | "
              f"{100 * r['ppl_change_before_distillation']:+.1f}% | {r['top1_agreement']:.3f} |" for r in rows]
    steps = f"{args.dense_steps} + {args.anneal_steps}" if args.anneal_steps else f"{args.dense_steps}"
    table = "\n".join(lines) + (f"\n\n({steps} dense steps, {args.distill_steps} head-only distillation steps"
                                + (f", {seconds:.0f} s" if seconds is not None else "") + ")\n")
    (args.out_dir / "lowrank_quality.md").write_text(table, encoding="utf-8")
    try:
        plot(rows, args.out_dir / "lowrank_quality.png")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib; then --report-only)")
    print(table)


if __name__ == "__main__":
    main()

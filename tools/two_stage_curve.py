"""Quality and speed of the two-stage head against the number of probed clusters P.

    python tools/two_stage_curve.py [--model demo|gpt2|DIR] [--codebook-size K] [--probes 8,16,32,64]
                                   [--speed-shape qwen2.5-0.5b] [--work build/two-stage-work] [--out benchmarks/two_stage]

Quality, on a model this repository trains and held-out text. ``--model``: ``demo``, the embedded model's dense
layer (the default); ``gpt2``, the GPT-2-architecture twin of tools/lowrank_curve.py (V = 8,192, d = 128, 3 layers,
tied embeddings, trained here by that tool's recipe, 1,700 steps; kept in ``--work`` and reused by later runs on the
same text); or a dense (or VQ) Hugging Face model directory.

1. the distillation text is tools/train_demo.py's (training files, then the held-out files as the last tenth);
2. ``vqexport convert --head two-stage`` in three variants: training-free (``--steps 0``: equal-size clusters in
   the hidden states' metric, ranked by codebook score, bias from the mean hidden state), the default (the router
   fitted on the text), and the default with a rank-16 tail correction (``--rank 16``); recall curves and
   recommended P are in the reports;
3. for every variant and P, ``vqexport fidelity`` on the held-out files alone: perplexity dense vs two-stage, top-1
   agreement, the share of positions whose dense argmax fell inside the probed clusters, KL, and the same with
   ideal routing (the P clusters holding the most dense probability probed: what the variant's tail allows, with
   any router); and the plain VQ head's (P = 0).

Speed, at a real head shape (random weights, the head alone, batch 1, one decode step, ONNX Runtime with this
machine's threads): the dense head as fp32 MatMul and as int4 / int8 MatMulNBits, and the two-stage head (int4
codebook, K = V/16 clusters of 16) at every P with int8 rows (laid out by cluster, MatMulInteger).

Writes <out>.md (table), <out>.json and <out>.png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_demo  # noqa: E402

from vqexport import api  # noqa: E402


def texts(max_bytes: int, work: Path) -> tuple[Path, Path]:
    """(distillation text: training files then the held-out files as its last tenth, the held-out files alone)."""
    train_files, held_files = train_demo.corpus_files(max_bytes)
    train_text, held_text = train_demo.read(train_files), train_demo.read(held_files)
    distill, held_only = work / "distill.txt", work / "held.txt"
    distill.write_text(train_demo.distill_text(train_text, held_text), encoding="utf-8")
    held_only.write_text(f"\n{train_demo.EOT}\n".join(held_text), encoding="utf-8")
    return distill, held_only


GPT2_STEPS = 1700  # tools/lowrank_curve.py's --dense-steps default
MODEL_NAMES = {"demo": "demo, the embedded model's dense layer (a transformers Llama, d = 128, 3 layers)",
               "gpt2": f"gpt2, the GPT-2-architecture twin of tools/lowrank_curve.py (d = 128, 3 layers, {GPT2_STEPS:,} steps)"}


def model_path(model: str, max_bytes: int, work: Path) -> str:
    """``model`` as resolve_source takes it; ``gpt2`` is trained into ``work`` first (or reused from there)."""
    if model != "gpt2":
        return model
    import lowrank_curve

    tokens = lowrank_curve.Tokens(train_demo.read(train_demo.corpus_files(max_bytes)[0]), work)
    try:
        return str(lowrank_curve.dense_model("gpt2", work, GPT2_STEPS, 0, tokens))
    finally:
        tokens.close()


def quality(model: str, k: int | None, probes: list[int], max_bytes: int, work: Path, trained: Path) -> dict:
    from vqexport.source import resolve_source

    source = resolve_source(model_path(model, max_bytes, trained), need_head=False)
    V = source.geometry.vocab_size
    k = k or V // 16
    distill, held = texts(max_bytes, work)
    t0 = time.time()
    rows = [{"variant": "plain VQ head", "probes": 0, **api.convert(
        source.path, k, work / "vq", distill_text=distill, clustering="equal-spherical", steps=0, seed=0).report["before_distillation"]}]
    rows[0]["label"] = "plain VQ head, same clusters"
    recommended, curves = {}, {}
    for variant, options in VARIANTS.items():
        out = work / variant.replace(" ", "_")
        conv = api.convert(source.path, k, out, distill_text=distill, head="two-stage", seed=0, **options)
        recommended[variant], curves[variant] = conv.report["probes_recommended"], conv.report["recall_curve"]
        for p in probes:
            r = api.fidelity(out, held, probes=min(p, k))
            rows.append({"variant": variant, "label": f"{variant}, P = {p}", **r})
            print(f"{variant}, P = {p}: ppl {r['vq_ppl']:.3f} ({100 * r['ppl_change']:+.2f}%), top-1 {r['top1_agreement']:.4f}, "
                  f"recall {r['probe_recall']:.4f}; ideal routing {100 * r['ideal_routing_ppl_change']:+.2f}%, "
                  f"top-1 {r['ideal_routing_top1_agreement']:.4f}", flush=True)
    cap = conv.report["cluster_size"]
    for r in rows:
        r["scored"] = k + r["probes"] * cap
        r["scored_share"] = r["scored"] / V
    return {"model": MODEL_NAMES.get(model, model), "vocab_size": V, "codebook_size": k, "cluster_size": cap, "rows": rows,
            "recommended_probes": recommended, "recall_curves": curves, "seconds": time.time() - t0}


VARIANTS = {"training-free": {"steps": 0}, "router fitted": {}, "router fitted + rank 16": {"rank": 16}}


def speed(shape: str, probes_share: list[float], threads: int, seconds: float) -> dict:
    """Head-alone latency at a real shape: dense forms and the two-stage head at P = share * K."""
    import onnxruntime as ort

    from vqexport.backends.ort.session import session_options
    from vqexport.bench.head import SHAPES, _dense_nbits, _head
    from vqexport.bench.timing import machine, time_calls
    from vqexport.head.spec import make_head

    V, d, _ = SHAPES[shape]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((V, d), dtype=np.float32) * d**-0.5
    K, cap = V // 16, -(-V // (V // 16))
    table = np.full(K * cap, -1, np.int32)
    table[:V] = rng.permutation(V)
    table = table.reshape(cap, K).T.copy()
    c = rng.standard_normal((K, d), dtype=np.float32) * d**-0.5
    h = rng.standard_normal((1, 1, d), dtype=np.float32)
    from onnx import TensorProto, helper, numpy_helper

    dense = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["h", "w_t"], ["logits"])], "dense", [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, d])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, V])], [numpy_helper.from_array(np.ascontiguousarray(w.T), "w_t")]),
        opset_imports=[helper.make_opsetid("", 18)])
    graphs = {"dense fp32": dense, "dense int4 (MatMulNBits)": _dense_nbits(w, 4), "dense int8 (MatMulNBits)": _dense_nbits(w, 8)}
    for share in probes_share:
        P = max(1, int(round(K * share)))
        head = make_head({"codebook": c, "members": table, "bias": rng.standard_normal(V, dtype=np.float32)}, probes=P)
        graphs[f"two-stage P = {P} (K/{round(1 / share)})"] = _head(head, codebook="int4", int8_encoding="native", rows="int8", w=w)
    out = {}
    for name, proto in graphs.items():
        sess = ort.InferenceSession(proto.SerializeToString(), session_options("all", threads), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in sess.get_outputs()]
        out[name] = float(np.median(time_calls(lambda s=sess: s.run(outputs, {"h": h}), min_seconds=seconds))) * 1e3
        print(f"{shape} {name}: {out[name]:.3f} ms", flush=True)
    return {"shape": shape, "V": V, "d": d, "K": K, "cluster_size": cap, "threads": threads, "ms": out, "machine": machine()}


def table(result: dict) -> str:
    q = result["quality"]
    lines = ["# Two-stage head: quality and speed against the probes P", "",
             f"Quality: {q['model']}; V = {q['vocab_size']}, K = {q['codebook_size']} equal clusters of {q['cluster_size']}; "
             "converted with `vqexport convert --head two-stage` (training-free: `--steps 0`; router fitted: the default; "
             "+ rank 16: `--rank 16`), measured by `vqexport fidelity` on the held-out files of tools/train_demo.py's corpus. "
             "Recommended P (99.5% recall on the converter's held-out tenth): "
             + ", ".join(f"{v} {p}" for v, p in q["recommended_probes"].items()) + ".", "",
             "| head | logits computed per position | perplexity | vs dense | top-1 agreement | dense argmax in probed clusters | KL (nats/token) | ideal routing: vs dense, top-1 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in q["rows"]:
        ideal = (f"{100 * r['ideal_routing_ppl_change']:+.2f}%, {r['ideal_routing_top1_agreement']:.4f}"
                 if "ideal_routing_ppl_change" in r else "-")
        lines.append(f"| {r['label']} | {r['scored']:,} ({100 * r['scored_share']:.1f}% of V) | {r['vq_ppl']:.3f} | "
                     f"{100 * r['ppl_change']:+.2f}% | {r['top1_agreement']:.4f} | {r.get('probe_recall', float('nan')):.4f} | "
                     f"{r['kl_to_dense']:.5f} | {ideal} |")
    lines.append("\nIdeal routing: the same head probing the P clusters that hold the most dense probability instead of its "
                 "router's choice (no router sees the dense logits; about the best any router could do with the head's tail).")
    lines.append(f"\n(dense perplexity {q['rows'][1]['dense_ppl']:.3f} on {q['rows'][1]['tokens']:,} held-out tokens)")
    s = result.get("speed")
    if s:
        m = s["machine"]
        lines += ["", f"Speed: the head alone at the {s['shape']} shape (V = {s['V']}, d = {s['d']}; two-stage: int4 codebook, "
                      f"K = {s['K']} clusters of {s['cluster_size']}, int8 rows), batch 1, one decode step, ONNX Runtime, "
                      f"{s['threads']} threads on {m['cpu']}:", "", "| head | ms | vs dense int4 |", "|---|---|---|"]
        base = s["ms"]["dense int4 (MatMulNBits)"]
        lines += [f"| {name} | {ms:.3f} | {base / ms:.2f}x |" for name, ms in _speed_rows(s).items()]
    return "\n".join(lines) + "\n"


def _probes(row: str) -> int:
    return int(row.split("=")[1].split()[0])  # "two-stage P = 594 (K/16)" -> 594


def _speed_rows(speed: dict) -> dict:
    """The speed rows in reading order, also when read back from JSON (whose keys are sorted as text): the dense
    heads, then the two-stage head by P."""
    ms = speed["ms"]
    return {n: ms[n] for n in sorted(ms, key=lambda n: (n.startswith("two-stage"), _probes(n) if n.startswith("two-stage") else 0))}


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3 if result.get("speed") else 2, figsize=(14, 4))
    for variant in VARIANTS:
        rows = [r for r in result["quality"]["rows"] if r["probes"] and r["variant"] == variant]
        ps = [r["probes"] for r in rows]
        line = axes[0].plot(ps, [100 * r["ppl_change"] for r in rows], "o-", label=variant)[0]
        axes[0].plot(ps, [100 * r["ideal_routing_ppl_change"] for r in rows], ":", c=line.get_color(),
                     label=f"{variant}: ideal routing")
        axes[1].plot(ps, [r["top1_agreement"] for r in rows], "o-", label=f"{variant}: top-1")
    axes[0].axhline(0.5, ls="--", c="grey")
    axes[0].set(xscale="log", yscale="log", xlabel="probes P", ylabel="perplexity vs dense (%)", title="perplexity")
    axes[0].legend(fontsize=7)
    axes[1].axhline(0.995, ls="--", c="grey")
    axes[1].set(xscale="log", xlabel="probes P", title="agreement with the dense head")
    axes[1].legend()
    s = result.get("speed")
    if s:
        two = {_probes(n): ms for n, ms in _speed_rows(s).items() if n.startswith("two-stage")}
        axes[2].plot(list(two), [1e3 / ms for ms in two.values()], "o-", label="two-stage")
        for name in ("dense int4 (MatMulNBits)", "dense int8 (MatMulNBits)"):
            axes[2].axhline(1e3 / s["ms"][name], ls="--", c="grey" if "int4" in name else "black", label=name)
        axes[2].set(xscale="log", xlabel=f"probes P at the {s['shape']} shape", ylabel="head calls / s", title="speed (head alone)")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="'demo', 'gpt2' (trained into --work) or a dense (or VQ) Hugging Face model directory")
    ap.add_argument("--work", type=Path, default=Path("build/two-stage-work"), help="where --model gpt2 is trained and kept")
    ap.add_argument("--codebook-size", type=int, default=None, help="K (default V/16: clusters of 16)")
    ap.add_argument("--probes", default="8,16,32,64")
    ap.add_argument("--max-bytes", type=int, default=24_000_000, help="of the standard library's source (train_demo's corpus)")
    ap.add_argument("--speed-shape", default="qwen2.5-0.5b", help="head shape for the speed rows ('' to skip)")
    ap.add_argument("--speed-probes", default="0.015625,0.03125,0.0625,0.125", help="P as shares of K for the speed rows")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks" / "two_stage")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        result = {"quality": quality(args.model, args.codebook_size, [int(p) for p in args.probes.split(",")], args.max_bytes, Path(tmp),
                                     args.work)}
    if args.speed_shape:
        result["speed"] = speed(args.speed_shape, [float(x) for x in args.speed_probes.split(",")], args.threads, args.seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    args.out.with_suffix(".md").write_text(table(result), encoding="utf-8")
    plot(result, args.out.with_suffix(".png"))
    print(table(result))


if __name__ == "__main__":
    main()

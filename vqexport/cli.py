"""Command line: parses arguments and calls the public Python API (vqexport.api); nothing more."""

from __future__ import annotations

import errno
import json
import math
import sys

import click

from . import __version__
from .errors import ParityError, VQExportError


def escape(text: str) -> str:
    """``text`` shown as it is in a rich line with markup (a "[parity]" in it is not a style tag)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


def _console(stderr=True):
    """A rich console; into a file or a pipe it wraps no line (rich would wrap at 80 columns there) unless COLUMNS
    says how wide."""
    import os

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    unwrapped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, highlight=False, **({"width": 200, "soft_wrap": True} if unwrapped else {}))


def _clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _print_json(obj) -> None:
    click.echo(json.dumps(_clean(obj), indent=2, sort_keys=True))


# --seed: numpy's default_rng and torch's manual_seed both take any integer in this range
_SEED = click.IntRange(0, 2**63 - 1)


class _UsageError(click.ClickException):
    """A click usage error as one line on stderr, exit 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def _one_line(e: click.UsageError) -> click.ClickException:
    """``error: <click's message> (see 'vqexport <command> --help')``; a bare ``vqexport`` still prints the help."""
    if isinstance(e, getattr(click.exceptions, "NoArgsIsHelpError", ())):
        return e
    names, ctx = [], e.ctx
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name)
        ctx = ctx.parent
    command = " ".join(["vqexport", *reversed(names)])
    return _UsageError(f"{' '.join(e.format_message().split())} (see '{command} --help')")


def _out_of_space(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(e) for text in ("No space left on device", "Disk quota exceeded"))


class _Group(click.Group):
    """Turns user errors (usage errors included) into one line + exit 2, parity failures into exit 1."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise _one_line(e) from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            raise _one_line(e) from None
        except VQExportError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except ParityError as e:
            if e.report is not None and ctx.meta.get("json"):
                _print_json(e.report.to_dict())
            elif e.report is not None:
                _parity_table(e.report)
            click.echo(f"parity FAILED {e}", err=True)
            ctx.exit(1)
        except Exception as e:  # a full disk, whichever library was writing (Python, safetensors, ONNX Runtime)
            if not _out_of_space(e):
                raise
            where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
            click.echo(f"error: no space left on the device{where}: free some, or write elsewhere", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


class _Live:
    """Live progress on stderr (with --json too: stdout keeps its one JSON object); silent when stderr is not a
    terminal, where a redrawn status line would only litter logs."""

    def __init__(self, make):
        self.widget = make() if sys.stderr.isatty() else None

    def __enter__(self):
        if self.widget:
            self.widget.__enter__()
        return self

    def __exit__(self, *exc):
        if self.widget:
            self.widget.__exit__(*exc)


class _Progress(_Live):
    """One status line naming the current stage."""

    def __init__(self):
        super().__init__(lambda: _console().status("starting"))

    def __call__(self, stage: str) -> None:
        if self.widget:
            self.widget.update(stage)


class _Bar(_Live):
    """A progress bar for long benchmarks."""

    def __init__(self):
        from rich.progress import Progress

        super().__init__(lambda: Progress(console=_console(), transient=True))
        self.task = None

    def __call__(self, label: str, done: int, total: int) -> None:
        if not self.widget:
            return
        if self.task is None:
            self.task = self.widget.add_task(label, total=total)
        self.widget.update(self.task, completed=done, total=total, description=label)  # each stage its own total


_RUNTIMES = {"ort": "onnxruntime", "openvino": "OpenVINO", "trt": "TensorRT"}


def _runtime_name(r) -> str:
    """The runtime a bench --artifact result was measured with."""
    return _RUNTIMES.get(r["backend"], r["backend"])


def _artifact_table(r) -> None:
    from rich.table import Table

    c = _console(stderr=False)
    m = r["machine"]
    c.print(f"{escape(str(r['artifact']))} ({escape(str(r['target']))}) on {escape(m['cpu'])}; prompt {r['prompt_length']} tokens, {r['tokens']} decode tokens timed; "
            f"medians of {r['repeats']} fresh runs")
    t = Table(title=f"end-to-end latency ({_runtime_name(r)})")
    cols = ["metric", "vq-logits"] + (["dense twin", "vq gain (>1: vq better)"] if "dense" in r else [])
    for col in cols:
        t.add_column(col, justify="right" if col != "metric" else "left")
    rows = [("time to first token (ms)", "ttft_ms", "ttft"), ("decode p50 (ms)", "decode_ms_p50", "decode_p50"),
            ("decode p90 (ms)", "decode_ms_p90", None), ("decode p99 (ms)", "decode_ms_p99", None),
            ("tokens/s", "tokens_per_s", "tokens_per_s"), ("peak RSS (MB)", "peak_rss_mb", "peak_rss"),
            ("RSS added by the session (MB)", "session_rss_mb", "session_rss"),
            ("model bytes", "model_bytes", "model_bytes")]
    for label, key, ratio in rows:
        cells = [label, f"{r['vq'][key]:,.3f}" if isinstance(r["vq"][key], float) else f"{r['vq'][key]:,}"]
        if "dense" in r:
            d = r["dense"][key]
            cells += [f"{d:,.3f}" if isinstance(d, float) else f"{d:,}", f"{r['ratios'][ratio]:.2f}x" if ratio else ""]
        t.add_row(*cells)
    c.print(t)
    if r.get("note"):
        c.print(f"note: {r['note']}", markup=False)


def _e2e_table(r) -> None:
    from rich.table import Table

    c = _console(stderr=False)
    m = r["machine"]
    c.print(f"{escape(str(r['model']))}, {escape(str(r['target']))} ({r['precision']} trunk) vs onnxruntime-genai's dense {r['precision']} model, both "
            f"through onnxruntime-genai on {escape(m['cpu'])} ({m['cores']} cores); prompt {r['prompt_length']} tokens, "
            f"{r['tokens']} decode tokens, medians of {r['repeats']} alternating runs; copy bandwidth {r['bandwidth_gbps']:.1f} GB/s")
    t = Table(title="end to end (onnxruntime-genai)")
    for col in ("metric", "vq-logits artifact", "builder dense", "ratio"):
        t.add_column(col, justify="right" if col != "metric" else "left")
    vq, d, ratio = r["vq"], r["dense"], r["ratios"]
    rows = [("decode tokens/s", f"{vq['tokens_per_s']:.1f}", f"{d['tokens_per_s']:.1f}", f"{ratio['tokens_per_s']:.2f}x"),
            ("time to first token (ms)", f"{vq['ttft_ms']:.0f}", f"{d['ttft_ms']:.0f}", f"{ratio['ttft']:.2f}x"),
            ("peak RSS (MB)", f"{vq['peak_rss_mb']:.0f}", f"{d['peak_rss_mb']:.0f}", f"{ratio['peak_rss']:.2f}x"),
            ("bytes on disk", f"{vq['model_bytes']:,}", f"{d['model_bytes']:,}", f"{ratio['model_bytes']:.2f}x"),
            ("bytes read per token", f"{vq['bytes_per_token']:,}", f"{d['bytes_per_token']:,}", f"{ratio['bytes_per_token']:.2f}x"),
            ("bandwidth bound (ms/token)", f"{vq['bound_ms']:.2f}", f"{d['bound_ms']:.2f}", ""),
            ("decode time at the bound", f"{100 * vq['bound_fraction']:.0f}%", f"{100 * d['bound_fraction']:.0f}%", "")]
    for row in rows:
        t.add_row(*row)
    c.print(t)
    if "agreement_with_dense" in r:
        a = r["agreement_with_dense"]
        c.print(f"against the dense model at the same precision, teacher-forced on {a['positions']} positions of {escape(str(a['on']))}: top-1 agreement "
                f"{a['top1_agreement']:.4f}, KL(dense || artifact) {a['kl_dense_to_vq']:.5f} nats/token")
    if "dense_int8_head" in r:
        d8, ratio8 = r["dense_int8_head"], r["ratios_dense_int8_head"]
        c.print(f"against onnxruntime-genai's int4 model with an int8 output layer: {d8['tokens_per_s']:.1f} tokens/s "
                f"({ratio8['tokens_per_s']:.2f}x), first token {d8['ttft_ms']:.0f} ms ({ratio8['ttft']:.2f}x), "
                f"{d8['model_bytes']:,} bytes on disk")


def _dense_shape(s: dict) -> str:
    V, d = s["dense_head"]["shape"]
    return f"same V x d{' + bias' if s['dense_head']['params'] > V * d else ''}"


def _dense_words(s: dict) -> str:
    return f"a dense head's {s['dense_head']['params']:,} ({_dense_shape(s)})"


def _two_stage_words(s: dict, model_dir: bool = False) -> str:
    """What a two-stage head's parameter count leaves out: the logits it computes, and where its exact rows are."""
    V = s["dense_head"]["shape"][0]
    t = s["head"]["two_stage"]
    n = t["logits_computed_per_position"]
    own = t["rows_copy_params"]
    if own:
        rows = f"the head's own copy of the output rows ({own:,} params, among the head's)"
    elif model_dir:
        rows = "the model's output layer (among the trunk's parameters; a target's [two_stage] rows may copy it)"
    else:
        rows = "the trunk's own table of the output rows, read in place (among the trunk's parameters, not the head's)"
    tail = f", and a rank-{t['rank']} term for every token" if t["rank"] else ""
    return (f"two-stage head: {t['cluster_scores']:,} cluster scores + {t['exact_rows']:,} exact rows = {n:,} logits "
            f"computed per position ({100 * n / V:.1f}% of V = {V:,}){tail}; stage 2 reads its exact rows from {rows}")


def _parity_table(r) -> None:
    from rich.table import Table

    t = Table(title=f"parity: {r.target} vs torch", show_header=True)
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("allowed", justify="right")
    tol = r.tolerances
    t.add_row("max abs logit diff", f"{r.max_abs_diff:.3g}", f"atol {r.allowed_atol:.3g}, rtol {tol['rtol']:g}")
    if r.reference_error is not None:
        t.add_row("PyTorch's own float32 error", f"{r.reference_error:.3g}",
                  f"x {tol['reference_error_factor']:g} when above atol {tol['atol']:g}")
    elif r.reference_error_note:
        t.add_row("PyTorch's own float32 error", "not measured", escape(r.reference_error_note))
    t.add_row("max rel logit diff", f"{r.max_rel_diff:.3g}", "")
    t.add_row("atol / rtol needed", f"{r.required_atol:.3g} / {r.required_rtol:.3g}", "")
    t.add_row("top-1 agreement", f"{r.top1_agreement:.4f}", f">= {tol['top1_agreement_min']}")
    t.add_row("top-5 overlap", f"{r.top5_overlap:.4f}", f">= {tol['top5_overlap_min']}")
    t.add_row("mean KL(torch||target)", f"{r.kl_divergence:.3g}", f"<= {tol['kl_max']:g}")
    t.add_row("greedy steps matching", f"{r.greedy_match_steps}/{r.steps}", "all" if tol["greedy_must_match"] else "-")
    t.add_row("KV cache max abs diff", f"{r.present_max_abs_diff:.3g}", "")
    t.add_row("positions compared", f"{r.positions} (batch {r.batch})", "")
    if r.rerouted_positions:
        t.add_row("positions probing a near-tied cluster otherwise", f"{r.rerouted_positions}", "any")
    if r.misrouted_positions and not r.passed:
        t.add_row("positions probing clusters outside the near-tie band", f"{r.misrouted_positions}",
                  f"atol >= {r.misrouted_atol:.3g} would hold them")
    c = _console(stderr=False)
    c.print(t)
    c.print(f"reference: {r.reference}", markup=False)
    c.print("[bold green]PASSED[/]" if r.passed else "[bold red]FAILED[/]: " + escape("; ".join(r.failures)))


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, prog_name="vqexport")
def main():
    """Export, optimize and verify VQ-Logits language models for deployment."""


@main.command()
@click.option("--target", "-t", default="ort", show_default=True, help="Target profile name (see 'vqexport targets') or a .toml file.")
@click.option("--model", "-m", default=None,
              help="Hugging Face model directory with a VQ-Logits head (vq_head.json), or 'demo' for the embedded model (the default).")
@click.option("--out", "-o", default=None, type=click.Path(), help="Artifact directory [default: ./artifacts/<profile name>].")
@click.option("--force", is_flag=True, help="Replace an output directory that holds a different artifact or other files.")
@click.option("--steps", type=click.IntRange(0, 4096), default=None, help="Greedy decode steps for the parity check [default: from the profile].")
@click.option("--head", type=click.Choice(["standard", "fused"]), default=None,
              help="Head form: standard ops, or one fused VQLogits node [default: from the profile].")
@click.option("--atol", type=float, default=None,
              help="Parity: the logits' absolute tolerance [default: from the profile]; recorded in the manifest. It "
                   "grows to the profile's reference_error_factor times PyTorch's own float32 error where that is larger.")
@click.option("--rtol", type=float, default=None,
              help="Parity: the logits' relative tolerance [default: from the profile]; recorded in the manifest.")
@click.option("--check-only", is_flag=True,
              help="TensorRT targets: export and run the readiness check only (ops, int32 indices, 2^31 sizes, Q/DQ, "
                   "plugin names); needs no GPU, writes nothing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the manifest (on a parity failure: the parity report; with --check-only: the readiness "
                   "report) as one JSON object on stdout.")
@click.pass_context
def build(ctx, target, model, out, force, steps, head, atol, rtol, check_only, as_json):
    """Export the model, build it for a target, verify parity, write the artifact.

    Exit 0 when the artifact is written and matches PyTorch, 1 on parity failure, 2 on bad input
    (including a graph that fails the TensorRT readiness check, or a machine without TensorRT or a GPU).
    """
    from . import api

    ctx.meta["json"] = as_json
    if check_only:
        given = [name for name, value in (("--out", out is not None), ("--force", force), ("--steps", steps is not None),
                                          ("--atol", atol is not None), ("--rtol", rtol is not None)) if value]
        if given:
            raise VQExportError(f"--check-only cannot be combined with {', '.join(given)}: it writes nothing and runs no "
                                "parity check")
        with _Progress() as progress:
            ready = api.check_readiness(target, model=model, head=head, progress=progress)
        if as_json:
            _print_json(ready.to_dict())
        else:
            _readiness_text(ready)
        if not ready.passed:
            from .backends.trt.readiness import enforce

            enforce(ready)
        return
    with _Progress() as progress:
        result = api.build(target=target, model=model, out=out, force=force, steps=steps, head=head, atol=atol, rtol=rtol,
                           progress=progress)
    if as_json:
        _print_json(result.manifest)
        return
    _print_built(result)


def _print_built(result) -> None:
    """What ``build`` prints of the artifact it wrote: its files, the head's size and the parity verdict."""
    m = result.manifest
    c = _console(stderr=False)
    r = result.parity
    c.print(f"built [bold]{escape(m['target'])}[/] artifact in {escape(str(result.out))}")
    for name, info in m["files"].items():
        c.print(f"  {name:28s} {info['bytes']:>12,d} bytes")
    c.print(f"  {'manifest.json':28s} {(result.out / 'manifest.json').stat().st_size:>12,d} bytes")
    s = m["sizes"]
    from .artifact import graph_file

    rt = m["runtime"]
    graph = graph_file(rt)
    if graph != rt["model_file"]:
        where = f" in {graph}, from which the runtime's {rt['model_file']} was made"
    elif rt.get("backend") == "openvino":  # the IR alone ships (unless [openvino] keep_onnx)
        where = f" in the ONNX graph the runtime's {rt['model_file']} was made from (not kept)"
    else:
        where = ""
    c.print(f"head {s['head']['params']:,} params ({s['head']['bytes']:,} bytes) vs {_dense_words(s)}; "
            f"trunk {s['trunk']['params']:,} params{where}")
    if "two_stage" in s["head"]:
        c.print(_two_stage_words(s), markup=False)
    own = (f" (within {r.allowed_atol:.3g}: PyTorch's own float32 error is {r.reference_error:.3g})"
           if r.reference_error is not None else "")
    c.print(f"parity vs torch: max abs diff {r.max_abs_diff:.3g}{own}, top-1 {r.top1_agreement:.4f}, "
            f"KL {r.kl_divergence:.3g}, greedy {r.greedy_match_steps}/{r.steps} [bold green]PASSED[/]")


@main.command()
@click.option("--artifact", "-a", required=True, type=click.Path(), help="Artifact directory written by 'vqexport build'.")
@click.option("--steps", type=click.IntRange(0, 4096), default=None, help="Greedy decode steps [default: from the artifact's profile].")
@click.option("--model", "-m", default=None, help="Reference model directory [default: the one the artifact was built from].")
@click.option("--atol", type=float, default=None,
              help="The logits' absolute tolerance for this check [default: the one the artifact was built with]. It "
                   "grows to the profile's reference_error_factor times PyTorch's own float32 error where that is larger.")
@click.option("--rtol", type=float, default=None,
              help="The logits' relative tolerance for this check [default: the one the artifact was built with].")
@click.option("--prompt", "prompt_texts", multiple=True,
              help="A prompt to check on, encoded with the model's tokenizer (repeatable) [default: three built-in code "
                   "prompts].")
@click.option("--prompts", "prompts_file", type=click.Path(), default=None,
              help="A JSON file: a list of prompts, each a string or a list of token ids (added to --prompt's).")
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object (the parity report) on stdout.")
@click.pass_context
def verify(ctx, artifact, steps, model, atol, rtol, prompt_texts, prompts_file, as_json):
    """Compare an artifact with the PyTorch reference: prefill, then greedy decode steps.

    Exit 0 on pass, 1 on parity failure, 2 on bad input.
    """
    from . import api

    ctx.meta["json"] = as_json
    prompts = None
    if prompt_texts or prompts_file is not None:
        from .prompts import read_prompts_file

        prompts = list(prompt_texts) + (read_prompts_file(prompts_file) if prompts_file is not None else [])
    with _Progress() as progress:
        report = api.verify(artifact, steps=steps, model=model, atol=atol, rtol=rtol, progress=progress, prompts=prompts)
    if as_json:
        _print_json(report.to_dict())
    else:
        _parity_table(report)
    if not report.passed:
        if not as_json:
            click.echo("parity FAILED", err=True)
        ctx.exit(1)


@main.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def inspect(path, as_json):
    """Show what a model dir ('demo': the embedded model), artifact dir or .onnx holds: I/O, ops, head vs trunk sizes."""
    from . import api

    info = api.inspect(path)
    if as_json:
        _print_json(info)
        return
    from rich.table import Table
    from rich.text import Text

    from .graph_io import cache_dims

    c = _console(stderr=False)
    c.print(f"[bold]{info['kind']}[/] {escape(str(info['path']))}")
    if info["kind"] == "model":
        cfg = info["config"]
        head = cfg["head"]
        if head and head.get("type") == "two-stage":
            # what it computes per position: the sizes' line below
            head_text = (f"two-stage head K={head['codebook_size']} clusters of {head['cluster_size']}, P={head['probes']} "
                         f"probed, router={'fitted' if head['route_bias'] else 'codebook'} bias={head['bias']} rank={head['rank']}")
        elif head:
            head_text = f"VQ-Logits head K={head['codebook_size']} bias={head['bias']} rank={head['rank']}"
        else:
            head_text = "no VQ-Logits head (a dense model: vqexport convert makes one)"
        kv = list(dict.fromkeys(cache_dims(s) for s in cfg["kv_shapes"]))
        if len(kv) == 1 and kv[0][1] == kv[0][2]:
            cache = f"heads={cfg['n_heads']}/{cfg['n_kv_heads']} head_dim={cfg['head_dim']}"
        else:
            shapes = " or ".join(f"{h}/{k}" + (f" (values {v})" if v != k else "") for h, k, v in kv)
            cache = f"heads={cfg['n_heads']}, kv heads/head_dim {shapes}" + (" by layer" if len(kv) > 1 else "")
        if len(cfg["kv_shapes"]) < cfg["n_layers"]:
            cache += f" (caches in {len(cfg['kv_shapes'])} layers, the rest share them)"
        if cfg.get("logit_softcap"):
            cache += f" logits soft-capped at {cfg['logit_softcap']:g}"
        c.print(f"{cfg['model_type']}: V={cfg['vocab_size']} d={cfg['hidden_size']} layers={cfg['n_layers']} "
                f"{cache} tied={cfg['tie_word_embeddings']}; {head_text}; tokenizer={info['tokenizer']}", markup=False)
    else:
        t = Table(title="inputs / outputs")
        for col in ("", "name", "dtype", "shape"):
            t.add_column(col)
        for kind in ("inputs", "outputs"):
            for v in info[kind]:
                t.add_row(kind[:-1], Text(v["name"]), v["dtype"], Text("[" + ", ".join(map(str, v["shape"])) + "]"))
        c.print(t)
        c.print("ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
        c.print("opset: " + ", ".join(f"{k} {v}" for k, v in info["opset"].items()))
    s = info["sizes"]
    t = Table(title="parameters")
    for col in ("part", "params", "bytes"):
        t.add_column(col, justify="right" if col != "part" else "left")
    for name, part in s["head"]["tensors"].items():
        t.add_row(Text(f"  {name}"), f"{part['params']:,}", f"{part['bytes']:,}")
    t.add_row("head", f"{s['head']['params']:,}", f"{s['head']['bytes']:,}")
    t.add_row("trunk", f"{s['trunk']['params']:,}", f"{s['trunk']['bytes']:,}")
    t.add_row(f"dense head ({_dense_shape(s)}, fp32)", f"{s['dense_head']['params']:,}", f"{s['dense_head']['bytes']:,}")
    c.print(t)
    t = Table(title="head terms")
    for col in ("term", "params", "bytes", "% of dense head params"):
        t.add_column(col, justify="right" if col != "term" else "left")
    for name, term in s["head"]["terms"].items():
        t.add_row(name, f"{term['params']:,}", f"{term['bytes']:,}", f"{100 * term['params_vs_dense']:.2f}%")
    c.print(t)
    c.print(f"head is {100 * s['head_fraction_of_params']:.1f}% of all parameters and "
            f"{100 * s['head_params_vs_dense']:.1f}% of a dense head's")
    if "two_stage" in s["head"]:
        c.print(_two_stage_words(s, model_dir=info["kind"] == "model"), markup=False)
    deployed = info.get("deployed")
    if deployed:
        c.print(f"{deployed['note']}; what {deployed['backend']} loads: "
                + ", ".join(f"{n} {b:,} bytes" for n, b in deployed["files"].items()), markup=False)


@main.command()
@click.option("--artifact", "-a", required=True, type=click.Path(), help="Artifact directory written by 'vqexport build'.")
@click.option("--prompt", "-p", required=True, help="Text to continue.")
@click.option("--max-new-tokens", "-n", type=int, default=32, show_default=True, help="Tokens to generate.")
@click.option("--sample", is_flag=True, help="Sample from the full-vocabulary distribution instead of greedy decoding.")
@click.option("--temperature", type=float, default=1.0, show_default=True, help="Sampling temperature, at least 1e-06 (greedy decoding is the limit of a small one).")
@click.option("--top-k", type=int, default=None, help="Sample among the k most likely tokens only.")
@click.option("--seed", type=_SEED, default=None, help="Random seed for sampling (0 to 2^63 - 1).")
def generate(artifact, prompt, max_new_tokens, sample, temperature, top_k, seed):
    """Generate text with the artifact's runtime alone (ONNX Runtime or OpenVINO; no torch): the app-side path.

    Greedy by default. With --sample, exact sampling over all V tokens; on a top-k artifact
    (decode = "topk") it costs O(K) per step.
    """
    from . import api

    started = []

    def stream(piece: str) -> None:  # the prompt is echoed once generation is under way (errors come first)
        if not started:
            started.append(True)
            click.echo(prompt, nl=False)
        click.echo(piece, nl=False)

    gen = api.generate(artifact, prompt, max_new_tokens, on_token=stream, sample=sample,
                       temperature=temperature, top_k=top_k, seed=seed)
    click.echo("" if started else prompt)
    if gen.without_text:
        click.echo(f"note: {gen.without_text} of the {len(gen.new_ids)} new tokens have ids the tokenizer has no text "
                   "for (the model's vocabulary is larger than its tokenizer's), so they print as nothing", err=True)


# The options each bench mode uses besides --json; any other one given is refused.
_BENCH_OPTIONS = {
    "head": ("shapes", "threads", "seconds", "rank"),
    "artifact": ("vs_dense", "prompt_length", "tokens", "repeats"),
    "e2e": ("model", "shape", "target", "e2e_head", "work", "prompt_length", "tokens", "repeats", "text"),
}


@main.command()
@click.option("--head", "head", is_flag=True, help="Benchmark the output layer alone at batch-1 decode for standard head shapes.")
@click.option("--shapes", default=",".join(("gpt2", "qwen2.5-0.5b", "llama-3.2-1b")), show_default=True,
              help="Comma-separated head shapes for --head (gpt2, qwen2.5-0.5b, llama-3.2-1b, gemma-3-1b, gemma-3-270m, tiny).")
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True,
              help="onnxruntime intra-op threads for --head (--artifact uses the threads its profile recorded).")
@click.option("--seconds", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              help="With --head: minimum timing time per variant.")
@click.option("--rank", type=int, default=8, show_default=True,
              help="With --head: rank of the low-rank correction rows (logits, exact top-k by TopK and by cluster bounds); 0 = none.")
@click.option("--artifact", "-a", type=click.Path(), default=None, help="Benchmark a built artifact end to end.")
@click.option("--vs-dense", is_flag=True,
              help="With --artifact: also measure its dense-head twin (the same trunk, one V x d MatMul with the same logits; "
                   "for a two-stage head, the model's own output layer, from the row codes its stage 2 reads where an "
                   "untied model's ONNX Runtime artifact keeps no fp32 copy; on an int4 / int8 trunk, quantized like "
                   "it; on OpenVINO, compressed as NNCF compresses a dense model's last layer).")
@click.option("--e2e", is_flag=True,
              help="An ONNX Runtime artifact (the builder's trunk, or the portable one at fp32, int4 or int8) against "
                   "onnxruntime-genai's own dense model at the same precision, both through onnxruntime-genai, "
                   "alternating (needs --model or --shape).")
@click.option("--model", "-m", "model", type=click.Path(), default=None,
              help="With --e2e: a Hugging Face model directory (converted at K = V/32 if it has no head), or 'demo' "
                   "for the embedded model.")
@click.option("--shape", type=click.Choice(["qwen2.5-0.5b", "llama-3.2-1b", "gemma-3-1b", "gemma-3-270m"]), default=None,
              help="With --e2e: a random-weight model of this shape, made locally (no download).")
@click.option("--target", "-t", default="ort-int4", show_default=True, help="With --e2e: the artifact's target (the builder's trunk, or the portable trunk at fp32, int4 or int8).")
@click.option("--e2e-head", "e2e_head", type=click.Choice(["vq", "two-stage"]), default="vq", show_default=True,
              help="With --e2e: the head a model without one (or --shape's) gets: vq (K = V/32) or two-stage (K = V/16, P = K/16).")
@click.option("--text", type=click.Path(), default=None,
              help="With --e2e --model: a text file; the agreement with the dense model is measured on its first "
                   "prompt + decode tokens [default: seeded random token ids].")
@click.option("--work", type=click.Path(), default=None,
              help="With --e2e: keep the models and artifacts here (reused by the next run) instead of a temporary directory.")
@click.option("--prompt-length", type=int, default=None,
              help="Prompt tokens for time to first token [default: 128 with --artifact, 64 with --e2e].")
@click.option("--tokens", type=int, default=64, show_default=True, help="With --artifact / --e2e: decode tokens timed.")
@click.option("--repeats", type=click.IntRange(1, 50), default=3, show_default=True,
              help="With --artifact / --e2e: fresh worker runs per model (the sides alternating); medians reported.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
@click.pass_context
def bench(ctx, head, shapes, threads, seconds, rank, artifact, vs_dense, e2e, model, shape, target, e2e_head, text, work, prompt_length,
          tokens, repeats, as_json):
    """Latency benchmarks; figures and ratios measured side by side in one run.

    --head: the output layer alone for standard head shapes. --artifact DIR: time to first token,
    per-token decode latency (p50/p90/p99), tokens/s, peak RSS and bytes of a built artifact. --e2e: an ONNX Runtime
    artifact (the builder's trunk, or the portable one at fp32, int4 or int8) against onnxruntime-genai's own dense
    model at the same precision, both through onnxruntime-genai.
    """
    from . import api

    if sum((head, artifact is not None, e2e)) != 1:
        raise VQExportError("choose what to benchmark: --head, --artifact DIR or --e2e")
    mode = "head" if head else "artifact" if artifact is not None else "e2e"
    from click.core import ParameterSource

    given = [next(o for o in p.opts if o.startswith("--")) for p in ctx.command.params
             if p.name not in ("head", "artifact", "e2e", "as_json", *_BENCH_OPTIONS[mode])
             and ctx.get_parameter_source(p.name) not in (None, ParameterSource.DEFAULT)]
    if given:
        raise VQExportError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --{mode} "
                            "(see 'vqexport bench --help')")
    if e2e and model is not None and shape is not None:
        raise VQExportError("bench --e2e: --model and --shape are mutually exclusive; give one of them")
    if e2e:
        with _Bar() as bar:
            result = api.bench_e2e(model=model, shape=shape, target=target, prompt_len=64 if prompt_length is None else prompt_length, tokens=tokens,
                                   repeats=repeats, work=work, progress=bar, head=e2e_head, text=text)
        if as_json:
            _print_json(result)
        else:
            _e2e_table(result)
        return
    if artifact is not None:
        with _Bar() as bar:
            result = api.bench_artifact(artifact, vs_dense=vs_dense, prompt_len=128 if prompt_length is None else prompt_length, tokens=tokens,
                                        repeats=repeats, progress=bar)
        if as_json:
            _print_json(result)
        else:
            _artifact_table(result)
        return
    names = [s.strip() for s in shapes.split(",") if s.strip()]
    with _Bar() as bar:
        result = api.bench_head(names, threads=threads, min_seconds=seconds, progress=bar, rank=rank)
    if as_json:
        _print_json(result)
        return
    from rich.table import Table

    c = _console(stderr=False)
    m = result["machine"]
    c.print(f"{escape(m['cpu'])}, {threads} threads, onnxruntime {m['onnxruntime']}; copy bandwidth {result['bandwidth_gbps']:.1f} GB/s")
    t = Table(title="head latency, batch 1, one decode step (median ms; x = speed-up over dense fp32)")
    for col in ("shape", "V", "d", "K", "dense", "dense int8", "vq", "vq int8", "fused", "top-k 50 (int8)"):
        t.add_column(col, justify="right" if col != "shape" else "left")
    for r in result["rows"]:
        t.add_row(r["name"], str(r["V"]), str(r["d"]), str(r["K"]), f"{r['dense_ms']:.3f}", f"{r['dense_int8_ms']:.3f}",
                  f"{r['vq_ms']:.3f} ({r['vq_speedup']:.0f}x)", f"{r['vq_int8_ms']:.3f} ({r['vq_int8_speedup']:.0f}x)",
                  f"{r['fused_ms']:.3f} ({r['dense_ms'] / r['fused_ms']:.0f}x)",
                  f"{r['topk_ms']:.3f} ({r['topk_speedup']:.0f}x)")
    c.print(t)
    if result["rows"] and "rank" in result["rows"][0]:
        r0 = result["rows"][0]["rank"]
        t = Table(title=f"with a rank-{r0} correction (h·Pᵀ)·Uᵀ (median ms; x = speed-up over dense fp32)")
        for col in ("shape", "vq + r fp32 (logits)", "vq + r best (logits)", "exact top-50: TopK over V logits",
                    "exact top-50: cluster bounds", "tokens scored"):
            t.add_column(col, justify="right" if col != "shape" else "left")
        for r in result["rows"]:
            t.add_row(r["name"], f"{r['vq_lowrank_ms']:.3f} ({r['vq_lowrank_speedup']:.0f}x)",
                      f"{r['vq_lowrank_best_ms']:.3f} ({r['vq_lowrank_best_speedup']:.0f}x, {r['vq_lowrank_best_form']})",
                      f"{r['topk_lowrank_logits_ms']:.3f} ({r['dense_ms'] / r['topk_lowrank_logits_ms']:.0f}x)",
                      f"{r['topk_lowrank_bounds_ms']:.3f} ({r['topk_lowrank_bounds_speedup']:.0f}x)",
                      f"{r['topk_lowrank_bounds_tokens_scored']} of {r['V']}")
        c.print(t)
    if result["rows"] and result["rows"][0].get("two_stage"):
        t = Table(title="two-stage head: K = V/16 clusters of 16, int4 codebook routes, the best P clusters rescored exactly "
                        "(median ms; x = speed-up over the dense int4 MatMulNBits head)")
        for col in ("shape", "dense int4", "dense int8", "P", "rows fp32 (Gather)", "rows int8 (MatMulInteger)",
                    "rows int4 (GatherBlockQuantized)"):
            t.add_column(col, justify="right" if col != "shape" else "left")
        for r in result["rows"]:
            base = r["dense_int4_nbits_ms"]
            for P in sorted({int(k.split("_")[2][1:]) for k in r["two_stage"]}):
                cells = [f"{r['two_stage'][f'two_stage_P{P}_{f}']:.3f} ({base / r['two_stage'][f'two_stage_P{P}_{f}']:.1f}x)"
                         for f in ("fp32", "int8", "int4")]
                t.add_row(r["name"], f"{base:.3f}", f"{r['dense_int8_nbits_ms']:.3f}", str(P), *cells)
        c.print(t)
    t = Table(title="every variant measured (bytes it must move; fraction of copy bandwidth; >1 means cache-resident)")
    for col in ("shape", "variant", "ms", "MB", "of bandwidth"):
        t.add_column(col, justify="right" if col not in ("shape", "variant") else "left")
    for v in result["variants"]:
        t.add_row(v["shape"], v["variant"], f"{v['ms']:.3f}", f"{v['bytes'] / 1e6:.2f}", f"{v['bandwidth_fraction']:.2f}")
    c.print(t)
    c.print(result["notes"])


@main.command()
@click.option("--from", "src", required=True, type=click.Path(),
              help="A Hugging Face causal-LM directory (config.json, safetensors, tokenizer), or 'demo'.")
@click.option("--codebook-size", "-k", required=True, type=int, help="K, the number of codebook rows (1 <= K <= V).")
@click.option("--no-bias", is_flag=True, help="No per-token bias in the VQ head.")
@click.option("--distill-text", type=click.Path(), default=None,
              help="UTF-8 text: distill the head on its first 90%, report perplexity on the rest.")
@click.option("--steps", type=int, default=None,
              help="Training steps on --distill-text [default: 300]: head-only distillation (--head vq) or router "
              "fitting, then as many steps of rank-r tail distillation with --rank (--head two-stage; 0: training-free).")
@click.option("--clustering", type=click.Choice(["auto", "euclidean", "spherical", "balanced", "balanced-spherical", "metric",
                                                 "equal-spherical", "equal-metric"]),
              default="auto", show_default=True,
              help="How the map is clustered: k-means of the rows (euclidean or spherical), optionally size-balanced; "
              "euclidean k-means in the metric of the hidden states on --distill-text (metric); or equal-size "
              "clusters, spherical or in that metric (equal-metric). auto tries the first four, and metric with "
              "--distill-text, and keeps the one with the lowest held-out perplexity on it, or without text the lowest "
              "mean squared distance of the head rows to their codebook rows. --head two-stage takes the equal-size "
              "methods only (auto: equal-metric with --distill-text, else equal-spherical).")
@click.option("--head", "head", type=click.Choice(["vq", "two-stage"]), default="vq", show_default=True,
              help="vq: the plain VQ-Logits head; two-stage: the codebook routes and the model's own output-layer rows "
              "give the best P clusters exact logits (the router is fitted on --distill-text when given).")
@click.option("--probes", type=int, default=None,
              help="--head two-stage: clusters rescored per position [default: the fewest whose clusters hold the dense "
              "argmax at 99.5% of held-out positions, measured on --distill-text; K/16 without text].")
@click.option("--rank", "-r", type=int, default=0, show_default=True,
              help="Rank r of the per-token correction (h·Pᵀ)·Uᵀ, fitted to the residual W - C[M]; 0 = the plain head.")
@click.option("--seed", type=_SEED, default=0, show_default=True,
              help="Random seed, 0 to 2^63 - 1 (the output is deterministic for a seed).")
@click.option("--out", "-o", required=True, type=click.Path(), help="New model directory (must not exist).")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as one JSON object on stdout.")
def convert(src, codebook_size, no_bias, distill_text, steps, clustering, head, probes, rank, seed, out, as_json):
    """Give a Hugging Face model a VQ-Logits head: the model's files are copied unchanged and vq_head.json +
    vq_head.safetensors (map, codebook, bias, optional rank-r correction, distilled) written beside them."""
    from . import api

    with _Bar() as bar:
        result = api.convert(src, codebook_size, out, bias=not no_bias, distill_text=distill_text, steps=steps,
                             seed=seed, clustering=clustering, rank=rank, head=head, probes=probes, progress=bar)
    if as_json:
        _print_json(result.report)
        return
    click.echo(f"wrote {result.out}")
    r = result.report.get("after_distillation")
    if r:
        what = "every token its VQ logit (no probes)" if result.report["head"] == "two-stage" else "VQ head"
        click.echo(f"held-out perplexity: dense {r['dense_ppl']:.2f}, {what} {r['vq_ppl']:.2f} ({100 * r['ppl_change']:+.1f}%), "
                   f"top-1 agreement {r['top1_agreement']:.3f}")
    t = result.report.get("two_stage")
    if t:
        click.echo(f"two-stage at P = {t['probes']}: perplexity {t['vq_ppl']:.2f} ({100 * t['ppl_change']:+.2f}%), top-1 agreement "
                   f"{t['top1_agreement']:.4f}, dense argmax inside the probed clusters {t['probe_recall']:.4f}")
    if result.report.get("note"):
        click.echo(f"note: {result.report['note']}", err=True)


@main.command()
@click.option("--model", "-m", default=None, help="Model directory with a VQ-Logits head, or 'demo' (the default).")
@click.option("--text", required=True, type=click.Path(), help="UTF-8 text to score (tokenized with the model's tokenizer).")
@click.option("--probes", type=int, default=None, help="A two-stage head's probes for this measurement [default: its own].")
@click.option("--max-tokens", type=int, default=None, help="Score the text's first N tokens only, in whole windows: rounded down to a multiple of --window, "
                   "and at least one window (the report's tokens says how many were scored).")
@click.option("--window", type=int, default=None,
              help="Tokens per scored window, each from an empty cache, up to the model's maximum positions; the text "
                   "needs one window and the token after it [default: 128, the windows convert measures on].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def fidelity(model, text, probes, max_tokens, window, as_json):
    """How close the head is to the dense output layer it replaces, on a text: perplexity of both, top-1 agreement,
    KL, and (two-stage) how often the dense argmax fell inside the probed clusters, and the perplexity and top-1
    the same head would reach with ideal routing (about the best any router could do with its tail); then the same
    by the dense distribution's entropy at each position, in bands of 1 nat."""
    from . import api

    with _Progress() as progress:
        r = api.fidelity(model, text, probes=probes, max_tokens=max_tokens, window=window, progress=progress)
    if as_json:
        _print_json(r)
        return
    line = (f"{r['tokens']:,} tokens in windows of {r['window']}: dense ppl {r['dense_ppl']:.3f}, {r['head']['type']} head ppl {r['vq_ppl']:.3f} "
            f"({100 * r['ppl_change']:+.2f}%), top-1 agreement {r['top1_agreement']:.4f}, KL {r['kl_to_dense']:.5f} nats/token")
    if "probe_recall" in r:
        line += (f", dense argmax inside the {r['probes']} probed clusters {r['probe_recall']:.4f}; with ideal routing "
                 f"(the {r['probes']} clusters holding the most dense probability) "
                 f"{100 * r['ideal_routing_ppl_change']:+.2f}%, top-1 {r['ideal_routing_top1_agreement']:.4f}")
    click.echo(line)
    for band in r["by_dense_entropy"]:
        if not band["tokens"]:
            continue
        hi = f"{band['entropy_to']:g})" if band["entropy_to"] is not None else "inf)"
        recall = f", probe recall {band['probe_recall']:.4f}" if "probe_recall" in band else ""
        click.echo(f"  dense entropy [{band['entropy_from']:g}, {hi} nats: {100 * band['share']:5.1f}% of tokens, "
                   f"ppl {100 * band['ppl_change']:+.2f}%, top-1 {band['top1_agreement']:.4f}{recall}")


def _readiness_text(r) -> None:
    c = _console(stderr=False)
    lst = r.op_list
    c.print(f"TensorRT readiness of {escape(str(r.target))}: {sum(r.ops.values())} nodes, {len(r.ops)} op types, checked against "
            f"{lst['source']} (TensorRT {lst['tensorrt']}, opset {lst['opset'][0]}-{lst['opset'][1]})")
    for which, t in r.largest.items():
        c.print(f"  largest tensor at the {which} profile's max shapes: {escape(t['tensor'])} {t['shape']} = {t['elements']:,} elements")
    if r.unresolved:
        c.print(f"  ({r.unresolved} tensors whose size shape inference cannot pin down)")
    for reason in r.reasons:
        c.print(f"  x {reason}", markup=False, soft_wrap=True)
    c.print("[bold green]READY[/]" if r.passed else f"[bold red]NOT READY[/] ({len(r.reasons)} reasons)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def doctor(as_json):
    """Which targets this machine can build and run, and why not (packages, versions, GPU)."""
    from . import api

    d = api.doctor()
    if as_json:
        _print_json(d)
        return
    m = d["machine"]
    c = _console(stderr=False)
    gpu = f"{m['gpu']['name']} (compute capability {m['gpu']['compute_capability']})" if m["gpu"] else f"none ({m['gpu_error']})"
    c.print(f"python {m['python']} on {m['machine']}; onnxruntime {m['onnxruntime']} ({', '.join(m['ort_providers'])}); "
            f"onnxruntime-genai {m.get('onnxruntime_genai') or 'not installed'}; "
            f"OpenVINO {m.get('openvino') or 'not installed'} ({', '.join(m.get('openvino_devices') or []) or 'no devices'}); "
            f"TensorRT {m['tensorrt'] or 'not installed'}; GPU {gpu}", markup=False)
    width = max(map(len, d["targets"]), default=0)
    for name, t in d["targets"].items():
        state = "build + run" if t["build"] else ("run only" if t["run"] else "no")
        c.print(f"{name:{width}s} {state:12s} {'; '.join(t['why_not'])}", markup=False, soft_wrap=True)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def targets(as_json):
    """List the bundled target profiles."""
    from . import api

    profiles = {n: api.load_profile(n) for n in api.target_names()}
    if as_json:
        _print_json({n: p.to_dict() for n, p in profiles.items()})
        return
    aliases = api.target_aliases()
    width = max(map(len, profiles), default=0)
    for n, p in profiles.items():
        note = f" (alias of {aliases[n]})" if n in aliases else ""
        click.echo(f"{n:{width}s} {p.description}{note}")

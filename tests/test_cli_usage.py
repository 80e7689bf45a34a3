"""The command line itself: usage errors, option combinations, labels, 'demo' and progress with --json."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import assert_user_error, run_cli, sample_text


@pytest.mark.parametrize("args, fragment", [
    (["generate", "-a", "ART", "-p", "hi", "--sample", "--seed", -1, "-n", 2], "'--seed'"),
    (["generate", "-a", "ART", "-p", "hi", "--sample", "--seed", 2**63, "-n", 2], "'--seed'"),
    (["convert", "--from", "demo", "-k", 16, "--seed", 1180591620717411303424, "--out", "x"], "'--seed'"),
    (["convert", "--from", "demo", "-k", 16, "--seed", -1, "--out", "x"], "'--seed'"),
])
def test_an_out_of_range_seed_is_one_line(args, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(run_cli(*args), fragment, "is not in the range")
    assert list(tmp_path.iterdir()) == []


def test_the_largest_seed_is_accepted_downstream(demo_artifact, tmp_path, small_tokenizer):
    """--seed 2^63 - 1 (the documented maximum) reaches every generator it seeds: convert's clustering, distillation,
    router and two-stage tail (seeded with seed + 1), and generate's sampling."""
    from .models import make_model

    largest = 2**63 - 1
    model = make_model(tmp_path / "dense", vocab=320, layers=1, head=False, tokenizer=small_tokenizer)
    text = tmp_path / "text.txt"
    text.write_text(sample_text())
    for head in ("vq", "two-stage"):
        r = run_cli("convert", "--from", model, "-k", 16, "--head", head, "--rank", 2, "--distill-text", text, "--steps", 1,
                    "--seed", largest, "--out", tmp_path / head, "--json")
        assert r.exit_code == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["seed"] == largest and report["head"] == head
    assert json.loads(r.stdout)["tail_distill_steps"] == 1  # the two-stage tail was distilled (its generator: seed + 1)
    runs = [run_cli("generate", "-a", demo_artifact, "-p", "hi", "--sample", "--seed", largest, "-n", 8) for _ in range(2)]
    for r in runs:
        assert r.exit_code == 0, r.stderr
        assert r.stdout.startswith("hi") and len(r.stdout) > len("hi\n")
    assert runs[0].stdout == runs[1].stdout  # the same seed draws the same tokens


@pytest.mark.parametrize("args, fragments", [
    (["build", "--steps", "-1"], ["'--steps'", "-1", "'vqexport build --help'"]),
    (["bogus"], ["No such command 'bogus'", "'vqexport --help'"]),
    (["--bogus"], ["No such option", "'vqexport --help'"]),
    (["build", "--stpes", "3"], ["No such option", "--stpes", "'vqexport build --help'"]),
    (["generate", "-a", "ART", "-p", "hi", "-n", "abc"], ["'abc' is not a valid integer", "'vqexport generate --help'"]),
    (["generate", "-p", "hi"], ["Missing option", "--artifact"]),
    (["bench", "--shape", "gpt9", "--e2e"], ["'--shape'", "gpt9"]),
])
def test_usage_errors_are_one_line(args, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a build without --out writes ./artifacts/<target>: nothing may appear here
    assert_user_error(run_cli(*args), *fragments)
    assert list(tmp_path.iterdir()) == []


def test_a_usage_error_is_one_line_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vqexport", "build", "--steps", "-1"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["error: Invalid value for '--steps': -1 is not in the range 0<=x<=4096. "
                                        "(see 'vqexport build --help')"]
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_help_still_works():
    r = run_cli("build", "--help")
    assert r.exit_code == 0 and r.stdout.startswith("Usage: ") and "--check-only" in r.stdout and r.stderr == ""
    r = run_cli("--help")
    assert r.exit_code == 0 and "bench" in r.stdout


def test_bench_e2e_offers_every_shape_it_can_make():
    from vqexport.bench.e2e import SHAPES
    from vqexport.cli import bench

    choices = next(p.type.choices for p in bench.params if p.name == "shape")
    assert sorted(choices) == sorted(SHAPES)
    from vqexport.bench.head import SHAPES as HEAD_SHAPES

    shapes_help = next(p.help for p in bench.params if p.name == "shapes")
    assert f"({', '.join(HEAD_SHAPES)})" in shapes_help  # --head --shapes lists every head shape it takes
    assert set(SHAPES) <= set(HEAD_SHAPES)  # every shape --e2e makes has its head benchmark


@pytest.mark.parametrize("args, fragments", [
    (["bench", "--artifact", "ART", "--model", "/x", "--shapes", "bogus", "--work", "/tmp/zz"],
     ["--shapes, --model, --work", "do not apply to --artifact"]),
    (["bench", "--head", "--vs-dense", "--shapes", "tiny"], ["--vs-dense does not apply to --head"]),
    (["bench", "--head", "--tokens", 4, "--repeats", 2, "--prompt-length", 8], ["--prompt-length, --tokens, --repeats", "--head"]),
    (["bench", "--artifact", "ART", "--seconds", 1, "--threads", 4, "--rank", 0], ["--threads, --seconds, --rank", "--artifact"]),
    (["bench", "--artifact", "ART", "-t", "ort", "--e2e-head", "vq"], ["--target, --e2e-head", "--artifact"]),
    (["bench", "--e2e", "--model", "M", "--vs-dense", "--shapes", "tiny"], ["--shapes, --vs-dense", "--e2e"]),
    (["bench", "--e2e", "--shape", "qwen2.5-0.5b", "--model", "ART"], ["--model and --shape are mutually exclusive"]),
])
def test_bench_refuses_options_of_another_mode(args, fragments, monkeypatch):
    from vqexport import api

    def called(*a, **k):
        raise AssertionError("the benchmark ran")

    for name in ("bench_head", "bench_artifact", "bench_e2e"):
        monkeypatch.setattr(api, name, called)
    assert_user_error(run_cli(*args), *fragments)


def test_check_only_refuses_out_force_and_steps(tmp_path):
    out = tmp_path / "ck"
    assert_user_error(run_cli("build", "-t", "trt", "--check-only", "--out", out, "--force", "--steps", 3),
                      "--check-only", "--out, --force, --steps")
    assert_user_error(run_cli("build", "-t", "trt", "--check-only", "--steps", 3), "--check-only", "--steps")
    assert not out.exists()


def test_bench_e2e_takes_demo(monkeypatch):
    """--model demo reaches the benchmark as the embedded model's directory (stopped where it loads the model)."""
    import vqexport.source
    from vqexport.errors import VQExportError

    seen = {}

    def fake(path, **kwargs):
        seen["model"] = path
        raise VQExportError("stop here")

    monkeypatch.setattr(vqexport.source, "load_source", fake)
    assert_user_error(run_cli("bench", "--e2e", "--model", "demo", "--tokens", 4, "--json"), "stop here")
    assert (Path(seen["model"]) / "config.json").is_file()
    assert Path(seen["model"]).resolve() == vqexport.source.demo_dir().resolve()


def _artifact_result(target, **extra):
    vq = {"ttft_ms": 1.0, "decode_ms_p50": 1.0, "decode_ms_p90": 1.0, "decode_ms_p99": 1.0, "tokens_per_s": 1.0,
          "peak_rss_mb": 1.0, "session_rss_mb": 1.0, "model_bytes": 1}
    return {"artifact": "ART", "target": target, "machine": {"cpu": "cpu"}, "prompt_length": 8, "tokens": 4, "repeats": 1,
            "vq": vq, **extra}


@pytest.mark.parametrize("result, runtime", [
    (_artifact_result("openvino-int8", backend="openvino"), "OpenVINO"),
    (_artifact_result("ort-int8", backend="ort"), "onnxruntime"),
    (_artifact_result("mine", backend="trt"), "TensorRT"),
])
def test_bench_artifact_table_names_the_runtime(result, runtime, monkeypatch):
    from vqexport import api

    monkeypatch.setattr(api, "bench_artifact", lambda *a, **k: result)
    r = run_cli("bench", "--artifact", "ART")
    assert r.exit_code == 0, r.stderr
    assert f"end-to-end latency ({runtime})" in r.stdout
    if runtime != "onnxruntime":
        assert "onnxruntime" not in r.stdout


def test_convert_help_says_how_auto_clustering_chooses():
    text = " ".join(run_cli("convert", "--help").stdout.split())
    assert ("auto tries the first four, and metric with --distill-text, and keeps the one with the lowest held-out "
            "perplexity on it, or without text the lowest mean squared distance") in text



def test_generate_help_gives_the_smallest_temperature_the_check_takes():
    """The help spells the bound out (so that --help does not import numpy): the same as the error's."""
    from vqexport.head.decoding import MIN_TEMPERATURE

    text = " ".join(run_cli("generate", "--help").stdout.split())
    assert f"Sampling temperature, at least {MIN_TEMPERATURE:g}" in text
    from vqexport.errors import VQExportError
    from vqexport.head.decoding import check_temperature

    assert check_temperature(MIN_TEMPERATURE) == MIN_TEMPERATURE
    with pytest.raises(VQExportError, match=f">= {MIN_TEMPERATURE:g}"):
        check_temperature(MIN_TEMPERATURE / 2)


def test_convert_offers_every_clustering_method():
    """The CLI spells the methods out (so that --help does not import torch): the same list as the converter's."""
    from vqexport.cli import convert
    from vqexport.convert.clustering import NAMED

    choice = next(p for p in convert.params if p.name == "clustering").type
    assert tuple(choice.choices) == ("auto", *NAMED)


def test_inspect_takes_demo():
    from vqexport import api
    from vqexport.source import demo_dir

    r = run_cli("inspect", "demo", "--json")
    assert r.exit_code == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["kind"] == "model" and Path(info["path"]) == demo_dir()
    assert info["config"]["head"]["codebook_size"] == api.resolve_source("demo").head.config.codebook_size
    assert "demo" in " ".join(run_cli("inspect", "--help").stdout.split())


def test_output_into_a_pipe_wraps_no_line_and_names_align(monkeypatch):
    """Into a file or a pipe (not a terminal) rich would wrap at 80 columns; unless COLUMNS says otherwise it does not."""
    monkeypatch.delenv("COLUMNS", raising=False)
    r = run_cli("inspect", "demo")
    assert r.exit_code == 0, r.stderr
    assert "tied=True; VQ-Logits head K=512 bias=True rank=0; tokenizer=True" in r.stdout  # one line, 115 characters
    lines = run_cli("targets").stdout.splitlines()
    starts = {len(line) - len(line.split(maxsplit=1)[1]) for line in lines}  # where each description starts
    assert len(starts) == 1 and any(line.startswith("ort-int4-portable ONNX Runtime") for line in lines)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_json_runs_show_progress_on_a_terminal():
    """stderr a terminal, stdout a pipe: the progress bar is drawn on stderr and stdout is one JSON object."""
    master, slave = os.openpty()
    env = {**os.environ, "TERM": "xterm", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "vqexport", "bench", "--head", "--shapes", "tiny", "--seconds", "0.05",
                             "--rank", "0", "--json"], stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal closed with the process
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    out, _ = proc.communicate(timeout=600)
    reader.join(timeout=10)
    os.close(master)
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, err
    assert json.loads(out)["rows"][0]["name"] == "tiny"
    assert "tiny: " in err  # the bar's label, e.g. "tiny: dense"



def test_the_progress_bar_takes_each_stage_s_total():
    """A stage's total replaces the one before it: a bar kept at the first stage's total of 1 read 100% (or 0%) for
    every later stage."""
    from vqexport import cli

    updates = []

    class Widget:
        def add_task(self, label, total):
            return 7

        def update(self, task, **fields):
            updates.append(fields)

    bar = cli._Bar.__new__(cli._Bar)
    bar.widget, bar.task = Widget(), None
    bar("loading", 0, 1)
    bar("clustering", 3, 38)
    assert updates[-1] == {"completed": 3, "total": 38, "description": "clustering"}


def test_the_parity_table_shows_failures_and_notes_as_written(capsys):
    """Text in square brackets ("[parity]", a path, "[/x]") is shown, not read as a style: the table on stdout says
    what the one line on stderr says."""
    from vqexport import cli
    from vqexport.verify import ParityReport

    failures = ["top-1 agreement 0.5 < 0.85 (a target file's [parity] top1_agreement_min sets it)", "odd [/x] text"]
    report = ParityReport(target="ort", passed=False, max_abs_diff=0.1, max_rel_diff=0.1, required_atol=0.1,
                          required_rtol=0.1, top1_agreement=0.5, top5_overlap=0.9, kl_divergence=0.01,
                          kl_divergence_max=0.1, present_max_abs_diff=0.0, greedy_match_steps=1, steps=4, batch=1,
                          positions=8, reference_error_note="the reference in [float64] did not fit", failures=failures,
                          tolerances={"rtol": 0, "atol": 1e-4, "top1_agreement_min": 0.85, "top5_overlap_min": 0.9,
                                      "kl_max": 0.02, "greedy_must_match": True, "reference_error_factor": 4})
    cli._parity_table(report)
    out = capsys.readouterr().out
    assert "FAILED: " + "; ".join(failures) in out
    assert "[float64]" in out


def test_a_two_stage_heads_rows_are_its_own_only_when_it_copies_them():
    """The rows' bias alone is no copy of the rows: a head that reads the trunk's table keeps saying so."""
    from vqexport import cli
    from vqexport.head.spec import HeadConfig
    from vqexport.sizes import summary

    cfg = HeadConfig(vocab_size=320, hidden_size=64, codebook_size=20, rank=3, type="two-stage", cluster_size=16, probes=4)
    head = {"head.codebook": (20 * 64, 4 * 20 * 64), "head.rows_bias": (320, 1280), "head.members": (320, 1280)}
    words = cli._two_stage_words(summary(head, {"model.embed_tokens.weight": (320 * 64, 4 * 320 * 64)}, 320, 64, True, cfg))
    assert words == ("two-stage head: 20 cluster scores + 64 exact rows = 84 logits computed per position (26.2% of V = 320), "
                     "and a rank-3 term for every token; stage 2 reads its exact rows from the trunk's own table of the "
                     "output rows, read in place (among the trunk's parameters, not the head's)")
    copied = cli._two_stage_words(summary({**head, "head.rows": (320 * 64, 4 * 320 * 64)}, {}, 320, 64, True, cfg))
    assert copied.endswith("from the head's own copy of the output rows (20,480 params, among the head's)")

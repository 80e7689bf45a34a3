"""Text generation with the artifact's own runtime, no torch: the minimal "embed the artifact in an app" path.

Imports numpy, tokenizers, safetensors, onnx (to read the graph) and the runtime: onnxruntime, or OpenVINO for an
OpenVINO artifact (never torch; a TensorRT engine is run by verify and bench, whose runner needs torch for CUDA
memory).

* greedy (default): argmax of the logits, or the first of the graph's exact top-k;
* ``sample=True``: exact sampling from softmax(logits / T) over all V tokens (optionally only the top-k).
  On a top-k artifact (``decode = "topk"``) this is O(K) per step: the graph's cluster log-probabilities
  select a cluster, per-cluster tables built once per temperature select the token; with ``top_k`` the
  graph's exact top-k is sampled. On a logits artifact it samples the V logits directly (and so does a top-k
  artifact of a head with a rank-r correction, which must then keep its logits output).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifact import read_manifest
from .backends.runners import runner_from_runtime
from .head.decoding import Sampler, check_temperature, cluster_tables, codebook_logits_from_cluster_logprobs, softmax_draw
from .errors import VQExportError


@dataclass
class Generation:
    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    stopped_at_eos: bool
    without_text: int = 0  # new tokens the tokenizer has no text for (ids of a vocabulary larger than the tokenizer's)


class _Chooser:
    """Picks the next token from one step's outputs (last position of row 0)."""

    def __init__(self, artifact: Path, manifest: dict, sample: bool, temperature: float, top_k: int | None, seed):
        cfg = manifest["config"]
        self.vocab = cfg["vocab_size"]
        self.sample = sample
        self.decode = manifest["profile"].get("decode", {}).get("mode", "logits")
        self.graph_k = manifest["profile"].get("decode", {}).get("k")
        self.temperature = check_temperature(temperature) if sample else 1.0
        if top_k is not None and not 1 <= top_k <= self.vocab:
            raise VQExportError(f"--top-k must be in [1, vocab size {self.vocab}], got {top_k}")
        if top_k is not None and self.decode == "topk" and top_k > self.graph_k:
            raise VQExportError(f"--top-k {top_k} exceeds the k={self.graph_k} this artifact's graph computes; rebuild with a larger decode.k")
        self.top_k = top_k
        self.rng = np.random.default_rng(seed)
        self.sampler = None
        if sample and self.decode == "topk" and top_k is None and (cfg["head"].get("rank", 0) or cfg["head"].get("type") == "two-stage"):
            # a rank-r correction or a two-stage head's exact rows change the order inside a cluster with h: exact
            # sampling needs all V logits
            what = (f"a rank-{cfg['head']['rank']} correction" if cfg["head"].get("rank", 0) else "a two-stage head")
            if not manifest["profile"].get("decode", {}).get("keep_logits"):
                raise VQExportError(f"this artifact has {what} and no logits output: exact sampling over all V needs the logits "
                                    "(rebuild with decode.keep_logits = true), or pass --top-k N")
            self.decode = "logits"
        if sample and self.decode == "topk" and top_k is None:
            from .head.spec import read_head

            head = read_head(artifact)
            if head is None:
                raise VQExportError(f"{artifact}: the head's definition (vq_head.json + vq_head.safetensors) is missing; "
                                    "exact sampling from cluster log-probabilities needs its map and bias")
            K = head.config.codebook_size
            self.sampler = Sampler(head.map, head.bias, K, temperature=self.temperature, seed=seed)
            self.tables_t1 = cluster_tables(head.map, head.bias, K, width=1)

    def __call__(self, out) -> int:
        if self.decode == "topk":
            ids = out.extra["topk_ids"][0, -1]
            if not self.sample:
                return int(ids[0])
            if self.sampler is not None:
                z = codebook_logits_from_cluster_logprobs(out.extra["cluster_logprobs"][0, -1], self.tables_t1)
                return self.sampler.sample(z)
            return self._draw(ids[: self.top_k], out.extra["topk_logprobs"][0, -1][: self.top_k])
        logits = out.logits[0, -1].astype(np.float64)
        if not self.sample:
            return int(logits.argmax())
        ids = np.arange(logits.size)
        if self.top_k is not None:
            ids = np.argpartition(-logits, self.top_k - 1)[: self.top_k]
        return self._draw(ids, logits[ids])

    def _draw(self, ids, scores) -> int:
        x = np.asarray(scores, dtype=np.float64) / self.temperature
        return int(ids[softmax_draw(self.rng, x)])


def generate(artifact, prompt: str, max_new_tokens: int = 32, on_token=None, sample: bool = False,
             temperature: float = 1.0, top_k: int | None = None, seed: int | None = None) -> Generation:
    """Decode up to ``max_new_tokens`` after ``prompt``; ``on_token(text_piece)`` streams the output."""
    from tokenizers import Tokenizer

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    if max_new_tokens < 1:
        raise VQExportError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    given = [name for name, v in (("--temperature", temperature != 1.0), ("--top-k", top_k is not None),
                                  ("--seed", seed is not None)) if v]
    if not sample and given:
        raise VQExportError(f"{' and '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to sampling; add --sample")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
        raise VQExportError(f"seed must be an integer in [0, 2^63), got {seed!r}")
    if sample:
        check_temperature(temperature)
    if manifest["runtime"].get("backend", "ort") not in ("ort", "openvino"):
        raise VQExportError(f"{artifact}: generate runs ONNX Runtime and OpenVINO artifacts; this one is a "
                            f"{manifest['runtime']['backend']} engine (use verify or bench)")
    from .artifact import check_files

    check_files(artifact, manifest)
    choose = _Chooser(artifact, manifest, sample, temperature, top_k, seed)
    tok_path = artifact / "tokenizer.json"
    if not tok_path.is_file():
        raise VQExportError(f"{artifact}: no tokenizer.json in the artifact (the model had none); generate needs text in and out")
    tok = Tokenizer.from_file(str(tok_path))
    ids = tok.encode(prompt).ids
    if not ids:
        raise VQExportError("the prompt is empty after tokenization; give some text")
    cfg = manifest["config"]
    limit = cfg.get("max_position", 2048)
    if len(ids) + max_new_tokens > limit:
        raise VQExportError(f"prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceeds the model's max_position {limit}")
    eos = set(cfg.get("eos_token_ids") or [])
    rt = manifest["runtime"]
    runner = runner_from_runtime(artifact / rt["model_file"], rt)
    # the new tokens are decoded after the prompt's last few: decoded alone, a SentencePiece-style decoder (Metaspace,
    # Llama's Strip) would drop the leading space of the first one, which is a word boundary after a prompt
    context = ids[-4:]
    lead = tok.decode(context)

    def text_of(new: list[int]) -> str:
        full = tok.decode(context + new)
        return full[len(lead):] if full.startswith(lead) else tok.decode(new)

    new: list[int] = []
    stopped = False
    with runner:
        x = np.asarray([ids], dtype=np.int64)
        mask = np.ones_like(x)
        out = runner.step(x, mask, runner.empty_past(1))
        shown = ""
        for _ in range(max_new_tokens):
            nxt = choose(out)
            if nxt in eos:
                stopped = True
                break
            new.append(nxt)
            if on_token is not None:
                text = text_of(new)
                if not text.endswith("\ufffd"):  # wait for a complete UTF-8 character
                    on_token(text[len(shown):])
                    shown = text
            if len(new) == max_new_tokens:  # its logits would go unused
                break
            mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
            out = runner.step(np.asarray([[nxt]], dtype=np.int64), mask, out.present)
    return Generation(prompt_ids=ids, new_ids=new, text=text_of(new), stopped_at_eos=stopped,
                      without_text=sum(tok.id_to_token(i) is None for i in new))

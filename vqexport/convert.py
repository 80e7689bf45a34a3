"""``convert``: a dense-head checkpoint -> a VQ-Logits checkpoint, seeded and deterministic.

    1. map       M = clustering of the head rows W [V, d] into K codes (vqexport.clustering: k-means, euclidean
                 or spherical, optionally size-balanced; with --clustering auto every method is measured on
                 held-out text and the lowest perplexity kept)
    2. codebook  C[k] = mean of the rows in code k
    3. bias      b[v] = b_dense[v] + (W[v] - C[M[v]]) . mean hidden state   (with --no-bias: none)
    3b. rank r   optional correction (h·Pᵀ)·Uᵀ: the best rank-r fit U P of the residual W - C[M]
    4. distill   optionally train C, b (and P, U) on a text file so the VQ head matches the dense model's
                 next-token distribution (KL), trunk frozen; with finetune_trunk the trunk trains too
                 (the map stays fixed), against a frozen copy of the dense model
    5. report    held-out perplexity of dense vs VQ and top-1 agreement, written into MODEL_CARD.md

Sources: a vqexport checkpoint whose head is dense (``head.type = "dense"``), or a local Hugging Face
Llama / Qwen2 directory (vqexport.hf), tied or untied embeddings, single or sharded safetensors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .artifact import staged_dir
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .clustering import METHODS, cluster
from .config import HeadConfig, ModelConfig
from .errors import VQExportError
from .model import VQLogitsLM, from_tensors, to_tensors
from .vq_init import head_from_assignment

SEQ = 128
MIN_TEXT_TOKENS = 4 * SEQ


@dataclass
class ConvertResult:
    out: Path
    report: dict


def _noop(label: str, done: int, total: int) -> None:
    pass


def _check_inputs(src: Path, k: int, out: Path, text: Path | None, rank: int = 0) -> Checkpoint:
    if out.exists():
        raise VQExportError(f"{out}: already exists; choose a new --out directory")
    from .hf import is_hf_dir, load_hf

    ckpt = load_hf(src) if src.is_dir() and is_hf_dir(src) else load_checkpoint(src)
    if ckpt.config.head.type != "dense":
        if rank:
            raise VQExportError(f"{src}: its head is already VQ-Logits, so --rank has no dense head to fit the correction against; "
                                "convert takes a checkpoint with a dense head")
        raise VQExportError(f"{src}: its head is already VQ-Logits; convert takes a checkpoint with a dense head")
    V, d = ckpt.config.vocab_size, ckpt.config.d_model
    if not 1 <= k <= V:
        raise VQExportError(f"--codebook-size must be in [1, vocab size {V}], got {k}")
    if not 0 <= rank <= min(V, d):
        raise VQExportError(f"--rank must be in [0, min(vocab size, d_model) = {min(V, d)}], got {rank}")
    if text is not None and ckpt.tokenizer_path is None:
        raise VQExportError(f"{src}: --distill-text needs the checkpoint's tokenizer.json")
    return ckpt


def _read_tokens(text: Path, tokenizer_path: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    try:
        raw = text.read_bytes()
    except OSError as e:
        raise VQExportError(f"{text}: cannot read distillation text ({e.strerror})") from None
    try:
        content = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VQExportError(f"{text}: not UTF-8 text (bad byte at offset {e.start})") from None
    ids = np.asarray(Tokenizer.from_file(str(tokenizer_path)).encode(content).ids, dtype=np.int64)
    if len(ids) < MIN_TEXT_TOKENS:
        raise VQExportError(f"{text}: too short for distillation ({len(ids)} tokens; need at least {MIN_TEXT_TOKENS})")
    return ids


def _windows(ids: np.ndarray) -> torch.Tensor:
    n = (len(ids) - 1) // SEQ
    return torch.from_numpy(ids[: n * SEQ + 1].copy())


def _batches(ids: torch.Tensor, batch: int, gen: torch.Generator):
    n = len(ids) - SEQ - 1
    while True:
        starts = torch.randint(n, (batch,), generator=gen)
        chunk = torch.stack([ids[s : s + SEQ + 1] for s in starts.tolist()])
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def _hidden(model: VQLogitsLM, x: torch.Tensor) -> torch.Tensor:
    return model.hidden(x, torch.ones_like(x), *model.empty_cache(x.shape[0]))[0]


@torch.no_grad()
def evaluate(dense: VQLogitsLM, vq: VQLogitsLM, ids: torch.Tensor, cache: dict | None = None, own_trunk: bool = False) -> dict:
    """Held-out perplexity of both models and top-1 agreement: the VQ head on the dense trunk's hidden states, or
    with ``own_trunk`` (after end-to-end fine-tuning) on its own trunk's. ``cache`` (a dict kept across calls with
    the same dense model and ids) saves the dense trunk's hidden states for the next call."""
    n = (len(ids) - 1) // SEQ
    x = ids[: n * SEQ].view(n, SEQ)
    y = ids[1 : n * SEQ + 1].view(n, SEQ)
    nll_d = nll_v = agree = kl = 0.0
    for i in range(0, n, 8):
        h = cache[i] if cache is not None and i in cache else _hidden(dense, x[i : i + 8])
        if cache is not None:
            cache[i] = h
        hv = _hidden(vq, x[i : i + 8]) if own_trunk else h
        ld, lv = F.log_softmax(dense.head(h), -1), F.log_softmax(vq.head(hv), -1)
        nll_d += float(F.nll_loss(ld.flatten(0, 1), y[i : i + 8].flatten(), reduction="sum"))
        nll_v += float(F.nll_loss(lv.flatten(0, 1), y[i : i + 8].flatten(), reduction="sum"))
        kl += float(F.kl_div(lv, ld, log_target=True, reduction="sum"))
        agree += float((ld.argmax(-1) == lv.argmax(-1)).sum())
    count = n * SEQ
    ppl_d, ppl_v = math.exp(nll_d / count), math.exp(nll_v / count)
    return {"dense_ppl": ppl_d, "vq_ppl": ppl_v, "ppl_change": ppl_v / ppl_d - 1, "top1_agreement": agree / count,
            "kl_to_dense": kl / count, "tokens": count}


def _vq_model(cfg: ModelConfig, k: int, bias: bool, trunk: dict, rank: int = 0) -> VQLogitsLM:
    vq_cfg = dataclasses.replace(cfg, head=HeadConfig(type="vq", codebook_size=k, bias=bias, rank=rank))
    model = VQLogitsLM(vq_cfg)
    model.load_state_dict(trunk, strict=False)
    return model.eval()


def _init_head(model: VQLogitsLM, weight: torch.Tensor, dense_bias, assign: torch.Tensor, mean_h: torch.Tensor) -> None:
    codebook, mapping, bias = head_from_assignment(weight, dense_bias, assign, model.head.codebook.shape[0], mean_h)
    with torch.no_grad():
        model.head.codebook.copy_(codebook)
        model.head.map.copy_(mapping)
        if model.head.bias is not None:
            model.head.bias.copy_(bias)


def init_lowrank(model: VQLogitsLM, weight: torch.Tensor, mean_h: torch.Tensor | None = None) -> dict:
    """U, P from the best rank-r fit of the residual E = W - C[M] (what the codebook misses): with the top r
    eigenvectors Q [d, r] of EᵀE (E's right singular vectors), P = Qᵀ [r, d] and U = E Q [V, r] = U_r S_r.
    The eigendecomposition is of a d x d matrix, so the cost is one pass over E, not an SVD of V x d.

    The bias was set so that the head equals the dense head at the mean hidden state h̄; the correction adds
    U P h̄ there, so that much comes off the bias again. Deterministic on one machine (each eigenvector's sign
    is fixed: largest |entry| positive); another BLAS may round differently. Returns the residual's size
    relative to W before and after the fit."""
    head = model.head
    r = head.lowrank_p.shape[0]
    with torch.no_grad():
        resid = weight.double() - head.codebook.double()[head.map.long()]
        _, vecs = torch.linalg.eigh(resid.T @ resid)  # ascending eigenvalues
        q = vecs[:, -r:].flip(1)  # [d, r], largest first
        sign = torch.sign(q[q.abs().argmax(0), torch.arange(r)])
        sign[sign == 0] = 1
        q = q * sign
        u = resid @ q
        head.lowrank_u.copy_(u.float())
        head.lowrank_p.copy_(q.T.float())
        if head.bias is not None and mean_h is not None:
            head.bias.sub_((u @ (q.T @ mean_h.double())).float())
        norm = float(weight.double().norm())
        after = float((resid - u @ q.T).norm())
    return {"residual_vs_weight": float(resid.norm()) / norm, "residual_after_lowrank_vs_weight": after / norm}


def _distill(dense: VQLogitsLM, vq: VQLogitsLM, ids: torch.Tensor, steps: int, seed: int, progress,
             finetune_trunk: bool = False) -> None:
    gen = torch.Generator().manual_seed(seed)
    if finetune_trunk:  # end to end: the VQ model's own trunk trains too (map fixed); the dense model is the teacher
        for p in vq.parameters():
            p.requires_grad_(True)
        opt = torch.optim.Adam([{"params": [p for n, p in vq.named_parameters() if n.startswith("head.")], "lr": 3e-3},
                                {"params": [p for n, p in vq.named_parameters() if not n.startswith("head.")], "lr": 1e-4}])
        vq.train()
    else:
        params = [p for p in vq.head.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=3e-3)
    it = _batches(ids, 8, gen)
    for step in range(steps):
        x, _ = next(it)
        h = _hidden(dense, x)
        with torch.no_grad():
            target = F.log_softmax(dense.head(h), -1)
        if finetune_trunk:
            h = vq.hidden(x, torch.ones_like(x), *vq.empty_cache(x.shape[0]))[0]
        loss = F.kl_div(F.log_softmax(vq.head(h), -1), target, log_target=True, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(f"distilling (KL {loss.item():.3f})", step + 1, steps)
    vq.eval()
    for p in vq.parameters():
        p.requires_grad_(False)


def convert(src, codebook_size: int, out, bias: bool = True, distill_text=None, steps: int = 300, seed: int = 0,
            clustering: str = "auto", rank: int = 0, finetune_trunk: bool = False, progress=_noop) -> ConvertResult:
    """Convert the dense-head checkpoint ``src`` into a VQ-Logits checkpoint at ``out`` (written atomically);
    ``rank`` > 0 adds the rank-r correction (SVD of the residual, then distilled with the rest of the head)."""
    src, out = Path(src), Path(out)
    text = Path(distill_text) if distill_text is not None else None
    if clustering not in ("auto", *METHODS):
        raise VQExportError(f"--clustering must be one of auto, {', '.join(METHODS)}; got {clustering!r}")
    if steps < 0:
        raise VQExportError(f"--steps must be >= 0, got {steps}")
    if finetune_trunk and (distill_text is None or steps == 0):
        raise VQExportError("--finetune-trunk trains on text: give --distill-text FILE and --steps N > 0")
    if not isinstance(rank, int) or isinstance(rank, bool):
        raise VQExportError(f"--rank must be an integer, got {rank!r}")
    ckpt = _check_inputs(src, codebook_size, out, text, rank)
    ids = _read_tokens(text, ckpt.tokenizer_path) if text is not None else None
    torch.manual_seed(seed)
    dense = from_tensors(ckpt.config, ckpt.tensors)
    for p in dense.parameters():
        p.requires_grad_(False)
    trunk = {k: v for k, v in dense.state_dict().items() if not k.startswith("head.")}
    weight = dense.head.weight.detach().float()
    dense_bias = dense.head.bias.detach().float() if dense.head.bias is not None else None

    held = train = None
    if ids is not None:
        cut = int(len(ids) * 0.9)
        train, held = _windows(ids[:cut]), _windows(ids[cut:])
        if len(held) <= SEQ + 1 or len(train) <= SEQ + 1:
            raise VQExportError(f"{text}: too short to split into training and held-out text")
        sample = next(_batches(train, 16, torch.Generator().manual_seed(seed)))[0]
        mean_h = _hidden(dense, sample).reshape(-1, weight.shape[1]).mean(0)
    else:
        mean_h = torch.zeros(weight.shape[1])

    variants = list(METHODS) if clustering == "auto" else [clustering]
    scores, shared, held_h = {}, {}, {}  # shared: the balanced variants start from the k-means of their geometry
    chosen, vq = None, None  # only the best model so far is kept (each holds a copy of the trunk)
    for i, name in enumerate(variants):
        progress(f"clustering {weight.shape[0]} rows into {codebook_size} codes ({name})", i, len(variants))
        assign = cluster(weight, codebook_size, name, seed=seed, _cache=shared)
        model = _vq_model(ckpt.config, codebook_size, bias, trunk)
        _init_head(model, weight, dense_bias, assign, mean_h)
        scores[name] = evaluate(dense, model, held, held_h)["vq_ppl"] if held is not None else _reconstruction_error(weight, model)
        if chosen is None or scores[name] < scores[chosen]:
            chosen, vq = name, model
    shared.clear()
    lowrank = None
    if rank:
        progress(f"fitting the rank-{rank} correction to the residual", 0, 1)
        plain = vq
        vq = _vq_model(ckpt.config, codebook_size, bias, trunk, rank)
        vq.load_state_dict(plain.state_dict(), strict=False)
        lowrank = init_lowrank(vq, weight, mean_h)
    before = evaluate(dense, vq, held, held_h) if held is not None else None
    if ids is not None and steps:
        _distill(dense, vq, train, steps, seed, progress, finetune_trunk=finetune_trunk)
    after = evaluate(dense, vq, held, held_h, own_trunk=finetune_trunk) if held is not None else None
    report = {"source": str(src.resolve()), "codebook_size": codebook_size, "bias": bias, "rank": rank, "clustering": chosen,
              "clustering_scores": scores,
              "clustering_score": "held-out perplexity" if held is not None else "mean squared distance of head rows to their code",
              "distill_steps": steps if ids is not None else 0, "finetune_trunk": finetune_trunk, "lowrank_init": lowrank,
              "seed": seed, "before_distillation": before, "after_distillation": after}
    _write(out, vq, ckpt, report)
    return ConvertResult(out=out, report=report)


def _reconstruction_error(weight: torch.Tensor, model: VQLogitsLM) -> float:
    """Without text: mean squared distance of the head rows to their codebook rows."""
    with torch.no_grad():
        return float((weight - model.head.codebook[model.head.map.long()]).pow(2).sum(1).mean())


def _write(out: Path, vq: VQLogitsLM, ckpt: Checkpoint, report: dict) -> None:
    with staged_dir(out) as tmp:
        save_checkpoint(tmp, vq.cfg, to_tensors(vq), tokenizer_path=ckpt.tokenizer_path,
                        extra_files={"MODEL_CARD.md": model_card(report, vq.cfg)})


def model_card(report: dict, cfg: ModelConfig) -> str:
    V, d, K, r = cfg.vocab_size, cfg.d_model, cfg.head.codebook_size, cfg.head.rank
    head_vq = K * d + (V if cfg.head.bias else 0) + r * (V + d)
    head_dense = V * d + V
    lines = [
        "# VQ-Logits conversion", "",
        f"Converted from `{report['source']}` by `vqexport convert` (seed {report['seed']}).", "",
        "| | |", "|---|---|",
        f"| codebook | K = {K} codes for V = {V} tokens (clustering: {report['clustering']}) |",
        f"| bias | {'per-token bias' if cfg.head.bias else 'none'} |",
        f"| low-rank correction | {f'rank {r}: P [{r}, {d}], U [{V}, {r}], fitted to the residual W - C[M], then distilled' if r else 'none'} |",
        f"| head parameters | {head_vq:,} vs {head_dense:,} dense ({100 * (1 - head_vq / head_dense):.1f}% fewer) |",
        f"| {'end-to-end fine-tuning (trunk + head, map fixed)' if report.get('finetune_trunk') else 'head-only distillation'} | "
        f"{report['distill_steps']} steps |", "",
    ]
    for label, key in (("after conversion", "before_distillation"), ("after distillation", "after_distillation")):
        r = report.get(key)
        if r:
            lines.append(f"Held-out ({r['tokens']} tokens), {label}: dense ppl {r['dense_ppl']:.2f}, VQ ppl {r['vq_ppl']:.2f} "
                         f"({100 * r['ppl_change']:+.1f}%), top-1 agreement {r['top1_agreement']:.3f}, "
                         f"KL(dense || VQ) {r['kl_to_dense']:.4f} nats/token.")
    if not report.get("after_distillation"):
        lines.append("No text was given, so no perplexity was measured.")
    return "\n".join(lines) + "\n"

"""The reference decoder-only transformer with a VQ-Logits head, readable top to bottom.

    h       = trunk(input_ids, attention_mask, past)         # [B, S, d]
    z       = h @ C.T                                        # [B, S, K]   codebook logits
    logits  = z[..., M] (+ b) (+ (h @ P.T) @ U.T)            # [B, S, V]   optional rank-r correction

The KV cache is a flat tuple ``(k0, v0, k1, v1, ...)`` with each tensor [B, n_kv_heads, past, head_dim],
the same layout the exported ONNX graph uses for ``past_key_values.{i}.key|value``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class VQLogitsHead(nn.Module):
    """``logits[..., v] = (h @ C.T)[..., M[v]] + b[v] + ((h @ P.T) @ U.T)[..., v]`` as a sum of terms (codebook
    term, bias term, rank-r correction term).

    C (``codebook`` [K, d]), b (``bias`` [V]), P (``lowrank_p`` [r, d]) and U (``lowrank_u`` [V, r]) are trained;
    M (``map`` [V] int32, values in [0, K)) is fixed. Rank 0 has no correction tensors at all.
    """

    def __init__(self, d_model: int, vocab_size: int, codebook_size: int, bias: bool = True, rank: int = 0):
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(codebook_size, d_model))
        self.register_buffer("map", torch.zeros(vocab_size, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        self.lowrank_p = nn.Parameter(torch.empty(rank, d_model)) if rank else None
        self.lowrank_u = nn.Parameter(torch.zeros(vocab_size, rank)) if rank else None
        nn.init.normal_(self.codebook, std=d_model**-0.5)
        if rank:  # U = 0: a fresh correction starts as the plain head
            nn.init.normal_(self.lowrank_p, std=d_model**-0.5)

    def codebook_logits(self, h: torch.Tensor) -> torch.Tensor:
        return torch.matmul(h, self.codebook.t())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.index_select(self.codebook_logits(h), -1, self.map)
        if self.bias is not None:
            logits = logits + self.bias
        if self.lowrank_p is not None:
            logits = logits + self.correction(h)
        return logits

    def correction(self, h: torch.Tensor) -> torch.Tensor:
        """The rank-r term ``(h @ P.T) @ U.T`` [..., V]."""
        return torch.matmul(torch.matmul(h, self.lowrank_p.t()), self.lowrank_u.t())


class DenseHead(nn.Module):
    """A plain output layer ``logits = h @ W.T (+ b)``: the baseline VQ-Logits is compared against."""

    def __init__(self, d_model: int, vocab_size: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        nn.init.normal_(self.weight, std=d_model**-0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.matmul(h, self.weight.t())
        if self.bias is not None:
            logits = logits + self.bias
        return logits


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (half-split layout) on x [B, H, S, hd]; cos/sin [B, 1, S, hd/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def make_norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.linear_bias)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None:  # rotary positions (learned positions were added to the embeddings instead)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = torch.cat([past_k, k], dim=2)
        v = torch.cat([past_v, v], dim=2)
        present = (k, v)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.head_dim**-0.5
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1), v)
        out = out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim)
        return self.o_proj(out), present


class MLP(nn.Module):
    """SwiGLU (gate/up/down) or GPT-2's tanh-GELU (fc/proj)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        b = cfg.linear_bias
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=b)
            self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=b)
            self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=b)
        else:
            self.fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=b)
            self.proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=b)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        a, present = self.attn(self.attn_norm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        return x + self.mlp(self.mlp_norm(x)), present


def make_head(cfg: ModelConfig) -> nn.Module:
    if cfg.head.type == "vq":
        return VQLogitsHead(cfg.d_model, cfg.vocab_size, cfg.head.codebook_size, cfg.head.bias, cfg.head.rank)
    return DenseHead(cfg.d_model, cfg.vocab_size, cfg.head.bias)


class VQLogitsLM(nn.Module):
    """Decoder-only LM. ``forward(input_ids, attention_mask, *past) -> (logits, *present)``.

    ``attention_mask`` [B, past + S] marks real tokens with 1; positions are ``cumsum(mask) - 1`` so that
    left-padded batches get the same positions as unpadded ones.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_position, cfg.d_model) if cfg.position == "learned" else None
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = make_head(cfg)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    def empty_cache(self, batch: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
        shape = (batch, self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        device = self.embed.weight.device
        return tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * self.cfg.n_layers))

    def hidden(self, input_ids, attention_mask, *past):
        """The trunk: final normed hidden states [B, S, d] and the new cache."""
        s = input_ids.shape[1]
        total = attention_mask.shape[1]
        keep = attention_mask.to(torch.bool)
        positions = (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0)[:, total - s :]
        cos = sin = None
        if self.pos_embed is None:
            angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [B, S, hd/2]
            cos, sin = angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)
        # query i sits at absolute index (total - s + i) and sees keys j <= that index that are not padding.
        q_idx = torch.arange(s, device=input_ids.device) + (total - s)
        k_idx = torch.arange(total, device=input_ids.device)
        causal = k_idx.unsqueeze(0) <= q_idx.unsqueeze(1)  # [S, T]
        mask = causal.unsqueeze(0).unsqueeze(0) & keep.unsqueeze(1).unsqueeze(2)  # [B, 1, S, T]
        x = self.embed(input_ids)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        present = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, past[2 * i], past[2 * i + 1])
            present.extend(kv)
        return self.norm(x), tuple(present)

    def forward(self, input_ids, attention_mask, *past):
        h, present = self.hidden(input_ids, attention_mask, *past)
        return (self.head(h), *present)


def from_tensors(cfg: ModelConfig, tensors: dict) -> VQLogitsLM:
    """Build the reference model from checkpoint tensors (numpy or torch), in float32, eval mode."""
    model = VQLogitsLM(cfg)
    state = {k: torch.as_tensor(v) for k, v in tensors.items()}
    if "head.map" in state:
        state["head.map"] = state["head.map"].to(torch.int32)
    model.load_state_dict(state, strict=True)
    return model.eval()


def to_tensors(model: VQLogitsLM) -> dict:
    """The model's tensors under checkpoint names, as numpy arrays."""
    return {k: v.detach().cpu().contiguous().numpy() for k, v in model.state_dict().items()}

"""The reference model: head math, gradients, KV cache, padding."""

import numpy as np
import pytest
import torch

from vqexport.model import VQLogitsHead, from_tensors

from .conftest import make_config, make_tensors


def test_vq_head_matches_definition():
    torch.manual_seed(0)
    head = VQLogitsHead(d_model=8, vocab_size=50, codebook_size=5, bias=True)
    head.map.copy_(torch.randint(0, 5, (50,), dtype=torch.int32))
    torch.nn.init.normal_(head.bias)
    h = torch.randn(2, 3, 8)
    z = h @ head.codebook.T
    expected = torch.stack([z[..., int(head.map[v])] + head.bias[v] for v in range(50)], dim=-1)
    torch.testing.assert_close(head(h), expected)


def test_vq_head_without_bias_has_no_bias_parameter():
    head = VQLogitsHead(8, 50, 5, bias=False)
    assert head.bias is None
    assert [n for n, _ in head.named_parameters()] == ["codebook"]


def test_gradients_reach_codebook_and_bias_not_map():
    torch.manual_seed(0)
    head = VQLogitsHead(8, 30, 4, bias=True)
    head.map.copy_(torch.arange(30, dtype=torch.int32) % 4)
    loss = torch.nn.functional.cross_entropy(head(torch.randn(5, 8)), torch.randint(0, 30, (5,)))
    loss.backward()
    assert head.codebook.grad is not None and head.codebook.grad.abs().sum() > 0
    assert head.bias.grad is not None and head.bias.grad.abs().sum() > 0
    assert not head.map.requires_grad and "map" in dict(head.named_buffers())


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_incremental_decoding_matches_full_forward(kv_heads):
    cfg = make_config(kv_heads=kv_heads)
    model = from_tensors(cfg, make_tensors(cfg))
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(ids, torch.ones_like(ids), *model.empty_cache(2))[0]
        out = model(ids[:, :5], torch.ones(2, 5, dtype=torch.int64), *model.empty_cache(2))
        pieces = [out[0]]
        for t in range(5, 9):
            out = model(ids[:, t : t + 1], torch.ones(2, t + 1, dtype=torch.int64), *out[1:])
            pieces.append(out[0])
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_same_logits_as_no_padding():
    cfg = make_config()
    model = from_tensors(cfg, make_tensors(cfg))
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.int64), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = model(ids, torch.ones_like(ids), *model.empty_cache(1))[0]
        b = model(padded, mask, *model.empty_cache(1))[0][:, 3:]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)

"""The head's torch module and its numpy definition; the trunk reference's KV cache and padding (transformers' own)."""

import numpy as np
import pytest
import torch

from vqexport.head.module import VQLogitsHead
from vqexport.head.spec import HeadConfig
from vqexport.source import load_source
from vqexport.trunk.hf import make_trunk

from .models import make_model, random_head


def test_vq_head_matches_definition():
    torch.manual_seed(0)
    head = random_head(50, 8, 5, bias=True, rank=2)
    module = VQLogitsHead.from_head(head)
    h = torch.randn(2, 3, 8)
    z = h @ module.codebook.T
    expected = torch.stack([z[..., int(module.map[v])] + module.bias[v] for v in range(50)], dim=-1)
    expected = expected + (h @ module.lowrank_p.T) @ module.lowrank_u.T
    torch.testing.assert_close(module(h), expected)
    np.testing.assert_allclose(head.logits(h.numpy()), expected.detach().numpy(), atol=1e-5)


def test_round_trip_through_the_files_format():
    head = random_head(40, 6, 4, bias=True, rank=3)
    back = VQLogitsHead.from_head(head).to_head()
    assert back.config == head.config
    for k, v in head.tensors.items():
        np.testing.assert_array_equal(back.tensors[k], v)


def test_vq_head_without_bias_has_no_bias_parameter():
    head = VQLogitsHead(HeadConfig(vocab_size=50, hidden_size=8, codebook_size=5, bias=False))
    assert head.bias is None
    assert [n for n, _ in head.named_parameters()] == ["codebook"]


def test_gradients_reach_codebook_bias_and_factors_not_map():
    torch.manual_seed(0)
    head = VQLogitsHead(HeadConfig(vocab_size=30, hidden_size=8, codebook_size=4, bias=True, rank=2))
    head.map.copy_(torch.arange(30) % 4)
    with torch.no_grad():
        head.lowrank_u.normal_()
    loss = torch.nn.functional.cross_entropy(head(torch.randn(5, 8)), torch.randint(0, 30, (5,)))
    loss.backward()
    for p in (head.codebook, head.bias, head.lowrank_p, head.lowrank_u):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not head.map.requires_grad and "map" in dict(head.named_buffers())



def test_gradients_equal_those_of_the_written_out_formula():
    """The module adds its terms in place; autograd must give what z[..., M] + b + (h P^T) U^T gives."""
    torch.manual_seed(0)
    module = VQLogitsHead.from_head(random_head(50, 8, 5, bias=True, rank=3)).train()
    h = torch.randn(2, 3, 8)
    target = torch.randint(0, 50, (6,))
    params = [module.codebook, module.bias, module.lowrank_p, module.lowrank_u]
    written = (h @ module.codebook.T)[..., module.map] + module.bias + (h @ module.lowrank_p.T) @ module.lowrank_u.T
    expected = torch.autograd.grad(torch.nn.functional.cross_entropy(written.flatten(0, 1), target), params)
    got = torch.autograd.grad(torch.nn.functional.cross_entropy(module(h).flatten(0, 1), target), params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    source = load_source(make_model(tmp_path_factory.mktemp("m") / "model", kv_heads=1))
    return make_trunk(source), source.geometry


def test_incremental_decoding_matches_full_forward(trunk):
    trunk, geo = trunk
    ids = torch.randint(0, geo.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    empty = trunk.empty_past(2)
    with torch.no_grad():
        full = trunk(ids, torch.ones_like(ids), *empty)[0]
        out = trunk(ids[:, :5], torch.ones(2, 5, dtype=torch.int64), *empty)
        pieces = [out[0]]
        for t in range(5, 9):
            out = trunk(ids[:, t : t + 1], torch.ones(2, t + 1, dtype=torch.int64), *out[1:])
            pieces.append(out[0])
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


def test_left_padding_gives_the_same_hidden_states_as_no_padding(trunk):
    trunk, geo = trunk
    ids = torch.randint(0, geo.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.int64), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = trunk(ids, torch.ones_like(ids), *trunk.empty_past(1))[0]
        b = trunk(padded, mask, *trunk.empty_past(1))[0][:, 3:]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


@pytest.mark.parametrize("floats", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_a_head_file_in_half_precision_with_an_int64_map_reads_and_builds_like_f32(tmp_path, floats):
    """vq_head.safetensors may hold its floats as f16 or bf16 and the map as int64: read, evaluated and built, such a
    head equals the f32 / int32 one (whose values are the half-precision ones, so the two are the same head)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from vqexport import api
    from vqexport.backends.ort.runner import OrtRunner
    from vqexport.build import reference_runner
    from vqexport.head.spec import WEIGHTS_FILE, read_head

    f32 = make_model(tmp_path / "f32", rank=2)
    tensors = load_file(str(f32 / WEIGHTS_FILE))
    rounded = {k: v if k == "map" else v.to(floats).float() for k, v in tensors.items()}  # f32 of the half values
    assert any(not torch.equal(rounded[k], tensors[k]) for k in rounded if k != "map")  # the rounding changed values
    save_file(rounded, str(f32 / WEIGHTS_FILE))
    half = shutil.copytree(f32, tmp_path / "half")
    save_file({k: v.long() if k == "map" else v.to(floats) for k, v in rounded.items()}, str(half / WEIGHTS_FILE))
    assert {str(v.dtype) for v in load_file(str(half / WEIGHTS_FILE)).values()} == {str(floats), "torch.int64"}

    a, b = read_head(f32), read_head(half)
    assert b.config == a.config and set(b.tensors) == set(a.tensors) == {"codebook", "map", "bias", "lowrank_p", "lowrank_u"}
    for name, value in a.tensors.items():
        assert b.tensors[name].dtype == value.dtype  # float32, and the map int32
        np.testing.assert_array_equal(b.tensors[name], value)
    h = np.random.default_rng(0).standard_normal((2, 3, 32)).astype(np.float32)
    np.testing.assert_array_equal(b.logits(h), a.logits(h))

    result = api.build("ort", model=half, out=tmp_path / "art", steps=2)
    assert result.parity.passed and result.parity.max_abs_diff <= 1e-4
    ids = np.array([[3, 50, 7, 96, 12]])
    with reference_runner(load_source(f32)) as ref, OrtRunner.from_artifact(result.out) as art:
        want = ref.step(ids, np.ones_like(ids), ref.empty_past(1)).logits
        got = art.step(ids, np.ones_like(ids), art.empty_past(1)).logits
    np.testing.assert_allclose(got, want, atol=1e-4)

"""Linear-cost token mixing: equals dense efficient attention, chunking does not change
it, no dependence on token order, padding ignored, positions only from coordinates."""

from __future__ import annotations

import pytest
import torch

from napari_dismm.model.mixing import EfficientAttention, TokenMixer, normalise_coords


def dense_efficient_attention(attn: EfficientAttention, x: torch.Tensor) -> torch.Tensor:
    """Shen et al.'s formula written directly per head, on the whole bag at once."""
    h = attn.n_heads
    k, v = attn.to_kv(x).chunk(2, dim=-1)
    q = attn.to_q(x)
    outs = []
    for qh, kh, vh in zip(q.chunk(h, -1), k.chunk(h, -1), v.chunk(h, -1)):
        outs.append(qh.softmax(dim=-1) @ (kh.softmax(dim=0).T @ vh))
    return attn.to_out(torch.cat(outs, dim=-1))


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_attention_equals_dense_formula(chunk: int) -> None:
    torch.manual_seed(0)
    attn = EfficientAttention(16, n_heads=4, chunk_size=chunk)
    x = torch.randn(150, 16) * 4  # large scores exercise the running-max rescaling
    torch.testing.assert_close(attn(x), dense_efficient_attention(attn, x), rtol=1e-4, atol=1e-5)


def test_chunked_attention_gradients_match_dense() -> None:
    torch.manual_seed(1)
    attn = EfficientAttention(8, n_heads=2, chunk_size=5)
    x = torch.randn(33, 8, requires_grad=True)
    g_chunked = torch.autograd.grad(attn(x).square().sum(), x)[0]
    g_dense = torch.autograd.grad(dense_efficient_attention(attn, x).square().sum(), x)[0]
    torch.testing.assert_close(g_chunked, g_dense, rtol=1e-4, atol=1e-5)


def test_mixer_is_permutation_equivariant_with_coords() -> None:
    torch.manual_seed(2)
    mixer = TokenMixer(16, n_layers=2, chunk_size=13).eval()
    x, xy = torch.randn(60, 16), torch.randint(0, 5000, (60, 2))
    perm = torch.randperm(60)
    torch.testing.assert_close(mixer.mix_bag(x[perm], coords=xy[perm]), mixer.mix_bag(x, coords=xy)[perm])


def test_coordinates_change_the_output_but_token_order_alone_does_not() -> None:
    torch.manual_seed(3)
    mixer = TokenMixer(8).eval()
    x, xy = torch.randn(20, 8), torch.randint(0, 1000, (20, 2))
    moved = xy.flip(0)  # the same set of positions handed to other tokens
    assert not torch.allclose(mixer.mix_bag(x, coords=xy), mixer.mix_bag(x, coords=moved))
    assert not torch.allclose(mixer.mix_bag(x, coords=xy), mixer.mix_bag(x))


def test_padded_batch_equals_bags_alone() -> None:
    torch.manual_seed(4)
    mixer = TokenMixer(8).eval()
    a, b = torch.randn(9, 8), torch.randn(4, 8)
    xy = torch.randint(0, 100, (2, 9, 2))
    batch = torch.full((2, 9, 8), 50.0)
    batch[0], batch[1, :4] = a, b
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0], mask[1, :4] = True, True
    out = mixer(batch, mask=mask, coords=xy)
    torch.testing.assert_close(out[0], mixer.mix_bag(a, coords=xy[0]))
    torch.testing.assert_close(out[1, :4], mixer.mix_bag(b, coords=xy[1, :4]))
    assert torch.all(out[1, 4:] == 0)


def test_normalised_coords_are_unit_and_order_free() -> None:
    xy = torch.tensor([[100, 200], [612, 200], [100, 456]])
    unit = normalise_coords(xy)
    assert unit.min() == 0 and unit.max() == 1
    torch.testing.assert_close(normalise_coords(xy[[2, 0, 1]]), unit[[2, 0, 1]])
    assert normalise_coords(torch.zeros(1, 2)).abs().sum() == 0  # one patch: no division by 0


def test_empty_bag_passes_through() -> None:
    assert TokenMixer(8).mix_bag(torch.zeros(0, 8), coords=torch.zeros(0, 2)).shape == (0, 8)

"""The reference ops against independent, loop-level statements of the spec (mae-spec.md)."""

import math

import pytest
import torch

from mae_fast import reference


@pytest.mark.parametrize("shape,p", [((2, 3, 8, 12), 4), ((1, 1, 28, 14), 14), ((3, 2, 6, 6), 3), ((1, 3, 16, 16), 16)])
def test_patchify_matches_loop_definition_and_round_trips(shape, p):
    imgs = torch.randn(shape, dtype=torch.float64)
    b, c, h, w = shape
    gh, gw = h // p, w // p
    patches = reference.patchify(imgs, p)
    assert patches.shape == (b, gh * gw, p * p * c)
    for r in range(gh):
        for s in range(gw):
            for i in range(p):
                for j in range(p):
                    expected = imgs[:, :, r * p + i, s * p + j]  # [B, C]
                    got = patches[:, r * gw + s, (i * p + j) * c : (i * p + j + 1) * c]
                    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(reference.unpatchify(patches, p, (gh, gw), c), imgs, rtol=0, atol=0)


def test_random_masking_invariants():
    b, length = 5, 37
    noise = torch.rand(b, length)
    for ratio in (0.0, 0.5, 0.75, 0.97):
        k = reference.num_kept(length, ratio)
        ids_keep, ids_restore, mask = reference.random_masking(noise, k)
        assert ids_keep.shape == (b, k) and ids_restore.shape == (b, length) and mask.shape == (b, length)
        ids_shuffle = torch.argsort(noise, dim=1)
        # ids_restore inverts ids_shuffle
        torch.testing.assert_close(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(length).expand(b, -1))
        # each row removes exactly L - K patches, kept ones are the K smallest noises
        assert torch.all(mask.sum(1) == length - k)
        kept_sorted = torch.sort(ids_keep, dim=1).values
        smallest = torch.sort(torch.topk(noise, k, dim=1, largest=False).indices, dim=1).values
        torch.testing.assert_close(kept_sorted, smallest)
        assert torch.all(torch.gather(mask, 1, ids_keep) == 0)
        # ids_keep follows ascending noise, as the release's ids_shuffle[:, :K]
        kept_noise = torch.gather(noise, 1, ids_keep)
        assert torch.all(kept_noise[:, 1:] >= kept_noise[:, :-1])


def test_random_masking_ties_go_to_lower_index():
    noise = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.5]])
    ids_keep, ids_restore, mask = reference.random_masking(noise, 3)
    assert ids_keep.tolist() == [[1, 3, 0]]
    assert ids_restore.tolist() == [[2, 0, 3, 1, 4]]
    assert mask.tolist() == [[0.0, 0.0, 1.0, 0.0, 1.0]]


def test_num_kept_floors_like_the_release():
    assert reference.num_kept(196, 0.75) == 49
    assert reference.num_kept(256, 0.75) == 64
    assert reference.num_kept(10, 0.66) == 3


def _spec_1d(dim, position):
    """mae-spec.md: [sin(pos * w_k) for k < dim/2] ++ [cos(pos * w_k) for k < dim/2], w_k = 1/10000^(k/(dim/2))."""
    quarter = dim // 2
    freqs = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    return [math.sin(position * f) for f in freqs] + [math.cos(position * f) for f in freqs]


@pytest.mark.parametrize("dim,grid", [(16, (3, 5)), (8, (2, 2)), (32, (4, 1))])
def test_sincos_table_matches_spec_formula(dim, grid):
    table = reference.sincos_pos_embed_2d(dim, grid, cls_token=True)
    gh, gw = grid
    assert table.shape == (gh * gw + 1, dim) and table.dtype == torch.float32
    assert torch.all(table[0] == 0)
    for r in range(gh):
        for c in range(gw):
            expected = _spec_1d(dim // 2, c) + _spec_1d(dim // 2, r)  # column first, then row
            torch.testing.assert_close(table[1 + r * gw + c], torch.tensor(expected, dtype=torch.float32))


def test_sincos_rejects_bad_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        reference.sincos_pos_embed_2d(10, (2, 2))


def test_patch_embed_gather_equals_conv_then_gather():
    imgs = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    weight = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    pos = torch.randn(1, 6, 5, dtype=torch.float64)
    ids = torch.tensor([[4, 0], [1, 5]])
    conv = torch.nn.functional.conv2d(imgs, weight, bias, stride=4).flatten(2).transpose(1, 2) + pos
    expected = torch.stack([conv[b, ids[b]] for b in range(2)])
    torch.testing.assert_close(reference.patch_embed_gather(imgs, ids, weight, bias, pos), expected)


def test_unshuffle_mask_tokens_places_tokens_in_original_order():
    b, length, dim, k = 2, 6, 3, 2
    noise = torch.rand(b, length)
    ids_keep, ids_restore, mask = reference.random_masking(noise, k)
    x = torch.randn(b, k + 1, dim, dtype=torch.float64)
    token = torch.randn(1, 1, dim, dtype=torch.float64)
    out = reference.unshuffle_mask_tokens(x, token, ids_restore, None)
    assert out.shape == (b, length + 1, dim)
    for i in range(b):
        torch.testing.assert_close(out[i, 0], x[i, 0])
        for slot, patch in enumerate(ids_keep[i].tolist()):
            torch.testing.assert_close(out[i, 1 + patch], x[i, 1 + slot])
        for patch in torch.nonzero(mask[i]).flatten().tolist():
            torch.testing.assert_close(out[i, 1 + patch], token[0, 0])


def test_masked_mse_loss_by_hand():
    imgs = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    pred = torch.randn(2, 4, 4, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    target = reference.patchify(imgs, 2)
    normed = (target - target.mean(-1, keepdim=True)) / torch.sqrt(target.var(-1, unbiased=True, keepdim=True) + 1e-6)
    per_patch = ((pred - normed) ** 2).mean(-1)
    expected = (per_patch[0, 0] + per_patch[0, 3] + per_patch[1, 1]) / 3
    torch.testing.assert_close(reference.masked_mse_loss(pred, imgs, mask, 2).double(), expected)
    raw = ((pred - target) ** 2).mean(-1)
    expected_raw = (raw[0, 0] + raw[0, 3] + raw[1, 1]) / 3
    torch.testing.assert_close(reference.masked_mse_loss(pred, imgs, mask, 2, norm_pix=False).double(), expected_raw)


def test_attention_and_varlen_agree_with_softmax_definition():
    q, k, v = (torch.randn(2, 5, 3, 4, dtype=torch.float64) for _ in range(3))
    out, lse = reference.attention(q, k, v)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / 2.0
    expected = torch.einsum("bhnm,bmhd->bnhd", torch.softmax(scores, -1), v)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    lengths = [3, 1, 0, 4]
    total = sum(lengths)
    qp, kp, vp = (torch.randn(total, 2, 4, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 3, 4, 4, 8], dtype=torch.int32)
    packed, _ = reference.varlen_attention(qp, kp, vp, cu)
    for start, end in ((0, 3), (3, 4), (4, 8)):
        alone, _ = reference.attention(qp[None, start:end], kp[None, start:end], vp[None, start:end])
        torch.testing.assert_close(packed[start:end], alone[0])


def test_int32_ids_are_accepted_like_int64():
    from mae_fast import ops

    imgs = torch.randn(2, 3, 8, 8)
    ids = torch.tensor([[3, 0], [1, 2]])
    expected = ops.patchify_gather(imgs, ids, 4, backend="reference")
    torch.testing.assert_close(ops.patchify_gather(imgs, ids.int(), 4, backend="reference"), expected)
    x = torch.randn(2, 3, 5)
    restore = torch.tensor([[1, 2, 0, 3], [0, 1, 2, 3]])
    token = torch.randn(5)
    torch.testing.assert_close(
        ops.unshuffle_mask_tokens(x, token, restore.int(), backend="reference"),
        ops.unshuffle_mask_tokens(x, token, restore, backend="reference"),
    )

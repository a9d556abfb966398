"""nn.Block's stochastic depth is timm's DropPath: same draws and outputs as timm's Block, same state-dict
names, and a clear refusal to train with it on packed [T, D] tokens (which have no sample dim)."""

import pytest
import torch
from timm.layers import DropPath
from timm.models.vision_transformer import Block as TimmBlock

from mae_fast.nn import Block

DIM, HEADS = 32, 2


def test_block_uses_timm_drop_path_with_unchanged_state_dict_names():
    dropped = Block(DIM, HEADS, drop_path=0.3, backend="reference")
    plain = Block(DIM, HEADS, backend="reference")
    assert isinstance(dropped.drop_path1, DropPath) and isinstance(dropped.drop_path2, DropPath)
    assert dropped.drop_path1.drop_prob == 0.3
    assert isinstance(plain.drop_path1, torch.nn.Identity)
    timm_names = set(TimmBlock(DIM, HEADS, qkv_bias=True).state_dict())
    assert set(dropped.state_dict()) == set(plain.state_dict()) == timm_names


def test_training_drop_path_draws_per_sample_as_timm():
    timm_block = TimmBlock(DIM, HEADS, qkv_bias=True, drop_path=0.5).train()
    block = Block(DIM, HEADS, drop_path=0.5, backend="reference").train()
    block.load_state_dict(timm_block.state_dict(), strict=True)
    x = torch.randn(16, 5, DIM)
    torch.manual_seed(3)
    expected = timm_block(x)
    torch.manual_seed(3)
    got = block(x)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    # per sample: a sample that drops both branches comes out as it went in; at p = 0.5 some of 16 do
    dropped_both = torch.isclose(got, x).flatten(1).all(1)
    assert 0 < int(dropped_both.sum()) < 16


def test_packed_training_with_drop_path_is_refused():
    block = Block(DIM, HEADS, drop_path=0.1, backend="reference")
    packed = torch.randn(7, DIM)
    cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"drop_path=0.1 .*\[B, N, D\]"):
        block.train()(packed, cu_seqlens, 4)
    # eval, or drop_path 0 (pretraining), runs packed input
    block.eval()(packed, cu_seqlens, 4)
    Block(DIM, HEADS, backend="reference").train()(packed, cu_seqlens, 4)


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_block_rejects_drop_path_outside_unit_interval(rate):
    with pytest.raises(ValueError, match=r"drop_path must be in \[0, 1\)"):
        Block(DIM, HEADS, drop_path=rate)

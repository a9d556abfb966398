"""The backend dispatcher: selection per call / per model / globally, and readable refusals."""

import pytest
import torch

import mae_fast
from mae_fast import dispatch, ops


def test_every_hot_op_has_a_reference_backend():
    for op in (
        "patchify",
        "unpatchify",
        "patchify_gather",
        "patch_embed_gather",
        "unshuffle_mask_tokens",
        "masked_mse_loss",
        "random_masking",
        "visible_attention",
        "qkv_attention",
    ):
        assert op in dispatch.ops()
        assert dispatch.explain(op, *_args(op))["reference"] is None


def _args(op):
    imgs = torch.randn(1, 3, 8, 8)
    ids = torch.tensor([[0, 3]])
    q = torch.randn(1, 3, 2, 4)
    return {
        "patchify": (imgs, 4),
        "unpatchify": (torch.randn(1, 4, 48), 4, (2, 2)),
        "patchify_gather": (imgs, ids, 4),
        "patch_embed_gather": (imgs, ids, torch.randn(5, 3, 4, 4), None, None),
        "unshuffle_mask_tokens": (torch.randn(1, 3, 5), torch.randn(5), torch.tensor([[0, 1, 2, 3]]), None),
        "masked_mse_loss": (torch.randn(1, 4, 48), imgs, torch.ones(1, 4), 4, True, 1e-6),
        "random_masking": (torch.rand(1, 4), 2),
        "visible_attention": (q, q, q, None, q.shape[1], 0.25),
        "qkv_attention": (torch.randn(1, 3, 12), 1, None, 3, 0.5),
    }[op]


def test_cpu_tensors_run_the_torch_backend_under_auto():
    assert dispatch.resolve("patchify", "auto", torch.randn(1, 3, 8, 8), 4) == "torch"
    assert dispatch.resolve("patchify_gather", "auto", torch.randn(1, 3, 8, 8), torch.tensor([[0]]), 4) == "torch"
    assert dispatch.resolve("patchify", "reference", torch.randn(1, 3, 8, 8), 4) == "reference"


def test_cuda_backend_refusal_lists_the_reason():
    with pytest.raises(dispatch.BackendError, match="patchify: no usable backend for backend='cuda' \\(cuda: "):
        ops.patchify(torch.randn(1, 3, 8, 8), 4, backend="cuda")


def test_global_backend_and_context_manager():
    assert mae_fast.get_backend() == "auto"
    with mae_fast.use_backend("reference"):
        assert mae_fast.get_backend() == "reference"
        with pytest.raises(dispatch.BackendError):
            ops.patchify(torch.randn(1, 3, 8, 8), 4, backend="cuda")
    assert mae_fast.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        mae_fast.set_backend("fastest")
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.patchify(torch.randn(1, 3, 8, 8), 4, backend="gpu")


def test_model_backend_reaches_every_module():
    model = mae_fast.models.create_model("mae_vit_tiny_patch4_32", depth=1, decoder_depth=1, backend="reference")
    holders = [m for m in model.modules() if hasattr(m, "backend")]
    assert len(holders) >= 4 and all(m.backend == "reference" for m in holders)
    model.set_backend("cuda")
    assert all(m.backend == "cuda" for m in holders)
    with pytest.raises(dispatch.BackendError, match="cuda"):
        model(torch.randn(1, 3, 32, 32))


def test_unknown_op_and_bad_registration():
    with pytest.raises(KeyError, match="unknown op"):
        dispatch.explain("nope")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("patchify", "opencl", dispatch.Support(kernel="an OpenCL kernel"))


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_public_ops_trace_in_one_graph(backend):
    """Dispatch, validation and the backends' checks all trace: fullgraph compiles without a break."""
    imgs = torch.randn(2, 3, 8, 8)
    ids = torch.tensor([[3, 0], [1, 2]])
    q = torch.randn(1, 5, 2, 16)

    def step(imgs, ids, q):
        patches = ops.patchify_gather(imgs, ids, 4, backend=backend)
        return patches.sum() + ops.visible_attention(q, q, q, backend=backend).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(imgs, ids, q), step(imgs, ids, q))

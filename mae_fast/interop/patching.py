"""``patch(model)``: swap mae_fast's attention into timm and transformers ViTs, in place, keeping weights.

The replacement modules reuse the original Linear modules (the same Parameter objects), so weights,
devices, dtypes, ``state_dict`` keys and any optimizer already holding the parameters stay valid.
Attention is the one mae_fast op that these models share with MAE (patch_embed_gather, the decoder
unshuffle and the masked loss are MAE-specific), so attention modules are what gets replaced.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mae_fast import dispatch, ops
from mae_fast.nn import Attention


@dataclass
class PatchReport:
    """What :func:`patch` did: ``replaced`` and ``skipped`` hold (module path, class, detail) triples."""

    replaced: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} module(s), left {len(self.skipped)} alone"]
        lines += [f"  {path or '<model>'}: {cls} -> {detail}" for path, cls, detail in self.replaced]
        lines += [f"  {path or '<model>'}: {cls} left alone ({detail})" for path, cls, detail in self.skipped]
        return "\n".join(lines)


class TimmAttention(Attention):
    """mae_fast Attention with timm's call signature: forward(x [B, N, D], attn_mask=None, is_causal=False).

    Without a mask it runs :func:`mae_fast.ops.visible_attention`; a mask or causal attention (outside
    what that op does) falls back to ``F.scaled_dot_product_attention`` on the same weights.
    """

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is None and not is_causal:
            return super().forward(x)
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))


class TransformersAttention(nn.Module):
    """Stands in for transformers' ViTAttention / ViTMAEAttention (5.x).

    Keeps their ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` Linears (state_dict and ``save_pretrained``
    unchanged) and runs :func:`mae_fast.ops.visible_attention` on q, k, v [B, N, H, d]. forward(hidden_states
    [B, N, D], attention_mask=None, **kwargs) -> (out [B, N, D], None): no attention probabilities are
    formed, so ``output_attentions`` has nothing to return. An attention mask falls back to
    ``F.scaled_dot_product_attention``.
    """

    def __init__(self, source: nn.Module, backend: str | None = None):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = source.q_proj, source.k_proj, source.v_proj, source.o_proj
        self.num_attention_heads = source.num_attention_heads
        self.head_dim = source.head_dim
        self.scaling = source.scaling
        self.is_causal = False
        self.backend = dispatch.validate_backend(backend)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        lead = hidden_states.shape[:-1]
        shape = (*lead, self.num_attention_heads, self.head_dim)
        q = self.q_proj(hidden_states).view(shape)
        k = self.k_proj(hidden_states).view(shape)
        v = self.v_proj(hidden_states).view(shape)
        if attention_mask is None:
            out = ops.visible_attention(q, k, v, scale=self.scaling, backend=self.backend)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=self.scaling)
            out = out.transpose(1, 2)
        return self.o_proj(out.reshape(*lead, -1)), None


def _timm_attention(module: nn.Module, backend: str | None) -> tuple[nn.Module | None, str]:
    reasons = []
    if not isinstance(getattr(module, "q_norm", nn.Identity()), nn.Identity):
        reasons.append("qk_norm")
    if not isinstance(getattr(module, "norm", nn.Identity()), nn.Identity):
        reasons.append("scale_norm")
    if getattr(module, "gate", None) is not None:
        reasons.append("gated output")
    if module.attn_drop.p > 0:
        reasons.append(f"attention dropout p={module.attn_drop.p}")
    if module.proj_drop.p > 0:
        reasons.append(f"projection dropout p={module.proj_drop.p}")
    dim = module.qkv.in_features
    if module.num_heads * module.head_dim != dim or module.proj.out_features != dim:
        reasons.append("attention width differs from the model width")
    if module.proj.bias is None:
        reasons.append("proj without bias")
    if reasons:
        return None, ", ".join(reasons)
    with torch.device("meta"):
        new = TimmAttention(dim, module.num_heads, qkv_bias=module.qkv.bias is not None, backend=backend)
    new.qkv, new.proj = module.qkv, module.proj
    return new, "mae_fast.interop.patching.TimmAttention"


def _transformers_attention(module: nn.Module, backend: str | None) -> tuple[nn.Module | None, str]:
    if not all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "attention_dropout")):
        return None, "not the transformers 5.x layout (q_proj, k_proj, v_proj, o_proj)"
    if module.attention_dropout > 0:
        return None, f"attention dropout p={module.attention_dropout}"
    return TransformersAttention(module, backend), "mae_fast.interop.patching.TransformersAttention"


def _known_classes() -> dict[type, object]:
    """Patchable classes of the packages the process has already imported (none is imported here)."""
    known = {}
    if "timm" in sys.modules:
        from timm.layers.attention import Attention as TimmAttentionClass

        known[TimmAttentionClass] = _timm_attention
    if "transformers" in sys.modules:
        from transformers.models.vit.modeling_vit import ViTAttention
        from transformers.models.vit_mae.modeling_vit_mae import ViTMAEAttention

        known[ViTAttention] = _transformers_attention
        known[ViTMAEAttention] = _transformers_attention
    return known


def _is_mae_fast(module: nn.Module) -> bool:
    return type(module).__module__.startswith("mae_fast.")


def patch(model: nn.Module, *, backend: str | None = None) -> PatchReport:
    """Replace, in place, the attention modules of a timm VisionTransformer or a transformers ViT / ViTMAE
    (5.x) with mae_fast's, keeping their weights; return a :class:`PatchReport` of what changed.

    Replaced: timm's ``Attention`` (exact class) by :class:`TimmAttention`; transformers' ``ViTAttention``
    and ``ViTMAEAttention`` by :class:`TransformersAttention`. Left alone and reported: variants whose math
    mae_fast's attention does not do (qk_norm, scale_norm, gating, attention or projection dropout > 0)
    and any other class whose name says attention (subclasses, RoPE attention, transformers 4.x classes).
    ``backend`` is given to the new modules (None: follow mae_fast's global default).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    dispatch.validate_backend(backend)
    known = _known_classes()
    report = PatchReport()
    handled: list[str] = []
    for path, module in list(model.named_modules()):
        if _is_mae_fast(module) or any(path.startswith(f"{done}.") for done in handled):
            continue
        cls = f"{type(module).__module__}.{type(module).__qualname__}"
        builder = known.get(type(module))
        if builder is None:
            if "attention" in type(module).__name__.lower():
                report.skipped.append((path, cls, "unknown attention class"))
                handled.append(path)
            continue
        handled.append(path)
        if not path:
            report.skipped.append((path, cls, "the model itself is an attention module: patch its parent"))
            continue
        new, detail = builder(module, backend)
        if new is None:
            report.skipped.append((path, cls, detail))
            continue
        new.train(module.training)
        model.set_submodule(path, new)
        report.replaced.append((path, cls, detail))
    return report

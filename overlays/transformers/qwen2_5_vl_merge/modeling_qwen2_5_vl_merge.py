"""Qwen-Merge model: the Qwen2.5-VL vision tower whose merger gains GELU + Linear to the LLM width, and a Qwen3
decoder (per-head q/k RMSNorm, no qkv bias, explicit head_dim) positioned with Qwen2.5-VL's 3-D M-RoPE.

Everything is inherited from the installed Qwen2.5-VL and Qwen3 code. The only new mechanism: M-RoPE is folded once
per forward into per-token cos/sin (the same selection of t/h/w frequency sections that Qwen2.5-VL does in every
layer), so the unchanged Qwen3 layers apply it as ordinary RoPE. For text-only input t = h = w, so the merged model
computes exactly what the source Qwen3 computes.

The text model follows the LLM's kind (`text_config.is_moe`): the Qwen3 decoder, or the Qwen3-MoE decoder with the
same folded M-RoPE. With `output_router_logits` (LLaMA-Factory sets it when `moe_aux_loss_coef` is given), a
training forward adds `router_aux_loss_coef` x the load-balancing loss over the real tokens, as Qwen3MoeForCausalLM
does.
"""
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...modeling_utils import PreTrainedModel
from ..qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLCausalLMOutputWithPast,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPatchMerger,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLRotaryEmbedding,
    Qwen2_5_VLVisionSdpaAttention,
    Qwen2RMSNorm,
    apply_rotary_pos_emb_vision,
)
from ..qwen3.modeling_qwen3 import Qwen3Model, Qwen3RMSNorm
from ..qwen3_moe.modeling_qwen3_moe import Qwen3MoeModel, Qwen3MoeRMSNorm, load_balancing_loss_func
from .configuration_qwen2_5_vl_merge import (
    Qwen2_5_VL_MergeConfig,
    Qwen2_5_VL_MergeTextConfig,
    Qwen2_5_VL_MergeVisionConfig,
)


class Qwen2_5_VL_MergeRMSNorm(Qwen3RMSNorm):
    """The same RMSNorm through torch's fused `rms_norm` kernel (one kernel instead of ~6 elementwise ones per call;
    the text stack has 4 per layer with Qwen3's q/k norms). Same parameters; fp32 accumulation as upstream."""

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        normed = F.rms_norm(hidden_states.float(), self.weight.shape, eps=self.variance_epsilon)
        return self.weight * normed.to(dtype)


class Qwen2_5_VL_MergeVisionRMSNorm(Qwen2RMSNorm):
    """The fused RMSNorm for the vision tower. Stays a Qwen2RMSNorm: the tower's inherited `_init_weights` only
    initialises those, so a vision norm missing from a checkpoint would otherwise be left uninitialised."""

    forward = Qwen2_5_VL_MergeRMSNorm.forward


def _use_fused_rms_norm(module: nn.Module) -> None:
    fused = {Qwen3RMSNorm: Qwen2_5_VL_MergeRMSNorm, Qwen3MoeRMSNorm: Qwen2_5_VL_MergeRMSNorm,
             Qwen2RMSNorm: Qwen2_5_VL_MergeVisionRMSNorm}
    for sub in module.modules():
        if type(sub) in fused:
            sub.__class__ = fused[type(sub)]


class Qwen2_5_VL_MergePatchMerger(Qwen2_5_VLPatchMerger):
    """Source merger (ln_q, mlp.0, GELU, mlp.2) + new GELU (mlp.3) + new Linear (mlp.4) to the LLM width."""

    def __init__(self, dim: int, dim2: int, context_dim: int, spatial_merge_size: int = 2) -> None:
        super().__init__(dim=dim, context_dim=context_dim, spatial_merge_size=spatial_merge_size)
        self.mlp.append(nn.GELU())
        self.mlp.append(nn.Linear(dim, dim2))


class Qwen2_5_VL_MergeVisionSdpaAttention(Qwen2_5_VLVisionSdpaAttention):
    """Block-diagonal vision attention as one SDPA call per run of equal-length windows/images, instead of SDPA over
    the whole patch sequence with a seq x seq mask (quadratic in all patches of the batch, and a Python loop per
    window to build the mask). Same parameters and results; memory and time stay linear in the number of windows."""

    def forward(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None):
        seq_length = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        if position_embeddings is None:
            emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
            position_embeddings = (emb.cos(), emb.sin())
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        out = torch.empty_like(q)
        for start, count, length in _equal_length_runs(cu_seqlens):
            end = start + count * length
            qs, ks, vs = (t[start:end].reshape(count, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            out[start:end] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(end - start,
                                                                                                 self.num_heads, -1)
        return self.proj(out.reshape(seq_length, -1))


def _equal_length_runs(cu_seqlens: torch.Tensor) -> list[tuple[int, int, int]]:
    """(start, number of segments, segment length) for each run of consecutive equal-length segments."""
    bounds = cu_seqlens.tolist()
    runs = []
    for begin, end in zip(bounds[:-1], bounds[1:]):
        length = end - begin
        if length == 0:
            continue
        if runs and runs[-1][2] == length and runs[-1][0] + runs[-1][1] * length == begin:
            runs[-1][1] += 1
        else:
            runs.append([begin, 1, length])
    return [tuple(r) for r in runs]


class Qwen2_5_VL_MergeVisionModel(Qwen2_5_VisionTransformerPretrainedModel):
    config_class = Qwen2_5_VL_MergeVisionConfig

    def __init__(self, config, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        if config._attn_implementation == "sdpa":
            for block in self.blocks:
                block.attn = Qwen2_5_VL_MergeVisionSdpaAttention(config.hidden_size, num_heads=config.num_heads)
        self.merger = Qwen2_5_VL_MergePatchMerger(
            dim=config.out_hidden_size, dim2=config.out_hidden_size2, context_dim=config.hidden_size,
            spatial_merge_size=config.spatial_merge_size)
        _use_fused_rms_norm(self)  # after the merger is replaced, so its ln_q is fused too


class Qwen2_5_VL_MergeRotaryEmbedding(Qwen2_5_VLRotaryEmbedding):
    """Returns (batch, seq, head_dim) cos/sin with each frequency section taken from its t/h/w position stream."""

    def __init__(self, config, device=None):
        super().__init__(config, device)
        self.sections = list(config.rope_scaling["mrope_section"]) * 2

    def forward(self, x, position_ids):
        if position_ids.dim() == 2:  # plain text positions: t = h = w
            position_ids = position_ids[None].expand(3, -1, -1)
        cos, sin = super().forward(x, position_ids)  # (3, batch, seq, head_dim)
        return self._select_sections(cos), self._select_sections(sin)

    def _select_sections(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([part[i % 3] for i, part in enumerate(t.split(self.sections, dim=-1))], dim=-1)


class Qwen2_5_VL_MergeTextModel(Qwen3Model):
    """The Qwen3 decoder stack with M-RoPE positions."""

    config_class = Qwen2_5_VL_MergeTextConfig

    def __init__(self, config):
        super().__init__(config)
        self.rotary_emb = Qwen2_5_VL_MergeRotaryEmbedding(config)
        _use_fused_rms_norm(self)


class Qwen2_5_VL_MergeMoeTextModel(Qwen3MoeModel):
    """The Qwen3-MoE decoder stack with M-RoPE positions. Keeps the router logits of its last forward
    (`last_router_logits`) for the auxiliary loss: Qwen2_5_VLModel.forward does not pass them on."""

    config_class = Qwen2_5_VL_MergeTextConfig

    def __init__(self, config):
        super().__init__(config)
        self.rotary_emb = Qwen2_5_VL_MergeRotaryEmbedding(config)
        _use_fused_rms_norm(self)
        self.last_router_logits = None

    def forward(self, *args, **kwargs):
        outputs = super().forward(*args, **kwargs)
        self.last_router_logits = outputs.router_logits
        return outputs


def _real_tokens(attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq) 1/0 mask of the real tokens, from a 2-D padding mask (0/1, or neat_packing's segment ids 1..n) or
    a 4-D block-diagonal mask (a real token attends to itself; padding rows attend to nothing)."""
    if attention_mask.dim() == 4:
        diagonal = attention_mask[:, 0].diagonal(dim1=-2, dim2=-1)
        return diagonal if diagonal.dtype == torch.bool else diagonal == 0
    return attention_mask != 0


@dataclass
class Qwen2_5_VL_MergeMoeCausalLMOutputWithPast(Qwen2_5_VLCausalLMOutputWithPast):
    """+ the load-balancing loss (already in `loss`, weighted by router_aux_loss_coef) and the routers' logits."""

    aux_loss: Optional[torch.FloatTensor] = None
    router_logits: Optional[tuple] = None


class Qwen2_5_VL_MergePreTrainedModel(Qwen2_5_VLPreTrainedModel):
    config_class = Qwen2_5_VL_MergeConfig
    _no_split_modules = ["Qwen3DecoderLayer", "Qwen3MoeDecoderLayer", "Qwen2_5_VLVisionBlock"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, (Qwen3RMSNorm, Qwen3MoeRMSNorm)):
            module.weight.data.fill_(1.0)


class Qwen2_5_VL_MergeModel(Qwen2_5_VL_MergePreTrainedModel, Qwen2_5_VLModel):
    def __init__(self, config: Qwen2_5_VL_MergeConfig):
        PreTrainedModel.__init__(self, config)  # not Qwen2_5_VLModel.__init__: it would build the stock towers
        self.visual = Qwen2_5_VL_MergeVisionModel._from_config(config.vision_config)
        text_model = Qwen2_5_VL_MergeMoeTextModel if config.text_config.is_moe else Qwen2_5_VL_MergeTextModel
        self.language_model = text_model._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()


class Qwen2_5_VL_MergeForConditionalGeneration(Qwen2_5_VL_MergePreTrainedModel, Qwen2_5_VLForConditionalGeneration):
    """Loads the merger's flat keys (`visual.*`, `model.*`) and the nested keys transformers 4.52 saves
    (`model.visual.*`, `model.language_model.*`) through the inherited `_checkpoint_conversion_mapping`."""

    def __init__(self, config: Qwen2_5_VL_MergeConfig):
        PreTrainedModel.__init__(self, config)
        self.model = Qwen2_5_VL_MergeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        """The inherited forward; for a MoE text model whose config asks for router logits, a forward with labels
        also returns `aux_loss` and adds router_aux_loss_coef x aux_loss to `loss` (Qwen3MoeForCausalLM's rule)."""
        outputs = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        text_model, text = self.model.language_model, self.config.text_config
        router_logits = getattr(text_model, "last_router_logits", None)
        if router_logits is None:
            return outputs
        text_model.last_router_logits = None  # do not keep the graph alive until the next step
        if kwargs.get("labels") is None or not isinstance(outputs, Qwen2_5_VLCausalLMOutputWithPast):
            return outputs
        sparse = tuple(r for r in router_logits if r is not None)  # mlp_only_layers have no router
        mask = None if attention_mask is None else _real_tokens(attention_mask).to(sparse[0].dtype)
        aux_loss = load_balancing_loss_func(sparse, text.num_experts, text.num_experts_per_tok, mask)
        loss = outputs.loss + text.router_aux_loss_coef * aux_loss.to(outputs.loss.device)
        return Qwen2_5_VL_MergeMoeCausalLMOutputWithPast(
            **{**outputs, "loss": loss}, aux_loss=aux_loss, router_logits=router_logits)

    # the parent's parameters, as Trainer (labels) and GenerationMixin read them from the signature
    forward.__signature__ = inspect.signature(Qwen2_5_VLForConditionalGeneration.forward)


__all__ = [
    "Qwen2_5_VL_MergeForConditionalGeneration",
    "Qwen2_5_VL_MergeModel",
    "Qwen2_5_VL_MergeMoeTextModel",
    "Qwen2_5_VL_MergePreTrainedModel",
    "Qwen2_5_VL_MergeTextModel",
    "Qwen2_5_VL_MergeVisionModel",
]

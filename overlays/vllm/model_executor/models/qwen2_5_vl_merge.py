# SPDX-License-Identifier: Apache-2.0
"""Qwen-Merge in vLLM: the Qwen2.5-VL vision tower whose patch merger gains GELU + a Linear to the LLM width, feeding a
Qwen3 decoder positioned with Qwen2.5-VL's 3-D M-RoPE.

Composed from vLLM's own pieces, nothing copied:
* vision: `Qwen2_5_VisionTransformer` with its merger extended by `mlp.3` (GELU) and `mlp.4`, a
  `ColumnParallelLinear(gather_output=True)` (the source merger's `mlp.2` is a RowParallelLinear, so its output is
  already complete on every tensor-parallel rank);
* text: vLLM's `Qwen3ForCausalLM`, or `Qwen3MoeForCausalLM` when the config carries Qwen3-MoE's fields (merged from
  a qwen3_moe LLM), as is: tensor- and expert-parallel settings (`--tensor-parallel-size`,
  `--enable-expert-parallel`) apply to it exactly as to the stock model. Its attention builds the rotary embedding
  from `config.rope_scaling`, which carries `mrope_section`, so `get_rope` returns an `MRotaryEmbedding` and the
  layers take (3, tokens) positions;
* multimodal processing, dummy inputs, input parsing, embedding merge and forward: Qwen2.5-VL's.

Both checkpoint layouts load through the inherited `hf_to_vllm_mapper`: the merger's flat keys (`visual.*`, `model.*`,
`lm_head.*`) and the nested keys transformers >= 4.52 saves (`model.visual.*`, `model.language_model.*`).
"""
from functools import partial
from typing import Optional

import torch
from torch import nn
from transformers.models.qwen2_5_vl_merge.configuration_qwen2_5_vl_merge import Qwen2_5_VL_MergeConfig
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ColumnParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.multimodal import MULTIMODAL_REGISTRY

from .qwen2_5_vl import (
    Qwen2_5_VisionPatchMerger,
    Qwen2_5_VisionTransformer,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from .utils import init_vllm_registered_model, maybe_prefix

TEXT_ARCHITECTURES = {False: "Qwen3ForCausalLM", True: "Qwen3MoeForCausalLM"}  # by config.text_config.is_moe


class Qwen2_5_VL_MergePatchMerger(Qwen2_5_VisionPatchMerger):
    """Source merger (ln_q, mlp.0, GELU, mlp.2 -> d_model) followed by GELU (mlp.3) and mlp.4 (d_model -> d_model_2)."""

    def __init__(self, d_model: int, d_model_2: int, context_dim: int, norm_layer=None, spatial_merge_size: int = 2,
                 quant_config: Optional[QuantizationConfig] = None, prefix: str = "") -> None:
        super().__init__(d_model=d_model, context_dim=context_dim, norm_layer=norm_layer,
                         spatial_merge_size=spatial_merge_size, quant_config=quant_config, prefix=prefix)
        self.mlp.append(nn.GELU())
        self.mlp.append(ColumnParallelLinear(d_model, d_model_2, bias=True, gather_output=True,
                                             quant_config=quant_config, prefix=f"{prefix}.mlp.4"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).view(-1, self.hidden_size)
        for layer in self.mlp:
            x = layer(x)
            if isinstance(x, tuple):  # vLLM's parallel linears return (output, output_bias)
                x = x[0]
        return x


class Qwen2_5_VL_MergeVisionTransformer(Qwen2_5_VisionTransformer):
    """The stock vision tower with the extended merger (width `vision_config.out_hidden_size2`)."""

    def __init__(self, vision_config, norm_eps: float = 1e-6, quant_config: Optional[QuantizationConfig] = None,
                 prefix: str = "") -> None:
        super().__init__(vision_config, norm_eps=norm_eps, quant_config=quant_config, prefix=prefix)
        self.merger = Qwen2_5_VL_MergePatchMerger(  # replaces the stock merger built by the parent
            d_model=vision_config.out_hidden_size, d_model_2=vision_config.out_hidden_size2,
            context_dim=self.hidden_size, norm_layer=partial(RMSNorm, eps=norm_eps),
            spatial_merge_size=self.spatial_merge_size, quant_config=quant_config, prefix=f"{prefix}.merger")


class Qwen2_5_VL_MergeProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL processing (stock `Qwen2_5_VLProcessor`), but insists on a Qwen-Merge config."""

    def get_hf_config(self):
        return self.ctx.get_hf_config(Qwen2_5_VL_MergeConfig)


@MULTIMODAL_REGISTRY.register_processor(Qwen2_5_VLMultiModalProcessor, info=Qwen2_5_VL_MergeProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class Qwen2_5_VL_MergeForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """`visual` = extended Qwen2.5-VL tower, `language_model` = vLLM's Qwen3ForCausalLM (or Qwen3MoeForCausalLM) with
    M-RoPE."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)  # not the parent's __init__: it would build the stock tower and a Qwen2 LLM
        config: Qwen2_5_VL_MergeConfig = vllm_config.model_config.hf_config
        self.config = config
        self.multimodal_config = vllm_config.model_config.multimodal_config
        self.visual = Qwen2_5_VL_MergeVisionTransformer(
            config.vision_config, norm_eps=getattr(config, "rms_norm_eps", 1e-6),
            quant_config=self._maybe_ignore_quant_config(vllm_config.quant_config),
            prefix=maybe_prefix(prefix, "visual"))
        self.language_model = init_vllm_registered_model(
            vllm_config=vllm_config, prefix=maybe_prefix(prefix, "language_model"),
            architectures=[TEXT_ARCHITECTURES[config.text_config.is_moe]])
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

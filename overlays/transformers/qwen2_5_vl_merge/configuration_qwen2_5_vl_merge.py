"""Qwen-Merge configuration: a Qwen2.5-VL vision config with a second projector width, and a Qwen3-style text config
(explicit head_dim, no attention bias) driven by Qwen2.5-VL's 3-D M-RoPE. A text config that carries Qwen3-MoE's
fields (num_experts > 0, as the merger writes them from a qwen3_moe LLM) describes a Qwen3-MoE decoder."""
from ..qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLConfig, Qwen2_5_VLTextConfig, Qwen2_5_VLVisionConfig


class Qwen2_5_VL_MergeVisionConfig(Qwen2_5_VLVisionConfig):
    """`out_hidden_size` is the source merger's width; `out_hidden_size2` the LLM width the new mlp.4 maps to."""

    model_type = "qwen2_5_vl_merge_vision"

    def __init__(self, out_hidden_size2=None, **kwargs):
        super().__init__(**kwargs)
        self.out_hidden_size2 = out_hidden_size2 if out_hidden_size2 is not None else self.out_hidden_size


class Qwen2_5_VL_MergeTextConfig(Qwen2_5_VLTextConfig):
    """Qwen3 decoder fields on top of the Qwen2.5-VL text config (which keeps `rope_scaling.mrope_section`)."""

    model_type = "qwen2_5_vl_merge_text"

    def __init__(self, head_dim=None, attention_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.head_dim = head_dim if head_dim is not None else self.hidden_size // self.num_attention_heads
        self.attention_bias = attention_bias
        section = (self.rope_scaling or {}).get("mrope_section")
        if section is not None and 2 * sum(section) != self.head_dim:
            raise ValueError(f"rope_scaling.mrope_section {section} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.is_moe and getattr(self, "mlp_only_layers", None) is None:
            self.mlp_only_layers = []  # as Qwen3MoeConfig stores a null

    @property
    def is_moe(self) -> bool:
        """The text side is a Qwen3-MoE decoder (the MoE fields are present only for a qwen3_moe LLM)."""
        return (getattr(self, "num_experts", None) or 0) > 0


# Text fields mirrored at the top level: the merger writes flat configs, and vLLM reads text fields from there.
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "rope_scaling", "attention_bias", "attention_dropout", "use_sliding_window",
                "sliding_window", "max_window_layers", "tie_word_embeddings",
                # Qwen3-MoE only (absent from dense configs); LLaMA-Factory sets the last two for training
                "num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step",
                "mlp_only_layers", "norm_topk_prob", "output_router_logits", "router_aux_loss_coef")


class Qwen2_5_VL_MergeConfig(Qwen2_5_VLConfig):
    """Accepts the flat layout (text fields at the top level, as the merger writes) and the nested `text_config`
    layout (as transformers 4.52 re-saves it).

    The top-level text fields are views of `text_config`, not copies: vLLM and LLaMA-Factory read and set them at the
    top level, transformers' own code (the text model, `resize_token_embeddings`) uses `text_config`, and copies went
    stale (a resized vocabulary was saved with two vocab_size values). Where a nested file's two disagree,
    `text_config` wins, as the model is built from it. Saved files keep both layouts."""

    model_type = "qwen2_5_vl_merge"
    sub_configs = {"vision_config": Qwen2_5_VL_MergeVisionConfig, "text_config": Qwen2_5_VL_MergeTextConfig}

    def __init__(self, text_config=None, vision_config=None, image_token_id=151655, video_token_id=151656, **kwargs):
        super().__init__(text_config=text_config, vision_config=vision_config, image_token_id=image_token_id,
                         video_token_id=video_token_id, **kwargs)
        for name in _TEXT_FIELDS:  # from here on read from and written to text_config
            self.__dict__.pop(name, None)
        self.__dict__["_text_fields_are_views"] = True

    def __setattr__(self, key, value):
        if key in _TEXT_FIELDS and self.__dict__.get("_text_fields_are_views"):
            setattr(self.text_config, key, value)
        else:
            super().__setattr__(key, value)

    def __getattr__(self, key):  # only called when normal lookup fails, i.e. for the text fields
        if key in _TEXT_FIELDS and "text_config" in self.__dict__:
            return getattr(self.__dict__["text_config"], key)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{key}'")

    def to_dict(self):
        output = super().to_dict()
        output.pop("_text_fields_are_views", None)
        text = output["text_config"]
        output.update({name: text[name] for name in _TEXT_FIELDS if name in text})
        return output


__all__ = ["Qwen2_5_VL_MergeConfig", "Qwen2_5_VL_MergeTextConfig", "Qwen2_5_VL_MergeVisionConfig"]

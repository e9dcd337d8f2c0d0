"""Neat-packed rows for Qwen-Merge (qwen-merge overlay): per-sample M-RoPE positions, attention per document.

With ``neat_packing`` the collator's attention mask holds one segment id per packed sample (1, 2, ...; 0 = padding),
but LLaMA-Factory 0.9.3 calls ``get_rope_index`` on the whole row, so every sample after the first continues the
previous sample's positions. Here each segment gets the positions it would get alone in a batch, i.e. exactly
those of the unpacked run. Called by ``MultiModalDataCollatorForSeq2Seq.__call__`` after the upstream positions.
``use_packed_attention`` (called by ``patch_model``) makes the text attention skip the cross-document pairs.
"""
from typing import Any

import torch

from ..extras import logging

logger = logging.get_logger(__name__)

MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen2_5_vl_merge")


def _count_media(ids: torch.Tensor, vision_start_id: int, media_token_id: int) -> int:
    """Number of vision blocks of one kind: ``<|vision_start|>`` directly followed by the media pad token."""
    starts = (ids[:-1] == vision_start_id).nonzero().flatten()
    return int((ids[starts + 1] == media_token_id).sum())


def _segment_positions(get_rope_index, ids, image_grids, video_grids, seconds_per_grid) -> torch.Tensor:
    extra = {} if seconds_per_grid is None else {"second_per_grid_ts": seconds_per_grid}  # Qwen2-VL has no such arg
    positions, _ = get_rope_index(input_ids=ids[None], image_grid_thw=image_grids, video_grid_thw=video_grids,
                                  attention_mask=torch.ones_like(ids)[None], **extra)
    return positions[:, 0]


def restart_mrope_positions_per_sample(collator: Any, features: dict[str, torch.Tensor], mm_inputs: dict) -> None:
    """Rewrite ``features["position_ids"]`` in place so each packed segment starts at position 0."""
    config = getattr(collator.model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MROPE_MODEL_TYPES:
        return
    positions = features.get("position_ids")
    if collator.get_rope_func is None or positions is None or positions.dim() != 3:
        raise ValueError(f"{model_type} needs 3-D M-RoPE position ids; the collator produced none")
    segments = features["attention_mask"]
    if segments.dim() != 2 or int(segments.max()) <= 1:
        return  # not neat-packed: one sample per row, the upstream positions are right

    image_grids, video_grids = mm_inputs.get("image_grid_thw"), mm_inputs.get("video_grid_thw")
    seconds = mm_inputs.get("second_per_grid_ts")
    image_index = video_index = 0
    positions = positions.clone()
    for row in range(segments.size(0)):
        for segment_id in segments[row].unique(sorted=True).tolist():
            if segment_id == 0:
                continue
            in_segment = segments[row] == segment_id
            ids = features["input_ids"][row][in_segment]
            num_images = _count_media(ids, config.vision_start_token_id, config.image_token_id)
            num_videos = _count_media(ids, config.vision_start_token_id, config.video_token_id)
            positions[:, row, in_segment] = _segment_positions(
                collator.get_rope_func,
                ids,
                image_grids[image_index : image_index + num_images] if num_images else None,
                video_grids[video_index : video_index + num_videos] if num_videos else None,
                seconds[video_index : video_index + num_videos] if num_videos and seconds is not None else None,
            ).to(positions.dtype)
            image_index += num_images
            video_index += num_videos
    features["position_ids"] = positions


def use_packed_attention(model: Any, model_args: Any) -> None:
    """With ``neat_packing`` (``block_diag_attn``), run Qwen-Merge's text attention per packed document instead of
    SDPA over the whole row with the block-diagonal mask (transformers overlay ``packed_attention.py``)."""
    if not model_args.block_diag_attn or getattr(model.config, "model_type", None) != "qwen2_5_vl_merge":
        return
    from transformers.models.qwen2_5_vl_merge.packed_attention import kernel_name, use_for_packed_rows

    layers = use_for_packed_rows(model)
    if layers:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        logger.info_rank0(f"neat_packing: text attention per packed document ({kernel_name(device)}), {layers} layers")

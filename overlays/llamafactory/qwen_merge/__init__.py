"""Qwen-Merge support for LLaMA-Factory 0.9.3 (qwen-merge overlay).

Each module registers one thing and is wired in by one-line edits of the upstream module it extends:

* ``templates``     -> ``data/template.py``: templates ``qwen_merge_vl`` / ``qwen_merge_vl_pt`` and their mm plugin.
* ``composite``     -> ``model/model_utils/visual.py``: the composite model keyed by model_type ``qwen2_5_vl_merge``.
* ``model_group``   -> ``extras/constants.py``: the model names the web UI lists.
* ``mrope_packing`` -> ``data/collator.py``: per-sample M-RoPE positions in neat-packed rows.
"""

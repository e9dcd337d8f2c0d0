"""Output names of the stage 1/2 datasets and their LLaMA-Factory ``dataset_info.json`` entries.

Importable without heavy dependencies, so other tools (e.g. the generator of ``examples/dataset_info.json``)
can use the same names as the data scripts.
"""

from __future__ import annotations

import re

LLAVA_RECAP_DATASETS = (
    "lmms-lab/LLaVA-ReCap-558K",
    "lmms-lab/LLaVA-ReCap-CC12M",
    "lmms-lab/LLaVA-ReCap-CC3M",
)

SYNTHDOG_DATASETS = {
    "en": "naver-clova-ix/synthdog-en",
    "zh": "naver-clova-ix/synthdog-zh",
}

ONEVISION_REPO = "lmms-lab/LLaVA-OneVision-Data"

# The 89 configs of lmms-lab/LLaVA-OneVision-Data, in the order the original recipe processes them.
ONEVISION_CONFIGS = (
    "CLEVR-Math(MathV360K)", "Evol-Instruct-GPT4-Turbo", "FigureQA(MathV360K)", "GEOS(MathV360K)",
    "GeoQA+(MathV360K)", "Geometry3K(MathV360K)", "IconQA(MathV360K)", "MapQA(MathV360K)", "MathV360K_TQA",
    "MathV360K_VQA-AS", "MathV360K_VQA-RAD", "PMC-VQA(MathV360K)", "Super-CLEVR(MathV360K)",
    "TabMWP(MathV360K)", "UniGeo(MathV360K)", "VisualWebInstruct(filtered)", "VizWiz(MathV360K)",
    "ai2d(cauldron,llava_format)", "ai2d(gpt4v)", "ai2d(internvl)", "allava_instruct_laion4v",
    "allava_instruct_vflan4v", "aokvqa(cauldron,llava_format)", "chart2text(cauldron)",
    "chartqa(cauldron,llava_format)", "chrome_writting", "clevr(cauldron,llava_format)",
    "diagram_image_to_text(cauldron)", "dvqa(cauldron,llava_format)", "figureqa(cauldron,llava_format)",
    "geo170k(align)", "geo170k(qa)", "geo3k", "geomverse(cauldron)", "hateful_memes(cauldron,llava_format)",
    "hitab(cauldron,llava_format)", "hme100k", "iam(cauldron)", "iconqa(cauldron,llava_format)", "iiit5k",
    "image_textualization(filtered)", "infographic(gpt4v)", "infographic_vqa", "infographic_vqa_llava_format",
    "intergps(cauldron,llava_format)", "k12_printing", "llava_wild_4v_12k_filtered",
    "llava_wild_4v_39k_filtered", "llavar_gpt4_20k", "lrv_chart", "lrv_normal(filtered)",
    "magpie_pro(l3_80b_mt)", "magpie_pro(l3_80b_st)", "magpie_pro(qwen2_72b_st)",
    "mapqa(cauldron,llava_format)", "mathqa", "mavis_math_metagen", "mavis_math_rule_geo",
    "multihiertt(cauldron)", "orand_car_a", "raven(cauldron)", "rendered_text(cauldron)",
    "robut_sqa(cauldron)", "robut_wikisql(cauldron)", "robut_wtq(cauldron,llava_format)",
    "scienceqa(cauldron,llava_format)", "scienceqa(nona_context)", "screen2words(cauldron)", "sharegpt4o",
    "sharegpt4v(coco)", "sharegpt4v(knowledge)", "sharegpt4v(llava)", "sharegpt4v(sam)", "sroie",
    "st_vqa(cauldron,llava_format)", "tabmwp(cauldron)", "tallyqa(cauldron,llava_format)", "textcaps",
    "textocr(gpt4v)", "tqa(cauldron,llava_format)", "ureader_cap", "ureader_ie", "vision_flan(filtered)",
    "vistext(cauldron)", "visual7w(cauldron,llava_format)", "visualmrc(cauldron)",
    "vqarad(cauldron,llava_format)", "vsr(cauldron,llava_format)", "websight(cauldron)",
)

# Text-only configs: they have no images, so they produce no rows and get no dataset_info entry.
ONEVISION_TEXT_ONLY_CONFIGS = frozenset({
    "Evol-Instruct-GPT4-Turbo", "magpie_pro(l3_80b_mt)", "magpie_pro(l3_80b_st)",
    "magpie_pro(qwen2_72b_st)", "mathqa",
})

_ONEVISION_SEPARATORS = re.compile(r"[() ,\-]")


def hub_output_name(hub_id: str) -> str:
    """``lmms-lab/LLaVA-ReCap-558K`` -> ``LLaVA_ReCap_558K``; ``naver-clova-ix/synthdog-en`` -> ``synthdog_en``."""
    return hub_id.rsplit("/", 1)[-1].replace("-", "_")


def onevision_name(config: str) -> str:
    """Output name of a OneVision config: each of ``( ) , space -`` becomes ``_``, trailing ``_`` removed."""
    return _ONEVISION_SEPARATORS.sub("_", config).rstrip("_")


def onevision_uses_image_prepend(config: str) -> bool:
    """Cauldron / llava_format configs may lack ``<image>`` (it is prepended); the others must have exactly one."""
    return "cauldron" in config or "llava_format" in config


def dataset_info_entry(name: str, file_name: str | None = None) -> dict:
    """The LLaMA-Factory sharegpt entry for one output; ``file_name`` defaults to the shard directory ``name``."""
    return {
        "file_name": file_name if file_name is not None else name,
        "formatting": "sharegpt",
        "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
    }

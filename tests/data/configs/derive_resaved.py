"""Write the re-saved layouts of the Qwen2.5-VL hub configs next to this file (run once; the JSON files are committed).

    .venv/bin/python tests/data/configs/derive_resaved.py

* `*.resaved_4_52.json`: a real re-save, made by the installed transformers 4.52.3 (Qwen2_5_VLConfig(**hub), written
  as save_pretrained writes it):
  flat fields kept at the top level, a nested text_config with "image_token_id": null and "video_token_id": null, a
  complete vision_config. The same shape as the 4.52.4 re-save of Qwen2.5-VL-3B recorded in the code corpus.
* `*.resaved_4_51.json`: the flat layout 4.51 wrote: the 4.52 re-save without text_config, every vision field
  explicit, rope_scaling with both `type` and `rope_type`.
* `*.resaved_4_53.json`: the 4.52 re-save plus what 4.53 adds, as in the 4.53.1 re-save of Qwen2.5-VL-7B (Qwen-Image's
  text encoder) recorded in the code corpus: text_config.layer_types, text_config.sliding_window null, float32
  torch_dtype inside the sub-configs.
* `*.resaved_4_56.json`: the 4.53 layout with `dtype` instead of `torch_dtype` everywhere, as written by >= 4.56
  (e.g. huggingface.co/woyut/RoboAgent_CVPR26, a re-saved Qwen2.5-VL-3B).
"""
import copy
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def dump(path: Path, source: str, config: dict) -> None:
    path.write_text(json.dumps({"source": source, "config": config}, indent=2) + "\n")


def main() -> None:
    from transformers import Qwen2_5_VLConfig

    for hub_file in sorted(HERE.glob("qwen2_5_vl_*.hub.json")):
        name = hub_file.name.split(".")[0]
        hub = json.loads(hub_file.read_text())["config"]
        resaved = json.loads(Qwen2_5_VLConfig(**copy.deepcopy(hub)).to_json_string(use_diff=True))  # as save_pretrained
        resaved.pop("_attn_implementation_autoset", None)
        dump(HERE / f"{name}.resaved_4_52.json", f"{hub_file.name} re-saved by transformers 4.52.3 (save_pretrained)",
             resaved)

        flat = {k: v for k, v in copy.deepcopy(resaved).items() if k != "text_config"}
        flat["transformers_version"] = "4.51.3"
        dump(HERE / f"{name}.resaved_4_51.json", f"{hub_file.name} in the flat layout transformers 4.51 saved", flat)

        v53 = copy.deepcopy(resaved)
        text = v53["text_config"]
        text["layer_types"] = ["full_attention"] * text["num_hidden_layers"]
        text["sliding_window"] = None
        text["torch_dtype"] = "float32"
        v53["vision_config"]["torch_dtype"] = "float32"
        v53["transformers_version"] = "4.53.1"
        dump(HERE / f"{name}.resaved_4_53.json", f"{hub_file.name} in the layout transformers 4.53 saves", v53)

        v56 = copy.deepcopy(v53)
        for cfg in (v56, v56["text_config"], v56["vision_config"]):
            cfg["dtype"] = cfg.pop("torch_dtype")
        v56["transformers_version"] = "4.56.1"
        dump(HERE / f"{name}.resaved_4_56.json", f"{hub_file.name} in the layout transformers >= 4.56 saves", v56)


if __name__ == "__main__":
    main()

"""merge/model_merger.py: what goes where, bit for bit; config and tokenizer; bad inputs; atomic output."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge import model_merger

REPO = Path(__file__).resolve().parent.parent


def tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def run_cli(*args):
    return subprocess.run([sys.executable, str(REPO / "merge/model_merger.py"), "--quiet", *map(str, args)],
                          capture_output=True, text=True)


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_every_source_tensor_is_copied_bit_identically(request, variant, tiny_qwen25vl):
    merged = request.getfixturevalue("tiny_merged" if variant == "tied" else "tiny_merged_untied")
    llm = request.getfixturevalue("tiny_qwen3" if variant == "tied" else "tiny_qwen3_untied")
    out, vlm_t, llm_t = tensors(merged), tensors(tiny_qwen25vl), tensors(llm)
    vision = {k: v for k, v in vlm_t.items() if k.startswith(("visual.", "model.visual."))}
    assert vision, "the fixture VLM has vision tensors"
    for name, t in vision.items():
        got = out["visual." + name.split("visual.", 1)[1]]
        assert got.dtype == t.dtype and torch.equal(got, t), name
    for name, t in llm_t.items():
        assert torch.equal(out[name], t), name
    assert ("lm_head.weight" in out) == (variant == "untied")
    cfg = json.loads((merged / "config.json").read_text())
    llm_cfg = json.loads((llm / "config.json").read_text())
    w, b = out["visual.merger.mlp.4.weight"], out["visual.merger.mlp.4.bias"]
    assert list(w.shape) == [llm_cfg["hidden_size"], cfg["vision_config"]["out_hidden_size"]]
    assert torch.count_nonzero(b) == 0 and 0.015 < w.std().item() < 0.025
    new = set(out) - {"visual." + k.split("visual.", 1)[1] for k in vision} - set(llm_t)
    assert new == {"visual.merger.mlp.4.weight", "visual.merger.mlp.4.bias"}


def test_config_tokenizer_and_processor_files(tiny_merged, tiny_qwen25vl, tiny_qwen3):
    cfg = json.loads((tiny_merged / "config.json").read_text())
    llm = json.loads((tiny_qwen3 / "config.json").read_text())
    vlm = json.loads((tiny_qwen25vl / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl_merge"
    assert cfg["architectures"] == ["Qwen2_5_VL_MergeForConditionalGeneration"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "vocab_size", "intermediate_size", "tie_word_embeddings", "rope_theta", "max_position_embeddings"):
        assert cfg[key] == llm[key], key
    assert cfg["rope_scaling"] == {"type": "mrope", "mrope_section": vlm["rope_scaling"]["mrope_section"]}
    assert cfg["vision_config"]["out_hidden_size2"] == llm["hidden_size"]
    assert cfg["image_token_id"] == 151655 and cfg["vision_start_token_id"] == 151652
    assert cfg["torch_dtype"] == "float32"
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "preprocessor_config.json", "generation_config.json",
                 "chat_template.jinja"):
        assert (tiny_merged / name).is_file(), name
    tok_cfg = json.loads((tiny_merged / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == (REPO / "merge/chat_template.jinja").read_text()
    assert "processor_class" not in tok_cfg


def test_seed_makes_the_projector_reproducible(tiny_qwen25vl, tiny_qwen3, tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        model_merger.merge(str(tiny_qwen25vl), str(tiny_qwen3), str(tmp_path / name), seed=seed, quiet=True)
    a, b, c = (tensors(tmp_path / n)["visual.merger.mlp.4.weight"] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dtype_conversion_and_sharding(tiny_qwen25vl, tiny_qwen3, tmp_path):
    out = tmp_path / "bf16"
    summary = model_merger.merge(str(tiny_qwen25vl), str(tiny_qwen3), str(out), dtype="bfloat16",
                                 max_shard_size=40 * 10**6, quiet=True)
    assert summary["shards"] > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = tensors(out)
    assert set(index["weight_map"]) == set(got)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    src = tensors(tiny_qwen3)
    assert torch.equal(got["model.norm.weight"], src["model.norm.weight"].to(torch.bfloat16))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_nested_vlm_config_and_nested_keys_are_accepted(tiny_qwen25vl, tiny_qwen3, tmp_path):
    """A VLM re-saved by transformers >= 4.52 (nested text_config, model.visual.* keys) merges the same."""
    vlm = tmp_path / "vlm-nested"
    shutil.copytree(tiny_qwen25vl, vlm)
    cfg = json.loads((vlm / "config.json").read_text())
    cfg["text_config"] = {"hidden_size": 999, "vocab_size": 152064, "rope_scaling": cfg["rope_scaling"]}
    (vlm / "config.json").write_text(json.dumps(cfg))
    renamed = {("model." + k if k.startswith("visual.") else k): v for k, v in tensors(tiny_qwen25vl).items()}
    (vlm / "model.safetensors").unlink()
    save_file(renamed, str(vlm / "model.safetensors"), metadata={"format": "pt"})
    model_merger.merge(str(vlm), str(tiny_qwen3), str(tmp_path / "out"), quiet=True)
    merged_cfg = json.loads((tmp_path / "out/config.json").read_text())
    assert "text_config" not in merged_cfg and merged_cfg["hidden_size"] == 192
    assert any(k.startswith("visual.blocks.") for k in tensors(tmp_path / "out"))


@pytest.mark.parametrize("case", ["swapped", "not_a_vlm", "missing_dir", "mrope_mismatch", "no_weights",
                                  "pickle_weights", "bad_token_ids", "nonempty_output"])
def test_bad_inputs_fail_with_one_line(case, tiny_qwen25vl, tiny_qwen3, tmp_path):
    vlm, llm, out = tiny_qwen25vl, tiny_qwen3, tmp_path / "out"
    expected = {"swapped": "look swapped", "not_a_vlm": "must be a Qwen2.5-VL", "missing_dir": "not a directory",
                "mrope_mismatch": "cannot be merged", "no_weights": "no safetensors weights",
                "pickle_weights": "convert them to safetensors", "bad_token_ids": "not compatible",
                "nonempty_output": "--overwrite"}[case]
    if case == "swapped":
        vlm, llm = tiny_qwen3, tiny_qwen25vl
    elif case == "not_a_vlm":
        vlm = tiny_qwen3
    elif case == "missing_dir":
        vlm = tmp_path / "nowhere"
    elif case in ("mrope_mismatch", "no_weights", "pickle_weights"):
        vlm = tmp_path / "vlm"
        shutil.copytree(tiny_qwen25vl, vlm)
        if case == "mrope_mismatch":
            cfg = json.loads((vlm / "config.json").read_text())
            cfg["rope_scaling"]["mrope_section"] = [16, 24, 24]
            (vlm / "config.json").write_text(json.dumps(cfg))
        else:
            (vlm / "model.safetensors").unlink()
            if case == "pickle_weights":
                (vlm / "pytorch_model.bin").write_bytes(b"\x80\x04")
    elif case == "bad_token_ids":
        llm = tmp_path / "llm"
        shutil.copytree(tiny_qwen3, llm)
        tok = json.loads((llm / "tokenizer.json").read_text())
        for t in tok["added_tokens"]:
            if t["content"] == "<|image_pad|>":
                t["content"] = "<|renamed|>"
        (llm / "tokenizer.json").write_text(json.dumps(tok))
    elif case == "nonempty_output":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    proc = run_cli("--vlm-path", vlm, "--llm-path", llm, "--output-path", out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr, proc.stderr
    assert case == "nonempty_output" or not out.exists()
    if case == "nonempty_output":
        assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_merge_leaves_nothing_valid_looking(tiny_qwen25vl, tiny_qwen3, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the tokenizer files are written

    monkeypatch.setattr(model_merger, "write_materials", boom)
    with pytest.raises(KeyboardInterrupt):
        model_merger.merge(str(tiny_qwen25vl), str(tiny_qwen3), str(tmp_path / "out"), quiet=True)
    assert list(tmp_path.iterdir()) == []  # neither the output nor the staging directory


def test_overwrite_replaces_atomically(tiny_qwen25vl, tiny_qwen3, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    proc = run_cli("--vlm-path", tiny_qwen25vl, "--llm-path", tiny_qwen3, "--output-path", out, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_help_lists_the_original_flags():
    text = run_cli("--help").stdout
    for flag in ("--vlm-path", "--llm-path", "--output-path", "--materials-path", "--max-shard-size", "--dtype",
                 "--seed", "--overwrite"):
        assert flag in text


def test_processor_gets_the_training_image_bounds(tiny_qwen25vl, tiny_qwen3, tmp_path):
    model_merger.merge(str(tiny_qwen25vl), str(tiny_qwen3), str(tmp_path / "default"), quiet=True)
    cfg = json.loads((tmp_path / "default/preprocessor_config.json").read_text())
    assert (cfg["min_pixels"], cfg["max_pixels"]) == (256 * 28 * 28, 1280 * 28 * 28)
    assert cfg["size"] == {"shortest_edge": 256 * 28 * 28, "longest_edge": 1280 * 28 * 28}
    model_merger.merge(str(tiny_qwen25vl), str(tiny_qwen3), str(tmp_path / "keep"), quiet=True,
                       image_min_pixels=0, image_max_pixels=0)
    kept = json.loads((tmp_path / "keep/preprocessor_config.json").read_text())
    source = json.loads((tiny_qwen25vl / "preprocessor_config.json").read_text())
    assert (kept["min_pixels"], kept["max_pixels"]) == (source["min_pixels"], source["max_pixels"])


def test_every_option_is_a_flag_and_flags_reach_merge_by_keyword(tiny_qwen25vl, tiny_qwen3, tmp_path):
    import dataclasses
    text = run_cli("--help").stdout
    for f in dataclasses.fields(model_merger.MergeOptions):
        assert "--" + f.name.replace("_", "-") in text, f.name
    args = model_merger.build_parser().parse_args(["--vlm-path", "V", "--llm-path", "L", "--seed", "7",
                                                   "--max-shard-size", "2GB", "--init-std", "0.5"])
    options = model_merger.MergeOptions(**vars(args))
    assert (options.vlm_path, options.llm_path, options.seed, options.max_shard_size, options.init_std) == \
        ("V", "L", 7, 2 * 10**9, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 8


def test_decimal_size_parser_uses_hub_units():
    assert model_merger.parse_decimal_size("5GB") == 5 * 10**9
    assert model_merger.parse_decimal_size("500MB") == 500 * 10**6
    assert model_merger.parse_decimal_size("1GiB") == 2**30
    assert model_merger.parse_decimal_size("123") == 123

"""Config conformance of merge/model_merger.py over the layouts real checkpoints have (tests/data/configs/*.json).

Rows: the hub originals of Qwen2.5-VL-3B/7B/32B/72B-Instruct and the same configs re-saved by transformers 4.51, 4.52,
4.53 and >= 4.56 (nested text_config with nulls, rope_scaling with both type and rope_type, dtype instead of
torch_dtype), each merged with Qwen3-4B; every dense Qwen3 (0.6B-32B, the 4B 2507 variants, a >= 4.56 re-save of 8B),
a YaRN Qwen3 and a MoE Qwen3 (Qwen3-30B-A3B-Instruct-2507), each merged with the Qwen2.5-VL-7B original.

* Every config, at full size, resolves in the merger exactly as transformers 4.52.3 resolves it (the installed
  Qwen2_5_VLConfig / Qwen3Config are the reference).
* Every row either merges into a checkpoint that transformers loads, whose config fields equal the sources' (as
  transformers reads them), whose every parameter equals its source tensor bit for bit, and whose text logits equal
  the source Qwen3's; or is refused with one line that says why and what to do.

Weights are shrunk only where needed: the fields that set tensor shapes (hidden sizes, layers, heads, vision depth) are
made small in every place a config holds them; every other field, the layout, the nulls and the missing keys stay as
published. Sources are bf16 and sharded by transformers' own save_pretrained.
"""
from __future__ import annotations

import copy
import inspect
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
CONFIGS = REPO / "tests/data/configs"
VLM_SIZES = ("3b", "7b", "32b", "72b")
VLM_LAYOUTS = ("hub", "resaved_4_51", "resaved_4_52", "resaved_4_53", "resaved_4_56")
LLMS = ("qwen3_0_6b", "qwen3_1_7b", "qwen3_4b", "qwen3_8b", "qwen3_14b", "qwen3_32b", "qwen3_4b_instruct_2507",
        "qwen3_4b_thinking_2507", "qwen3_8b.resaved_4_56", "qwen3_30b_a3b_instruct_2507")
REFUSED = {  # LLM config -> what the one-line refusal must say
    "qwen3_4b_yarn": ["rope_scaling 'yarn'", "vLLM", "remove \"rope_scaling\""],
}
ROWS = ([(f"qwen2_5_vl_{size}.{layout}", "qwen3_4b") for size in VLM_SIZES for layout in VLM_LAYOUTS]
        + [("qwen2_5_vl_7b.hub", llm) for llm in (*LLMS, *REFUSED)])

# Shape-setting fields and their shrunk values (head_dim stays 128 and mrope_section [16, 24, 24], as published).
SHRINK_VLM_TEXT = {"hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
                   "num_key_value_heads": 1}
SHRINK_VISION = {"hidden_size": 64, "num_heads": 2, "intermediate_size": 128}  # depth, windows, out width: as published
SHRINK_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1}
SHRINK_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}  # only in qwen3_moe configs
VLM_WEIGHT_VOCAB = 512  # the VLM's own text tower is never read by the merger: its embedding is kept small


def published(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())["config"]


def shrink(config: dict, fields: dict) -> dict:
    out = copy.deepcopy(config)
    out.update(fields)
    if isinstance(out.get("layer_types"), list):
        out["layer_types"] = out["layer_types"][: out["num_hidden_layers"]]
    return out


def shrunk_vlm(config: dict) -> dict:
    out = shrink(config, SHRINK_VLM_TEXT)
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = shrink(out["text_config"], SHRINK_VLM_TEXT)
    out["vision_config"] = {**out["vision_config"], **SHRINK_VISION}
    return out


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norm weights and biases included), so each tensor is unique."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


# ----------------------------------------------------------------------------------------------------------------
# 1. Resolution of every published layout, at full size, against transformers 4.52.3 itself

def test_defaults_tables_equal_the_installed_config_classes():
    from transformers import Qwen2_5_VLConfig, Qwen3Config
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

    def defaults(cls):
        return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}

    assert {k: defaults(Qwen2_5_VLVisionConfig)[k] for k in model_merger.VISION_DEFAULTS} == \
        model_merger.VISION_DEFAULTS
    assert {k: defaults(Qwen3Config)[k] for k in model_merger.QWEN3_DEFAULTS} == model_merger.QWEN3_DEFAULTS
    assert {k: defaults(Qwen2_5_VLConfig)[k] for k in model_merger.VLM_TOKEN_DEFAULTS} == \
        model_merger.VLM_TOKEN_DEFAULTS


@pytest.mark.parametrize("name", sorted({vlm for vlm, _ in ROWS}))
def test_vlm_config_resolves_as_transformers_does(name):
    from transformers import Qwen2_5_VLConfig

    config = published(name)
    reference = Qwen2_5_VLConfig(**copy.deepcopy(config))
    ours_text = model_merger.vlm_text_fields(config)
    assert ours_text["rope_scaling"] == reference.text_config.rope_scaling
    for key in ("hidden_size", "vocab_size", "num_hidden_layers"):
        assert ours_text[key] == getattr(reference.text_config, key), key
    tokens = model_merger.vlm_token_ids(config)
    assert tokens == {key: getattr(reference, key, None) for key in model_merger.VISION_TOKENS}
    assert None not in tokens.values()  # a nested null never wins over the top-level id
    vision = model_merger.vision_fields(config)
    for key in model_merger.VISION_DEFAULTS:
        assert vision[key] == getattr(reference.vision_config, key), key


@pytest.mark.parametrize("name", [*LLMS, "qwen3_4b_yarn"])
def test_llm_config_resolves_as_transformers_does(name):
    from transformers import AutoConfig

    config = published(name)
    reference = AutoConfig.for_model(**copy.deepcopy(config))
    ours = model_merger.qwen3_fields(config)
    assert ours == {key: getattr(reference, key) for key in model_merger.LLM_DEFAULTS[config["model_type"]]} | \
        {"head_dim": reference.head_dim}


def test_the_published_sparse_vision_configs_are_what_the_rows_exercise():
    """The hub originals omit most vision fields (the 7B even out_hidden_size); the re-saves spell them out."""
    assert "out_hidden_size" not in published("qwen2_5_vl_7b.hub")["vision_config"]
    assert "depth" not in published("qwen2_5_vl_72b.hub")["vision_config"]
    resaved = published("qwen2_5_vl_3b.resaved_4_52")
    assert resaved["text_config"]["image_token_id"] is None and resaved["image_token_id"] == 151655
    assert "dtype" in published("qwen2_5_vl_3b.resaved_4_56") and "torch_dtype" not in \
        published("qwen2_5_vl_3b.resaved_4_56")


# ----------------------------------------------------------------------------------------------------------------
# 2. Each row merged (shrunk weights) and loaded, or refused

class Weights:
    """bf16 sharded source weights, built once per module and shared by the rows: shrunk Qwen2.5-VLs (one per vision
    merger width, in both key layouts) and shrunk Qwen3s (tied and untied)."""

    def __init__(self, root: Path, tokenizer: Path, processor_files: list[Path]):
        self.root, self.tokenizer, self.processor_files, self.built = root, tokenizer, processor_files, {}

    def vlm(self, config: dict, nested_keys: bool) -> Path:
        """Weights for a (shrunk) VLM config; transformers 4.52 saves the nested key layout (model.visual.*,
        model.language_model.*), the hub originals hold the legacy one (visual.*, model.*)."""
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        reference = Qwen2_5_VLConfig(**copy.deepcopy(config)).vision_config
        key = ("vlm", reference.depth, reference.out_hidden_size, nested_keys)
        if key not in self.built:
            build = shrink(published("qwen2_5_vl_7b.hub"), {**SHRINK_VLM_TEXT, "vocab_size": VLM_WEIGHT_VOCAB})
            build["vision_config"] = {**build["vision_config"], **SHRINK_VISION, "depth": reference.depth,
                                      "fullatt_block_indexes": reference.fullatt_block_indexes,
                                      "out_hidden_size": reference.out_hidden_size}
            model = randomize(Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**build)), seed=len(self.built))
            path = self.root / "-".join(map(str, key))
            model.to(torch.bfloat16).save_pretrained(path, max_shard_size="1MB", safe_serialization=True)
            if not nested_keys:
                legacy_keys(path)
            for f in self.processor_files:
                shutil.copy2(f, path / f.name)
            self.built[key] = path
        return self.built[key]

    def llm(self, tied: bool, kind: str = "qwen3") -> Path:
        from transformers import AutoConfig, AutoModelForCausalLM

        key = ("llm", tied, kind)
        if key not in self.built:
            if kind == "qwen3_moe":
                config = shrink(published("qwen3_30b_a3b_instruct_2507"), {**SHRINK_LLM, **SHRINK_MOE})
            else:
                config = shrink(published("qwen3_4b" if tied else "qwen3_8b"), SHRINK_LLM)
            model = randomize(AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)), seed=100 + tied)
            path = self.root / ("-".join(["llm", "tied" if tied else "untied", kind]))
            model.to(torch.bfloat16).save_pretrained(path, max_shard_size="8MB", safe_serialization=True)
            for f in self.tokenizer.iterdir():
                shutil.copy2(f, path / f.name)
            self.built[key] = path
        return self.built[key]


def legacy_keys(path: Path) -> None:
    """Rename a sharded checkpoint's keys in place to the hub originals' layout (visual.*, model.*)."""
    weight_map = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            renamed = {(k[len("model."):] if k.startswith("model.visual.") else
                        "model." + k[len("model.language_model."):] if k.startswith("model.language_model.")
                        else k): f.get_tensor(k) for k in f.keys()}
        save_file(renamed, str(shard), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in renamed})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def weights(tmp_path_factory, fixture_paths, tiny_qwen25vl) -> Weights:
    processor_files = [tiny_qwen25vl / f for f in ("preprocessor_config.json", "video_preprocessor_config.json")
                       if (tiny_qwen25vl / f).is_file()]
    return Weights(tmp_path_factory.mktemp("conformance-weights"), fixture_paths["tokenizer"], processor_files)


def source_dir(base: Path, weights_dir: Path, config: dict) -> Path:
    """A checkpoint folder: the shared weights (linked) and the row's own config.json."""
    base.mkdir(parents=True)
    for f in weights_dir.iterdir():
        if f.name != "config.json":
            (base / f.name).symlink_to(f)
    (base / "config.json").write_text(json.dumps(config, indent=2))
    return base


def sources_of(weights: Weights, tmp_path: Path, vlm_name: str, llm_name: str) -> tuple[Path, Path, dict, dict]:
    vlm_cfg = shrunk_vlm(published(vlm_name))
    llm_cfg = shrink(published(llm_name), SHRINK_LLM | (SHRINK_MOE if "num_experts" in published(llm_name) else {}))
    nested_keys = vlm_name.endswith(("resaved_4_52", "resaved_4_53", "resaved_4_56"))  # saved by those versions
    return (source_dir(tmp_path / "vlm", weights.vlm(vlm_cfg, nested_keys), vlm_cfg),
            source_dir(tmp_path / "llm", weights.llm(bool(llm_cfg.get("tie_word_embeddings")), llm_cfg["model_type"]),
                       llm_cfg),
            vlm_cfg, llm_cfg)


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "rope_theta", "max_position_embeddings", "rms_norm_eps",
               "tie_word_embeddings", "attention_bias", "hidden_act", "use_sliding_window", "max_window_layers")
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
              "norm_topk_prob", "router_aux_loss_coef", "output_router_logits")


def check_merged(out: Path, vlm: Path, llm: Path, vlm_cfg: dict, llm_cfg: dict, check_logits: bool) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, Qwen2_5_VLConfig

    # config: as transformers reads the merged checkpoint == as it reads the sources
    merged = AutoConfig.from_pretrained(out)
    src_vlm, src_llm = Qwen2_5_VLConfig(**copy.deepcopy(vlm_cfg)), AutoConfig.for_model(**copy.deepcopy(llm_cfg))
    for key in TEXT_FIELDS + (MOE_FIELDS if src_llm.model_type == "qwen3_moe" else ()):
        assert getattr(merged.text_config, key) == getattr(src_llm, key), key
    assert merged.text_config.is_moe == (src_llm.model_type == "qwen3_moe")
    assert merged.text_config.rope_scaling["mrope_section"] == src_vlm.text_config.rope_scaling["mrope_section"]
    for key in model_merger.VISION_DEFAULTS:
        assert getattr(merged.vision_config, key) == getattr(src_vlm.vision_config, key), key
    for key in model_merger.VISION_TOKENS:
        assert getattr(merged, key) == getattr(src_vlm, key), key
    assert merged.torch_dtype == torch.bfloat16

    # weights: every parameter of the loaded model is its source tensor, bit for bit
    model = AutoModelForImageTextToText.from_pretrained(out, torch_dtype=torch.bfloat16).eval()
    vlm_t, llm_t, out_t = all_tensors(vlm), all_tensors(llm), all_tensors(out)
    vision_src = {("visual." + k.split("visual.", 1)[1]): t for k, t in vlm_t.items() if "visual." in k}
    state = model.state_dict()
    assert state, "the merged model has parameters"
    for name, param in state.items():
        if name.startswith("model.visual.merger.mlp.4."):
            expected = out_t[name[len("model."):]]  # the new projector, as written
        elif name.startswith("model.visual."):
            expected = vision_src[name[len("model."):]]
        elif name.startswith("model.language_model."):
            expected = llm_t["model." + name[len("model.language_model."):]]
        else:
            assert name == "lm_head.weight", name
            expected = llm_t["model.embed_tokens.weight" if src_llm.tie_word_embeddings else "lm_head.weight"]
        assert param.dtype == expected.dtype and torch.equal(param, expected), name
    assert set(vision_src) == {k for k in out_t if k.startswith("visual.") and ".mlp.4." not in k}

    if not check_logits:
        return
    # behaviour: text logits equal the source Qwen3's (positions through M-RoPE == plain RoPE for text)
    ids = torch.tensor([[151644, 872, 198, *range(1000, 1021), 151645]])
    qwen3 = AutoModelForCausalLM.from_pretrained(llm, torch_dtype=torch.float32).eval()
    model = model.float()
    with torch.no_grad():
        delta = (model(input_ids=ids).logits - qwen3(input_ids=ids).logits).abs().max().item()
    assert delta < 1e-3, delta


@pytest.mark.parametrize("vlm_name, llm_name", ROWS, ids=[f"{vlm}+{llm}" for vlm, llm in ROWS])
def test_row_merges_and_matches_its_sources_or_is_refused(vlm_name, llm_name, weights, tmp_path):
    vlm, llm, vlm_cfg, llm_cfg = sources_of(weights, tmp_path, vlm_name, llm_name)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "merge/model_merger.py"), "--quiet", "--vlm-path", str(vlm),
                           "--llm-path", str(llm), "--output-path", str(out), "--max-shard-size", "10MB"],
                          capture_output=True, text=True, timeout=300)
    if llm_name in REFUSED:
        err = proc.stderr.strip()
        assert proc.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, proc.stderr
        for text in REFUSED[llm_name]:
            assert text in err, (text, err)
        assert not out.exists()
        return
    assert proc.returncode == 0, proc.stderr
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded output, with its index
    check_merged(out, vlm, llm, vlm_cfg, llm_cfg, check_logits=vlm_name == "qwen2_5_vl_7b.hub")  # LLM rows


def test_bf16_sharded_sources_merge_bit_exact(weights, tmp_path):
    """Every tensor of a merge of bf16, sharded sources (several shards + index each) is bit-identical to its source,
    whichever shard it sits in, and the output index lists exactly the tensors written."""
    vlm, llm, _, _ = sources_of(weights, tmp_path, "qwen2_5_vl_7b.hub", "qwen3_8b")
    assert len(list(vlm.glob("model-*.safetensors"))) > 1 and len(list(llm.glob("model-*.safetensors"))) > 1
    summary = model_merger.merge(vlm, llm, tmp_path / "out", max_shard_size=5 * 10**6, quiet=True)
    assert summary["dtype"] == "bfloat16" and summary["shards"] > 1
    got = all_tensors(tmp_path / "out")
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    vision = {("visual." + k.split("visual.", 1)[1]): t for k, t in all_tensors(vlm).items() if "visual." in k}
    sources = {**vision, **all_tensors(llm)}
    assert set(got) == set(sources) | set(model_merger.NEW_TENSORS)
    for name, tensor in sources.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name].view(torch.int16),
                                                                  tensor.view(torch.int16)), name

"""The tiny stage recipes (examples/tiny) run with the real `llamafactory-cli` on CPU and change exactly the
parameters each stage is meant to train; LoRA + `llamafactory-cli export` give a full checkpoint that chats; what
training saves (nested key layout) loads back in transformers and vLLM.

The runs chain like the real recipe: stage 1 starts from the merger's flat checkpoint, 2.1 from stage 1's output,
2.2 (under DeepSpeed ZeRO-3, torchrun, gloo) from 2.1's; stage 3 starts from the untied (8B-like) flat checkpoint.
Stages 1, 2.1, 3, the LoRA run and its export go through the CLI's entry point one after the other in one
subprocess (imports paid once); stage 2.2 is a `llamafactory-cli train` process of its own (torchrun).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from examples.compare_checkpoints import compare_checkpoints
from examples.tiny.make_tiny_data import make_tiny_data
from tests.test_train_templates import assert_chat_renders_the_chat_template

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny"
DS_ZERO3 = REPO / "examples" / "deepspeed" / "ds_z3_config.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


# Runs `llamafactory-cli` commands one after the other in one process, through the console script's own entry
# point (`llamafactory.cli:main`), so the ~15 s of imports are paid once, not once per recipe.
CLI_SEQUENCE = textwrap.dedent("""
    import json, sys
    from llamafactory.cli import main

    if __name__ == "__main__":
        for argv in json.load(open(sys.argv[1])):
            print("=== llamafactory-cli", *argv, flush=True)
            sys.argv = ["llamafactory-cli", *argv]
            main()
""")


def run_logged(args: list[str], env: dict, log: Path) -> str:
    """Run a command with its output in `log`; fail the test with the log's tail when it fails."""
    with open(log, "w") as out:
        proc = subprocess.run(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=800,
                              check=False)
    text = log.read_text()
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, args[:3]))}... failed (rc {proc.returncode}); log {log}:\n{text[-4000:]}")
    return text


def cli_args(command: str, recipe: str, **overrides) -> list[str]:
    return [command, str(TINY / recipe), *(f"{key}={value}" for key, value in overrides.items())]


def losses(output_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train_stages")


@pytest.fixture(scope="module")
def tiny_data(work, sample_images) -> Path:
    return make_tiny_data(work / "data", images=sample_images[0].parent)


@pytest.fixture(scope="module")
def cli_env(venv_env, work) -> dict:
    return {**venv_env, "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def runs(cli_env, work, tiny_data, tiny_merged, tiny_merged_untied) -> dict[str, Path]:
    """Stage 1 (from the flat tied checkpoint), 2.1 (from stage 1's output), 3 (from the flat untied checkpoint),
    a stage-3 LoRA run and its export; output folders by name."""
    out = {name: work / name for name in ("stage1", "stage2.1", "stage3", "stage3-lora", "stage3-lora-merged")}
    data = {"dataset_dir": tiny_data}
    sequence = [
        cli_args("train", "stage1.yaml", model_name_or_path=tiny_merged, output_dir=out["stage1"], **data),
        cli_args("train", "stage2.1.yaml", model_name_or_path=out["stage1"], output_dir=out["stage2.1"], **data),
        cli_args("train", "stage3.yaml", model_name_or_path=tiny_merged_untied, output_dir=out["stage3"], **data),
        cli_args("train", "stage3_lora.yaml", model_name_or_path=tiny_merged, output_dir=out["stage3-lora"], **data),
        cli_args("export", "export_lora.yaml", model_name_or_path=tiny_merged, adapter_name_or_path=out["stage3-lora"],
                 export_dir=out["stage3-lora-merged"]),
    ]
    (work / "sequence.json").write_text(json.dumps(sequence))
    (work / "cli_sequence.py").write_text(CLI_SEQUENCE)
    run_logged([sys.executable, str(work / "cli_sequence.py"), str(work / "sequence.json")], cli_env,
               work / "sequence.log")
    return out


@pytest.fixture(scope="module")
def stage2_2_zero3(cli_env, work, tiny_data, runs) -> tuple[Path, str]:
    """Stage 2.2 from stage 2.1's output, as its own `llamafactory-cli train` under torchrun + DeepSpeed ZeRO-3."""
    out = work / "stage2.2"
    cli = str(Path(sys.executable).parent / "llamafactory-cli")
    env = {**cli_env, "FORCE_TORCHRUN": "1", "NNODES": "1", "NPROC_PER_NODE": "1"}
    log = run_logged([cli, *cli_args("train", "stage2.2.yaml", model_name_or_path=runs["stage2.1"], output_dir=out,
                                     dataset_dir=tiny_data, deepspeed=DS_ZERO3)], env, work / "stage2.2.log")
    return out, log


def assert_trained_exactly(before: Path, after: Path, groups: set[str]) -> None:
    problems = compare_checkpoints(before, after).check(groups)
    assert not problems, f"{after} vs {before}:\n" + "\n".join(problems)


def assert_loss_decreases(output_dir: Path) -> None:
    logged = losses(output_dir)
    assert len(logged) >= 3 and logged[-1] < logged[0], f"losses {logged}"


def test_stage1_trains_only_the_projector(runs, tiny_merged):
    assert_loss_decreases(runs["stage1"])
    assert_trained_exactly(tiny_merged, runs["stage1"], {"projector"})


def test_stage2_1_trains_projector_and_language_model_from_a_nested_checkpoint(runs):
    assert_loss_decreases(runs["stage2.1"])
    assert_trained_exactly(runs["stage1"], runs["stage2.1"], {"projector", "language_model"})


def test_stage2_2_under_deepspeed_zero3_freezes_the_vision_tower(stage2_2_zero3, runs):
    out, log = stage2_2_zero3
    assert "Creating torch.float32 ZeRO stage 3 optimizer" in log  # DeepSpeed's own message: ZeRO-3 really ran
    assert "distributed training: True" in log
    assert_loss_decreases(out)
    assert_trained_exactly(runs["stage2.1"], out, {"projector", "language_model"})


def test_stage3_on_untied_model_also_trains_lm_head(runs, tiny_merged_untied):
    assert_loss_decreases(runs["stage3"])
    assert_trained_exactly(tiny_merged_untied, runs["stage3"], {"projector", "language_model", "lm_head"})


def saved_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def test_training_output_loads_back_in_transformers(runs, sample_images):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = runs["stage3"]
    saved = saved_tensors(out)
    assert all(k.startswith(("model.visual.", "model.language_model.")) or k == "lm_head.weight" for k in saved)
    model, info = AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "Qwen2_5_VL_MergeForConditionalGeneration"
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    loaded = model.state_dict()
    for key, tensor in saved.items():
        assert torch.equal(loaded[key], tensor), key
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[Image.open(sample_images[0]).convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(logits).all()


def test_training_keeps_the_models_chat_template(runs, tiny_merged):
    assert (runs["stage1"] / "chat_template.jinja").read_text() == (tiny_merged / "chat_template.jinja").read_text()


def test_lora_targets_only_language_model_linears_and_export_merges_them(runs, tiny_merged):
    adapter, merged = runs["stage3-lora"], runs["stage3-lora-merged"]
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert targets and all(".language_model." in t and t.rsplit(".", 1)[-1] in LORA_TARGETS for t in targets)
    result = compare_checkpoints(tiny_merged, merged)
    expected = {n for n in result.changed | result.unchanged
                if ".language_model.layers." in n and n.endswith(tuple(f"{t}.weight" for t in LORA_TARGETS))}
    assert expected and result.changed == expected and not (result.only_before | result.only_after)


def test_chat_engine_on_the_exported_model(runs, sample_images):
    from PIL import Image

    picture = Image.open(sample_images[1]).convert("RGB")
    assert_chat_renders_the_chat_template(runs["stage3-lora-merged"], picture, "What is it?")


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from PIL import Image
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        model, prompt_file, image, out = sys.argv[1:5]
        llm = LLM(model=model, dtype="float32", max_model_len=1024, enforce_eager=True, max_num_seqs=1, seed=0,
                  limit_mm_per_prompt={"image": 1})
        prompt = open(prompt_file).read()
        result = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": Image.open(image).convert("RGB")}}],
                              SamplingParams(max_tokens=6, temperature=0))
        json.dump(list(result[0].outputs[0].token_ids), open(out, "w"))
""")


@pytest.mark.vllm
def test_training_output_generates_in_vllm_like_transformers(runs, sample_images, work, cli_env):
    if not (REPO / "overlays" / "vllm" / "overlay.toml").is_file():
        pytest.skip("the vLLM overlay ([serve]) is not in this checkout yet")
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = runs["stage3"]
    picture, prompt_file = work / "picture.png", work / "prompt.txt"
    Image.open(sample_images[2]).convert("RGB").resize((112, 112)).save(picture)
    processor = AutoProcessor.from_pretrained(out)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    prompt_file.write_text(text)
    script, tokens_file = work / "vllm_generate.py", work / "vllm_tokens.json"
    script.write_text(VLLM_SCRIPT)
    env = {**cli_env, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(out), str(prompt_file), str(picture), str(tokens_file)],
                          env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    model = AutoModelForImageTextToText.from_pretrained(out)
    inputs = processor(text=[text], images=[Image.open(picture)], return_tensors="pt")
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=6)[0, inputs["input_ids"].shape[1]:]
    assert json.loads(tokens_file.read_text()) == generated.tolist()

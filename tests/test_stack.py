"""The installed stack itself: fixtures load in transformers and vLLM (CPU), LLaMA-Factory trains the stock tiny
Qwen2.5-VL, install.sh is a fast no-op when re-run and --check reports every framework."""
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def test_fixtures_load_in_transformers(tiny_qwen3, tiny_qwen3_untied, tiny_qwen25vl, sample_images):
    from transformers import (AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                              Qwen2Tokenizer)
    from examples.tiny.tiny_models import IDS

    fast, slow = AutoTokenizer.from_pretrained(tiny_qwen3), Qwen2Tokenizer.from_pretrained(tiny_qwen3)
    text = "Hello 世界 <think>x</think><|im_start|>user"
    assert fast(text).input_ids == slow(text).input_ids
    assert fast("Hello").input_ids == [9707]  # the real Qwen BPE id
    assert all(fast.convert_tokens_to_ids(t) == i for t, i in IDS.items())
    for path, tied in ((tiny_qwen3, True), (tiny_qwen3_untied, False)):
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.tie_word_embeddings is tied
        assert (model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()) is tied
    vl = AutoModelForImageTextToText.from_pretrained(tiny_qwen25vl).eval()
    processor = AutoProcessor.from_pretrained(tiny_qwen25vl)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.open(sample_images[0])], return_tensors="pt")
    with torch.no_grad():
        out = vl.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 4


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from PIL import Image
    from vllm import LLM, SamplingParams
    vlm, llm_dir, image = sys.argv[1:4]
    greedy = SamplingParams(max_tokens=6, temperature=0)
    out = {}
    engine = LLM(model=vlm, dtype="bfloat16", max_model_len=1024, enforce_eager=True, max_num_seqs=2, seed=0,
                 limit_mm_per_prompt={"image": 1})
    prompt = ("<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\\n"
              "<|im_start|>assistant\\n")
    res = engine.generate([{"prompt": prompt, "multi_modal_data": {"image": Image.open(image)}}], greedy)
    out["vlm"] = list(res[0].outputs[0].token_ids)
    out["vlm_prompt_len"] = len(res[0].prompt_token_ids)
    del engine
    engine = LLM(model=llm_dir, dtype="bfloat16", max_model_len=1024, enforce_eager=True, max_num_seqs=2, seed=0)
    res = engine.generate(["<|im_start|>user\\nHello<|im_end|>\\n<|im_start|>assistant\\n"], greedy)
    out["llm"] = list(res[0].outputs[0].token_ids)
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.vllm
def test_fixtures_generate_in_vllm_cpu(tiny_qwen25vl, tiny_qwen3, sample_images, venv_env, tmp_path):
    script = tmp_path / "gen.py"
    script.write_text(VLLM_SCRIPT)
    env = {**venv_env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, str(script), str(tiny_qwen25vl), str(tiny_qwen3), str(sample_images[0])],
                          capture_output=True, text=True, env=env, timeout=600)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(line[len("RESULT "):])
    assert len(result["vlm"]) == 6 and len(result["llm"]) == 6
    assert result["vlm_prompt_len"] > 20  # the image was expanded into many <|image_pad|> tokens


def make_sharegpt_parquet(path: Path, images: list[Path], rows: int = 4) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    messages = [[{"role": "user", "content": "<image>Describe the picture."},
                 {"role": "assistant", "content": f"A photo number {i} with colours and shapes."}] for i in range(rows)]
    imgs = [[{"bytes": images[i % len(images)].read_bytes(), "path": None}] for i in range(rows)]
    pq.write_table(pa.table({"messages": messages, "images": imgs}), path)


def test_llamafactory_sft_two_steps_on_stock_qwen25vl(tiny_qwen25vl, sample_images, venv_env, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    make_sharegpt_parquet(data / "tiny_mm.parquet", sample_images)
    (data / "dataset_info.json").write_text(json.dumps({"tiny_mm": {
        "file_name": "tiny_mm.parquet", "formatting": "sharegpt", "columns": {"messages": "messages", "images": "images"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    yaml = tmp_path / "sft.yaml"
    yaml.write_text(textwrap.dedent(f"""
        model_name_or_path: {tiny_qwen25vl}
        image_max_pixels: 50176
        stage: sft
        do_train: true
        finetuning_type: full
        freeze_vision_tower: true
        dataset: tiny_mm
        dataset_dir: {data}
        template: qwen2_vl
        cutoff_len: 512
        overwrite_cache: true
        preprocessing_num_workers: 1
        dataloader_num_workers: 0
        output_dir: {tmp_path / 'out'}
        logging_steps: 1
        save_strategy: "no"
        report_to: none
        per_device_train_batch_size: 2
        learning_rate: 1.0e-3
        max_steps: 2
        bf16: false
        """))
    proc = subprocess.run(["llamafactory-cli", "train", str(yaml)], capture_output=True, text=True, env=venv_env,
                          cwd=tmp_path, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    losses = [float(x) for x in re.findall(r"'loss': ([0-9.]+)", log)]
    assert len(losses) == 2 and all(x > 0 for x in losses), log[-3000:]
    assert "Set vision model not trainable" in log


def test_install_is_a_fast_noop_and_check_reports_all():
    first = subprocess.run(["bash", str(REPO / "install.sh")], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "already installed" in first.stdout and "already applied" in first.stdout
    assert "applied (" not in first.stdout.replace("already applied (", "")
    check = subprocess.run(["bash", str(REPO / "install.sh"), "--check"], capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    sys.path.insert(0, str(REPO))
    from overlays.apply import all_overlay_names, load_manifest
    for name in all_overlay_names():
        assert re.search(rf"\[check\] {load_manifest(name)['package']}\s+OK", check.stdout), check.stdout


def test_install_finds_installed_fonts_every_time_under_pipefail():
    """install.sh runs with `set -o pipefail`: a font probe like `fc-list | grep -q` fails at random (grep quits, fc-list
    dies of SIGPIPE), and install.sh then calls apt-get on every re-run. Twenty probes in a row must all find the fonts
    (QWEN_MERGE_NO_APT=1: a miss prints the 'install a CJK font yourself' note instead of calling apt-get)."""
    fonts = subprocess.run(["fc-list"], capture_output=True, text=True).stdout.lower()
    assert "wqy" in fonts and "dejavu" in fonts, "install.sh installs these fonts; this machine lacks them"
    script = (REPO / "install.sh").read_text()
    install_fonts = script[script.index("install_fonts() {"):script.index("\n}\n", script.index("install_fonts() {")) + 3]
    probe = f"set -euo pipefail\nsay() {{ echo \"$*\"; }}\n{install_fonts}\nfor _ in $(seq 20); do install_fonts; done\n"
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "QWEN_MERGE_NO_APT": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout == "", out.stdout

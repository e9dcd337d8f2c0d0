"""The converted parquet trains in LLaMA-Factory: a 2-step ``llamafactory-cli train`` on a tiny Qwen2.5-VL."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from data_process import process_llava, process_synthdog
from tests import data_fixtures as fx

pytestmark = pytest.mark.timeout(600)


def test_two_step_llamafactory_run(tmp_path, tiny_qwen25vl, venv_env):
    cli = Path(sys.executable).parent / "llamafactory-cli"
    assert cli.exists() or shutil.which("llamafactory-cli"), "llamafactory-cli is not installed: run install.sh"
    rows, _ = fx.recap_rows(num_good=4)
    recap = fx.make_recap_repo(tmp_path / "recap", rows)
    synthdog_rows, _ = fx.synthdog_rows(num_good=3)
    synthdog = fx.make_synthdog_repo(tmp_path / "synthdog", synthdog_rows)
    data = tmp_path / "data"
    common = ["--output_dir", str(data), "--no_progress", "--num_processes", "1", "--rows_per_shard", "8"]
    assert process_llava.main(["--datasets", "lmms-lab/LLaVA-ReCap-558K",
                               "--source", f"lmms-lab/LLaVA-ReCap-558K={recap}", *common]) == 0
    assert process_synthdog.main(["--languages", "en", "--source", f"naver-clova-ix/synthdog-en={synthdog}",
                                  *common]) == 0
    assert sorted(json.loads((data / "dataset_info.json").read_text())) == ["LLaVA_ReCap_558K", "synthdog_en"]

    config = {
        "model_name_or_path": str(tiny_qwen25vl),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "full",
        "dataset": "LLaVA_ReCap_558K,synthdog_en",
        "dataset_dir": str(data),
        "template": "qwen2_vl",
        "cutoff_len": 512,
        "max_steps": 2,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "image_max_pixels": 50176,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "report_to": "none",
        "bf16": False,
        "save_strategy": "no",
        "logging_steps": 1,
        "output_dir": str(tmp_path / "train"),
        "overwrite_output_dir": True,
    }
    config_path = tmp_path / "train.yaml"
    config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run(["llamafactory-cli", "train", str(config_path)], env=venv_env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "train_loss" in result.stdout + result.stderr

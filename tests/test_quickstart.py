"""The README's main command, whole: sources -> merge -> data -> distill -> train -> serve -> eval, then a rerun that
skips every finished step. The toy task is to name the colour of the shape in a picture; the run must show that
the pipeline carries what is in a picture into the answer (trained accuracy high, untrained near chance)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.quickstart_samples import BACKGROUNDS, COLOURS, QUESTION, SHAPES, draw_picture, pictures

REPO = Path(__file__).resolve().parent.parent
STEPS = ["sources", "merge", "data", "distill", "train", "serve", "eval"]


def run_quickstart(work: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "examples/quickstart.sh"), "--work", str(work), *extra],
                          capture_output=True, text=True, env={**env, "PYTHON": sys.executable}, timeout=2400)


def shape_colour_from_pixels(path: Path) -> str:
    """The colour name whose exact RGB covers most pixels (independent of the generator's bookkeeping)."""
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    counts = {name: int((pixels == np.array(rgb)).all(1).sum()) for name, rgb in COLOURS.items()}
    return max(counts, key=counts.get)


@pytest.fixture(scope="module")
def main_job(tmp_path_factory, venv_env):
    work = tmp_path_factory.mktemp("quickstart")
    first = run_quickstart(work, venv_env)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-3000:]
    return work, first


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # the main job's first run happens in this test's fixture
def test_main_job_runs_every_step_and_reports(main_job):
    work, first = main_job
    state = {p.stem: json.loads(p.read_text()) for p in (work / "state").glob("*.json")}
    assert set(state) == set(STEPS)
    summaries = state["data"]["summaries"]
    assert "rejected: image_truncated=1" in summaries["LLaVA_ReCap_558K"]
    assert "rejected: ground_truth_not_json=1" in summaries["synthdog_en"]
    assert state["distill"]["image_thinking_rows"] > 0 and state["distill"]["text2image_rows"] > 0
    report = json.loads((work / "report.json").read_text())
    assert (Path(report["final_model"]) / "config.json").is_file()
    assert set(report["timings_s"]) == set(STEPS) and all(report["timings_s"][s] > 0 for s in STEPS)
    assert "Qwen-Merge quickstart report" in first.stdout and (work / "report.txt").is_file()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # the main job's first run happens in this test's fixture
def test_every_stage_trains_what_its_recipe_says_and_the_loss_falls(main_job):
    work, _ = main_job
    stages = json.loads((work / "state/train.json").read_text())["stages"]
    assert list(stages) == ["stage1", "stage2.1", "stage2.2", "stage3"]
    as_int = lambda text: int(text.replace(",", ""))  # noqa: E731
    assert as_int(stages["stage1"]["trainable_params"]) < as_int(stages["stage1"]["all_params"]) // 50  # projector
    for stage in ("stage2.1", "stage2.2", "stage3"):  # + the language model
        assert as_int(stages[stage]["trainable_params"]) > as_int(stages[stage]["all_params"]) // 2
    for info in stages.values():
        assert len(info["losses"]) > 1 and info["losses"][-1] < info["losses"][0]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # the main job's first run happens in this test's fixture
def test_the_trained_model_sees_the_colour_and_the_untrained_merge_does_not(main_job):
    work, _ = main_job
    scores = json.loads((work / "report.json").read_text())["eval"]
    assert scores["chance"] == 0.25
    assert scores["trained"] >= 0.9, scores
    assert scores["untrained"] <= scores["chance"] + 0.15, scores


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # the main job's first run happens in this test's fixture
def test_the_served_model_names_the_colour_of_a_held_out_picture(main_job):
    work, _ = main_job
    serve = json.loads((work / "state/serve.json").read_text())
    truth = shape_colour_from_pixels(Path(serve["image"]))
    assert serve["answer"] == truth, serve["reply"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # the main job's first run happens in this test's fixture
def test_the_final_model_generalises_to_independently_drawn_pictures(main_job, tmp_path):
    """Pictures from a seed no step uses, answered by transformers (not the pipeline's own serving or eval)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    work, _ = main_job
    final = json.loads((work / "report.json").read_text())["final_model"]
    processor = AutoProcessor.from_pretrained(final)
    model = AutoModelForImageTextToText.from_pretrained(final, torch_dtype=torch.float32).eval()
    rng = np.random.default_rng(20261201)
    right = total = 0
    for _ in range(16):
        picture, _ = draw_picture(rng)
        path = tmp_path / f"p{total}.png"
        picture.save(path)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[Image.open(path)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        reply = processor.tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True)
        right += reply.split("</think>")[-1].strip().strip(".").lower() == shape_colour_from_pixels(path)
        total += 1
    assert right / total >= 0.8, f"{right} of {total}"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1800)  # the main job's first run happens in this test's fixture
def test_rerun_skips_every_finished_step(main_job, venv_env):
    work, _ = main_job
    before = (work / "state/train.json").read_text()
    again = run_quickstart(work, venv_env)
    assert again.returncode == 0, again.stdout[-3000:]
    for step in STEPS:
        assert f"{step}: done earlier, skipped" in again.stdout
    assert (work / "state/train.json").read_text() == before


def test_task_pictures_follow_the_spec_and_held_out_sets_are_disjoint():
    seen = []
    for kind in ("hub", "benchmark", "serve"):
        drawn = pictures(kind, 40 if kind != "serve" else 1)
        for picture, meta in drawn:
            assert 64 <= picture.width <= 448 and 64 <= picture.height <= 448
            assert meta["colour"] in COLOURS and meta["shape"] in SHAPES and meta["background"] in BACKGROUNDS
            pixels = np.asarray(picture).reshape(-1, 3)
            shape = (pixels == np.array(COLOURS[meta["colour"]])).all(1)
            assert 0.08 <= shape.mean() <= 0.82  # the drawn 10-80 %, give or take the pixels of the outline
            assert pixels[~shape].min() >= 200  # one light background
        seen.append({np.asarray(p).tobytes() for p, _ in drawn})
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2])


def test_a_step_whose_inputs_are_missing_names_the_step_to_run_first(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples/quickstart.py"), "--work", str(tmp_path),
                           "--steps", "train"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "step 'train' needs step(s) merge, data, distill first" in proc.stderr


def test_quickstart_rejects_unknown_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples/quickstart.py"), "--work", str(tmp_path),
                           "--steps", "merge,fly"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown step or stage: fly" in proc.stderr

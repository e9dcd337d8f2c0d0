"""The README's main command, whole: sources -> merge -> data -> train -> distill -> stage3 -> serve -> eval, then a
rerun that skips every finished step. The toy task is to name the colour of the shape in a picture; the run must show that
the pipeline carries what is in a picture into the answer (trained accuracy high, untrained near chance)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.quickstart_samples import BACKGROUNDS, COLOURS, QUESTION, SHAPES, draw_picture, pictures

REPO = Path(__file__).resolve().parent.parent
STEPS = ["sources", "merge", "data", "train", "distill", "stage3", "serve", "eval"]
COLOUR_WORDS = set(COLOURS)


def run_quickstart(work: Path, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "examples/quickstart.sh"), "--work", str(work), *extra],
                          capture_output=True, text=True, env={**env, "PYTHON": sys.executable}, timeout=1500, check=False)


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
@pytest.mark.timeout(1500)  # the main job's first run (about 10 min) happens in this test's fixture
def test_main_job_runs_every_step_and_reports(main_job):
    work, first = main_job
    state = {p.stem: json.loads(p.read_text()) for p in (work / "state").glob("*.json")}
    assert set(state) == set(STEPS)
    summaries = state["data"]["summaries"]
    assert "rejected: image_truncated=1" in summaries["LLaVA_ReCap_558K"]
    assert "rejected: ground_truth_not_json=1" in summaries["synthdog_en"]
    distill = state["distill"]
    assert distill["teacher"] == state["train"]["stages"]["stage2.2"]["model"]  # the pipeline's own stage-2.2 model
    assert distill["image_checker"].startswith(f"{distill['image_thinking_rows']} of ")  # the judge only formats
    assert distill["image_thinking_rows"] >= 64  # of the 96 pictures the teacher saw
    report = json.loads((work / "report.json").read_text())
    assert (Path(report["final_model"]) / "config.json").is_file()
    assert set(report["timings_s"]) == set(STEPS) and all(report["timings_s"][s] > 0 for s in STEPS)
    assert "Qwen-Merge quickstart report" in first.stdout and (work / "report.txt").is_file()


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1500)  # the main job's first run (about 10 min) happens in this test's fixture
def test_every_stage_trains_what_its_recipe_says_and_the_loss_falls(main_job):
    work, _ = main_job
    stages = {**json.loads((work / "state/train.json").read_text())["stages"],
              **json.loads((work / "state/stage3.json").read_text())["stages"]}
    assert list(stages) == ["stage1", "stage2.1", "stage2.2", "stage3"]
    as_int = lambda text: int(text.replace(",", ""))
    assert as_int(stages["stage1"]["trainable_params"]) < as_int(stages["stage1"]["all_params"]) // 50  # projector
    for stage in ("stage2.1", "stage2.2", "stage3"):  # + the language model
        assert as_int(stages[stage]["trainable_params"]) > as_int(stages[stage]["all_params"]) // 2
    for info in stages.values():
        assert len(info["losses"]) > 1 and info["losses"][-1] < info["losses"][0]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1500)  # the main job's first run (about 10 min) happens in this test's fixture
def test_the_trained_model_sees_the_colour_and_the_untrained_merge_does_not(main_job):
    work, _ = main_job
    scores = json.loads((work / "report.json").read_text())["eval"]
    score_files = json.loads((work / "state/eval.json").read_text())["score_files"]
    for label in ("untrained", "trained"):  # VLMEvalKit's own score file, not the quickstart's arithmetic
        with open(score_files[label]["file"]) as handle:
            overall = next(iter(csv.DictReader(handle)))["Overall"]
        assert float(overall) == scores[label]
    assert scores["chance"] == 0.25
    assert scores["trained"] >= 0.9, scores
    assert scores["untrained"] <= scores["chance"] + 0.15, scores


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1500)  # the main job's first run (about 10 min) happens in this test's fixture
def test_the_served_model_names_the_colour_of_a_held_out_picture(main_job):
    work, _ = main_job
    serve = json.loads((work / "state/serve.json").read_text())
    truth = shape_colour_from_pixels(Path(serve["image"]))
    assert serve["answer"] == truth, serve["reply"]


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1500)  # the main job's first run (about 10 min) happens in this test's fixture
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
        reply = processor.tokenizer.decode(out[0, inputs.input_ids.shape[1]:]).split("<|im_end|>")[0]
        right += reply.split("</think>")[-1].strip().strip(".").lower() == shape_colour_from_pixels(path)
        total += 1
    assert right / total >= 0.8, f"{right} of {total}"


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(1500)  # the main job's first run (about 10 min) happens in this test's fixture
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


def test_the_distillation_checker_keeps_only_well_formed_answers_equal_to_the_reference():
    from examples.quickstart import checker_summary, verify
    replies = {"<think>I look at the colour of the shape.</think>\n\nred": None,
               "<think>\nI look at the colour of the shape.\n</think>\n\nRed.": None,
               "<think>I look at the colour of the shape.</think>\n\nblue": "wrong_answer",
               "<think></think>\n\nred": "format_empty_thought",
               "red": "format_no_think_block"}
    reasons = [verify(reply, "red") for reply in replies]
    assert reasons == list(replies.values())
    assert checker_summary(reasons) == ("2 of 5 right (rejected: format_empty_thought=1, format_no_think_block=1, "
                                        "wrong_answer=1)")


def test_quickstart_rejects_unknown_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples/quickstart.py"), "--work", str(tmp_path),
                           "--steps", "merge,fly"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "unknown step: fly" in proc.stderr


def test_a_step_whose_inputs_are_missing_names_the_steps_to_run_first(tmp_path, venv_env):
    """`--steps train` on a fresh --work: one line naming the earlier steps, exit 2, no traceback, nothing run."""
    proc = subprocess.run(["bash", str(REPO / "examples/quickstart.sh"), "--work", str(tmp_path / "fresh"),
                           "--steps", "train"], capture_output=True, text=True,
                          env={**venv_env, "PYTHON": sys.executable}, timeout=300, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "needs the results of merge, data" in proc.stdout and "run --steps merge,data first" in proc.stdout
    assert not (tmp_path / "fresh" / "models").exists()


def test_stage3_needs_the_distilled_data_and_stage4_is_not_in_the_main_job(tmp_path, venv_env):
    """The teacher is the stage-2.2 model, so stage 3 comes after distill; stage 4 runs only when asked for."""
    proc = subprocess.run(["bash", str(REPO / "examples/quickstart.sh"), "--work", str(tmp_path / "fresh"),
                           "--steps", "stage3,stage4"], capture_output=True, text=True,
                          env={**venv_env, "PYTHON": sys.executable}, timeout=300, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs the results of data, train, distill" in proc.stdout
    help_text = subprocess.run([sys.executable, str(REPO / "examples/quickstart.py"), "--help"],
                               capture_output=True, text=True, check=False).stdout
    assert "default:" in help_text and "sources,merge,data,train,distill,stage3,serve,eval;" in help_text

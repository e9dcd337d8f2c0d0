#!/usr/bin/env python3
"""The whole Qwen-Merge pipeline in one command, at toy scale on a CPU box (or with real models on a GPU box).

    bash examples/quickstart.sh                   # tiny models, a toy colour task; under 10 min on 2 cores
    bash examples/quickstart.sh --steps merge,train,stage3 --size 4b --data-dir data \\
        --vlm-path Qwen/Qwen2.5-VL-72B-Instruct --llm-path Qwen/Qwen3-4B   # the GPU recipe: real sources, your data

The toy task (examples/quickstart_samples.py): name the colour of the one shape in a picture. Steps:
  sources  tiny Qwen2.5-VL + Qwen3 built offline
  merge    merge/model_merger.py: the untrained merge
  data     stage 1/2 data from hub-format samples through data_process/process_{llava,synthdog,onevision}.py
  train    stage 1 -> 2.1 -> 2.2 with llamafactory-cli
  distill  stage-3 data through data_process/stage3 against a local vLLM server; the teacher is the stage-2.2
           model, and only the answers a checker finds equal to the reference are kept
  stage3   stage 3 (thinking) with llamafactory-cli on the distilled data: the final model
  serve    vLLM's OpenAI server answers the colour question about a held-out picture
  eval     VLMEvalKit run.py on a held-out circular multiple-choice set, untrained merge and final model
  stage4   optional (only when named in --steps): rollouts -> RFT + DPO on the final model, pass@1 before/after
then a report (report.txt, report.json). Each finished step is recorded under --work; a rerun skips it (--redo STEP
runs it again). A step whose inputs come from an earlier step says so when that step has not run.
"""
from __future__ import annotations

import argparse
import base64
import csv
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TRAIN_STAGES = ["stage1", "stage2.1", "stage2.2"]  # the train step; stage 3 is its own step, after distill
TINY_PIXELS = (56 * 56, 112 * 112)  # 4..16 visual tokens per image: quick on a CPU
HUB_ROWS = 384           # pictures per hub dataset (ReCap, and each of the two OneVision configs)
# The tiny recipes (examples/tiny/*.yaml) are sized for the tests' four rows; on the toy task the quickstart runs
# them longer, with these measured settings.
TINY_SCHEDULE = {"stage1": {"max_steps": 8, "learning_rate": 2e-3},
                 "stage2.1": {"max_steps": 8, "learning_rate": 1e-3},
                 "stage2.2": {"max_steps": 96, "learning_rate": 1e-3, "lr_scheduler_type": "cosine"},
                 "stage3": {"max_steps": 32, "learning_rate": 1e-3, "lr_scheduler_type": "cosine"}}
DISTILL_PER_SOURCE = 48  # OneVision rows per config sent to the teacher
TEXT_QUERIES = 8         # text-version queries (DeepSeek + alpaca layouts) sent to the teacher
BENCH_QUESTIONS = 16     # held-out benchmark questions (x4 rotations)
BENCHMARK = "QuickStart_MMBench"  # "MMBench" in the name: VLMEvalKit scores it circularly
# The teacher's reply format, as a Qwen3-style thinking model writes it: a short thought, then a colour. Guided
# decoding fixes the wording only: the colour is the teacher's own choice, and the checker then keeps the replies that
# name the reference colour. The stage-2.2 teacher learnt to answer right after an empty thinking block; the shorter
# the thought, the closer its context to that (measured: with "I look at the colour of the shape." it took purple
# shapes for blue, with "Colour." it named 60 of 60 pictures right, as without a thought).
IMAGE_THOUGHT = "Colour."
TEXT_THOUGHT = "I read the colour in the question."
# The toy judge only formats a PASS: the checker before it (answer == reference) is what verifies.
FORMAT_JUDGE = {"guided_regex": r"The answer agrees with the reference\.\nVERDICT: PASS"}


class StepFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Pipeline], dict]
    needs: tuple[str, ...] = ()
    optional: bool = False  # not in the main job: runs only when named in --steps


def argv(flags: dict) -> list[str]:
    """``{"--a": 1, "--b": True, "--c": None}`` -> ``["--a", "1", "--b"]``."""
    out = []
    for flag, value in flags.items():
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


class Pipeline:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = args.work.resolve()
        self.state_dir = self.work / "state"
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                    "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}

    # -- bookkeeping -------------------------------------------------------------------------------------------
    def done(self, step: str) -> dict | None:
        path = self.state_dir / f"{step}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def record(self, step: str, result: dict) -> None:
        tmp = self.state_dir / f".{step}.json.tmp"
        tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False))
        os.replace(tmp, self.state_dir / f"{step}.json")

    def run(self, cmd: list, log_name: str, timeout: float = 3600, env: dict | None = None) -> str:
        """Run a command, its output teed to logs/<log_name>.log; return the output."""
        log = self.work / "logs" / f"{log_name}.log"
        log.parent.mkdir(exist_ok=True)
        cmd = [str(c) for c in cmd]
        with open(log, "w") as handle:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**self.env, **(env or {})},
                                  cwd=self.work, timeout=timeout, check=False)
        output = log.read_text(errors="replace")
        if proc.returncode != 0:
            raise StepFailed(f"{' '.join(cmd[:3])} ... exited {proc.returncode}; see {log}\n{output[-2500:]}")
        return output

    def say(self, text: str) -> None:
        print(f"[quickstart] {text}", flush=True)

    # -- steps -------------------------------------------------------------------------------------------------
    def sources(self) -> dict:
        if self.args.vlm_path and self.args.llm_path:
            return {"vlm": self.args.vlm_path, "llm": self.args.llm_path, "built": False}
        from examples.tiny.tiny_models import QWEN3_TEMPLATE, build_qwen3, build_qwen25vl, build_tokenizer
        out = self.work / "sources"
        build_tokenizer(out / "tokenizer", QWEN3_TEMPLATE)
        build_qwen3(out / "tiny-qwen3", out / "tokenizer", tied=True, seed=1)
        build_qwen25vl(out / "tiny-qwen2_5-vl", out / "tokenizer", seed=3)
        return {"vlm": str(out / "tiny-qwen2_5-vl"), "llm": str(out / "tiny-qwen3"), "built": True}

    def merge(self) -> dict:
        src = self.done("sources")
        out = self.work / "models" / "base"
        pixels = {} if self.args.size != "tiny" else {"--image-min-pixels": TINY_PIXELS[0],
                                                      "--image-max-pixels": TINY_PIXELS[1]}
        self.run([sys.executable, REPO / "merge/model_merger.py", *argv({
            "--vlm-path": src["vlm"], "--llm-path": src["llm"], "--output-path": out, "--overwrite": True,
            **pixels})], "merge")
        return {"model": str(out)}

    def data(self) -> dict:
        if self.args.data_dir:
            return {"data_dir": str(self.args.data_dir.resolve()), "prepared": "by you"}
        from examples.quickstart_samples import ONEVISION_CONFIGS, write_hub_samples
        hub = write_hub_samples(self.work / "hub", rows=HUB_ROWS)
        data = self.work / "data"
        common = {"--output_dir": data, "--num_processes": 2, "--no_progress": True}
        stats = {}
        out = self.run([sys.executable, REPO / "data_process/process_llava.py", *argv({
            "--datasets": "lmms-lab/LLaVA-ReCap-558K", "--source": f"lmms-lab/LLaVA-ReCap-558K={hub['recap']}",
            **common})], "data-llava")
        stats["LLaVA_ReCap_558K"] = summary_line(out)
        out = self.run([sys.executable, REPO / "data_process/process_synthdog.py", *argv({
            "--languages": "en", "--source": f"naver-clova-ix/synthdog-en={hub['synthdog']}", **common})],
            "data-synthdog")
        stats["synthdog_en"] = summary_line(out)
        out = self.run([sys.executable, REPO / "data_process/process_onevision.py", "--configs", *ONEVISION_CONFIGS,
                        *argv({**common, "--local_dir": hub["onevision"],
                               "--output_dir": data / "llavaonevision_converted"})], "data-onevision")
        stats["onevision"] = summary_line(out)
        return {"data_dir": str(data), "summaries": stats}

    def train(self) -> dict:
        stages = self.train_stages(TRAIN_STAGES, self.done("merge")["model"])
        return {"stages": stages, "final": stages[TRAIN_STAGES[-1]]["model"]}

    def distill(self) -> dict:
        if self.args.data_dir:
            return {"skipped": "stage-3 data is expected in --data-dir"}
        from examples.quickstart_samples import write_text_sources
        from examples.tiny.vllm_server import VllmStartError, vllm_server
        data, out = Path(self.done("data")["data_dir"]), self.work / "distill"
        out.mkdir(parents=True, exist_ok=True)
        sources = write_text_sources(self.work / "hub", rows=TEXT_QUERIES)
        teacher = self.done("train")["final"]  # the stage-2.2 model: it has learnt the task from the stage-2 data
        for name, body in (("image-teacher", teacher_format(teacher, IMAGE_THOUGHT)),
                           ("text-teacher", teacher_format(teacher, TEXT_THOUGHT)), ("judge", FORMAT_JUDGE)):
            (out / f"{name}.json").write_text(json.dumps(body))
        # Rows longer than the stage-3 training cutoff are dropped (too_long), measured with the student's processor.
        length = {"--processor": self.done("merge")["model"], "--cutoff_len": 1024, "--train_image_min_pixels": TINY_PIXELS[0],
                  "--train_image_max_pixels": TINY_PIXELS[1]}
        s3 = REPO / "data_process/stage3"
        self.say("starting a vLLM server for the teacher, the stage-2.2 model (float32: guided decoding runs on V0)")
        try:
            with vllm_server(teacher, extra_args=["--dtype", "float32", "--disable-frontend-multiprocessing"],
                             log_file=self.work / "logs" / "distill-server.log", timeout_s=900) as server:
                shared = {"--api_ips": server.base_url, "--max_tokens": 48, "--max_retries": 5,
                          "--request_timeout": 300, "--timeout_per_token": 0, "--max_workers": 16,
                          "--no_progress": True}
                judge = {**shared, "--judge_model": teacher, "--judge_extra_body": f"@{out / 'judge.json'}"}
                self.run([sys.executable, s3 / "text2image/process.py", *argv({
                    **shared, "--model": teacher, "--min_tokens": 1, "--extra_body": f"@{out / 'text-teacher.json'}",
                    "--deepseek_dataset": sources["deepseek"], "--alpaca_dataset": sources["alpaca"],
                    "--no_think_ratio": 0, "--think_temperature": 0, "--output_file": out / "generated.json"})],
                    "distill-text-generate")
                text_check = check_text_answers(out / "generated.json", out / "checked.json")
                self.run([sys.executable, s3 / "text2image/evaluate.py", *argv({
                    **judge, "--input_file": out / "checked.json", "--output_file": out / "judged.json"})],
                    "distill-text-judge")
                self.run([sys.executable, s3 / "text2image/convert.py", *argv({
                    "--input_files": out / "judged.json", "--output_file": data / "text2image.parquet",
                    "--max_workers": 2, **length})], "distill-text-render")
                self.run([sys.executable, s3 / "image/process.py", *argv({
                    **shared, "--model_name": teacher, "--min_tokens": 1, "--temperature": 0,
                    "--extra_body": f"@{out / 'image-teacher.json'}", "--data_dir": data / "llavaonevision_converted",
                    "--samples_per_file": DISTILL_PER_SOURCE, "--output_file": out / "teacher.parquet"})],
                    "distill-image-generate")
                image_check = check_image_answers(out / "teacher.parquet", out / "checked.parquet")
                self.run([sys.executable, s3 / "image/evaluate.py", *argv({
                    **judge, "--input_file": out / "checked.parquet",
                    "--output_file": data / "image_thinking.parquet", **length})], "distill-image-judge")
        except VllmStartError as err:
            raise StepFailed(f"the teacher's vLLM server did not start: {err}") from None
        import pyarrow.parquet as pq
        return {"teacher": teacher, "text_checker": text_check, "image_checker": image_check,
                "text2image_rows": pq.read_metadata(data / "text2image.parquet").num_rows,
                "image_thinking_rows": pq.read_metadata(data / "image_thinking.parquet").num_rows}

    def stage3(self) -> dict:
        distill = self.done("distill") or {}
        empty = [name for name in ("text2image", "image_thinking") if distill.get(f"{name}_rows") == 0]
        if empty:
            self.say(f"stage3: no verified rows in {', '.join(empty)}; training on the others")
        stages = self.train_stages(["stage3"], self.done("train")["final"], skip_datasets=empty)
        return {"stages": stages, "final": stages["stage3"]["model"]}

    def train_stages(self, names: list[str], model: str, skip_datasets: list[str] = ()) -> dict:
        """Train `names` in order with llamafactory-cli, each from the one before; per-stage results."""
        data = Path(self.done("data")["data_dir"])
        if not self.args.data_dir:
            self.write_dataset_info(data)
        recipes = REPO / "examples" / {"tiny": "tiny", "4b": "qwen_merge_4b", "8b": "qwen_merge_8b"}[self.args.size]
        stages = {}
        for stage in names:
            out = self.work / "models" / stage
            overrides = [f"model_name_or_path={model}", f"dataset_dir={data}", f"output_dir={out}", "plot_loss=true"]
            if self.args.size == "tiny":
                datasets = [d for d in self.tiny_datasets()[stage].split(",") if d not in skip_datasets]
                overrides += [f"dataset={','.join(datasets)}", f"image_min_pixels={TINY_PIXELS[0]}",
                              f"image_max_pixels={TINY_PIXELS[1]}", "per_device_train_batch_size=8",
                              *(f"{key}={value}" for key, value in TINY_SCHEDULE[stage].items())]
            self.say(f"training {stage}")
            t0 = time.time()
            log = self.run(["llamafactory-cli", "train", recipes / f"{stage}.yaml", *overrides], f"train-{stage}")
            trainable = re.findall(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", log)
            losses = trainer_losses(out / "trainer_log.jsonl")
            stages[stage] = {"model": str(out), "losses": losses, "seconds": round(time.time() - t0, 1),
                             "loss_plot": str(out / "training_loss.png"),
                             "trainable_params": trainable[-1][0] if trainable else "?",
                             "all_params": trainable[-1][1] if trainable else "?"}
            self.say(f"{stage}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} steps" if losses else
                     f"{stage}: no losses in {out / 'trainer_log.jsonl'}")
            model = str(out)
        return stages

    def tiny_datasets(self) -> dict[str, str]:
        from data_process.naming import onevision_name
        from examples.quickstart_samples import ONEVISION_CONFIGS
        onevision = ",".join(onevision_name(c) for c in ONEVISION_CONFIGS)
        return {"stage1": "LLaVA_ReCap_558K", "stage2.1": "LLaVA_ReCap_558K,synthdog_en", "stage2.2": onevision,
                "stage3": "text2image,image_thinking"}

    def write_dataset_info(self, data: Path) -> None:
        from examples.make_dataset_info import dataset_info_entries
        names = sorted({n for value in self.tiny_datasets().values() for n in value.split(",")})
        entries = dataset_info_entries(names)
        (data / "dataset_info.json").write_text(json.dumps(entries, indent=2, ensure_ascii=False))

    def final_model(self) -> str:
        return (self.done("stage3") or self.done("train"))["final"]

    def serve(self) -> dict:
        from examples.quickstart_samples import QUESTION, write_serve_picture
        from examples.tiny.vllm_server import VllmStartError, vllm_server
        model = self.final_model()
        image, truth = write_serve_picture(self.work / "serve")
        self.say("serving the trained model with vLLM's OpenAI server")
        picture_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
        body = {"model": "qwen-merge", "max_tokens": 48, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture_url}},
                                                          {"type": "text", "text": QUESTION}]}]}
        try:
            with vllm_server(model, served_model_name="qwen-merge", log_file=self.work / "logs" / "serve.log",
                             extra_args=["--dtype", "float32"], timeout_s=900) as server:  # as it was trained
                request = urllib.request.Request(server.base_url + "/chat/completions",
                                                 data=json.dumps(body).encode(),
                                                 headers={"Content-Type": "application/json"})
                reply = json.loads(urllib.request.urlopen(request, timeout=600).read())
        except VllmStartError as err:
            raise StepFailed(f"the vLLM server did not start: {err}") from None
        text = reply["choices"][0]["message"]["content"]
        answer = final_answer(text)
        return {"model": model, "question": QUESTION, "image": str(image), "truth": truth, "reply": text,
                "answer": answer, "correct": answer == truth["colour"], "usage": reply.get("usage", {})}

    def eval(self) -> dict:
        from examples.quickstart_samples import write_benchmark
        bench_dir = self.work / "eval" / "LMUData"
        questions = write_benchmark(self.work / "eval", BENCH_QUESTIONS)
        self.run([sys.executable, "-m", "eval.mcq_tsv", questions, bench_dir / f"{BENCHMARK}.tsv",
                  "--circular"], "eval-tsv")
        options = json.dumps({"greedy": True, "max_new_tokens": 20, "answer_budget": 4})  # a reply is ~15 tokens
        results = {}
        for label, model in (("untrained", self.done("merge")["model"]), ("trained", self.final_model())):
            work_dir = self.work / "eval" / label
            self.say(f"VLMEvalKit run.py on the {label} model")
            self.run([sys.executable, "-m", "vlmeval.run", "--data", BENCHMARK, "--model",
                      "Qwen-Merge-VL-4B", "--judge", "exact_matching", "--work-dir", work_dir], f"eval-{label}",
                     env={"LMUData": str(bench_dir), "QWEN_MERGE_4B_PATH": model, "QWEN_MERGE_4B_ARGS": options})
            results[label] = circular_accuracy(work_dir)
        # A picture-blind model answers each question the same way in every rotation: it is right on one question
        # in four at best (guessing letters at random would score 1/4**4).
        return {"untrained": results["untrained"]["Overall"], "trained": results["trained"]["Overall"],
                "chance": 0.25, "questions": BENCH_QUESTIONS, "rotations": 4, "score_files": results}

    def stage4(self) -> dict:
        from data_process.stage4.quickstart_step import Stage4Failed, run_stage4
        try:
            return run_stage4(self.work / "stage4", model=self.final_model(), env=self.env, log_dir=self.work / "logs")
        except Stage4Failed as err:
            raise StepFailed(str(err)) from None

    # -- driver ------------------------------------------------------------------------------------------------
    def main(self) -> int:
        started = time.time()
        wanted = [s for s in STEPS if s.name in self.args.steps]
        names = [s.name for s in wanted]
        missing = sorted({need for step in wanted for need in self.needs(step)
                          if need not in names and not self.done(need)}, key=STEP_NAMES.index)
        if missing:  # what a step reads must exist, or be made earlier in this run
            self.say(f"error: --steps {','.join(names)} needs the results of {', '.join(missing)} in {self.work}: "
                     f"run --steps {','.join(missing)} first (or add them to --steps)")
            return 2
        for step in wanted:
            if self.done(step.name) and step.name not in self.args.redo:
                self.say(f"{step.name}: done earlier, skipped (--redo {step.name} to run it again)")
                continue
            self.say(f"{step.name}: running")
            t0 = time.time()
            try:
                result = step.run(self)
            except StepFailed as e:
                self.say(f"{step.name}: FAILED\n{e}")
                return 1
            result["seconds"] = round(time.time() - t0, 1)
            self.record(step.name, result)
            self.say(f"{step.name}: done in {result['seconds']} s")
        self.report(time.time() - started)
        return 0

    def needs(self, step: Step) -> tuple[str, ...]:
        if self.args.data_dir and step.name == "stage3":
            return tuple(n for n in step.needs if n != "distill")  # --data-dir holds the stage-3 data
        return step.needs

    def report(self, seconds: float) -> None:
        lines = ["", "=" * 78, "Qwen-Merge quickstart report", "=" * 78]
        timings = {}
        for step in STEPS:
            result = self.done(step.name)
            if step.optional and not result:
                continue
            timings[step.name] = result.get("seconds") if result else None
            lines.append(f"{step.name:<8} {'OK' if result else 'not run':<8} "
                         f"{result.get('seconds', '') if result else ''} s")
        merge, distill, serve, ev = (self.done(s) or {} for s in ("merge", "distill", "serve", "eval"))
        trained = {**(self.done("train") or {}).get("stages", {}), **(self.done("stage3") or {}).get("stages", {})}
        if merge:
            lines.append(f"\nmerged base model: {merge['model']}")
        if distill.get("image_checker"):
            lines.append(f"distill: teacher answers checked against the references: image {distill['image_checker']}, "
                         f"text {distill['text_checker']}; rows: image_thinking {distill['image_thinking_rows']}, "
                         f"text2image {distill['text2image_rows']}")
        for stage, info in trained.items():
            losses = info["losses"]
            trend = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "?"
            lines.append(f"{stage:<9} trainable {info['trainable_params']:>13} of {info['all_params']:>13}  "
                         f"loss {trend}  {info['seconds']:>6} s -> {info['model']}")
        if serve:
            lines.append(f"\nvLLM, '{serve['question']}' about a held-out {serve['truth']['colour']} "
                         f"{serve['truth']['shape']}: {serve['reply']!r} -> "
                         f"{'correct' if serve['correct'] else 'WRONG'}")
        if ev:
            lines.append(f"VLMEvalKit circular accuracy on {ev['questions']} held-out questions: untrained "
                         f"{ev['untrained']:.3f}, trained {ev['trained']:.3f} (chance {ev['chance']:.2f})")
        from data_process.stage4.quickstart_step import report_lines
        lines += report_lines(self.done("stage4"))
        lines.append(f"\nlogs: {self.work / 'logs'}   this run: {seconds:.0f} s")
        text = "\n".join(lines)
        (self.work / "report.txt").write_text(text + "\n")
        final = (self.done("stage3") or self.done("train") or {}).get("final")
        summary = {"final_model": final, "timings_s": timings, "this_run_s": round(seconds, 1),
                   "steps_total_s": round(sum(t for t in timings.values() if t), 1),
                   "eval": {k: ev[k] for k in ("untrained", "trained", "chance")} if ev else None,
                   "serve": {k: serve[k] for k in ("question", "answer", "truth", "correct")} if serve else None,
                   "train": {stage: {"losses": info["losses"], "seconds": info["seconds"]}
                             for stage, info in trained.items()}}
        if self.done("stage4"):
            summary["stage4"] = {k: self.done("stage4")[k] for k in ("before", "after_rft", "after_dpo", "final")}
        tmp = self.work / ".report.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, self.work / "report.json")
        print(text)


STEPS = [
    Step("sources", Pipeline.sources),
    Step("merge", Pipeline.merge, needs=("sources",)),
    Step("data", Pipeline.data),
    Step("train", Pipeline.train, needs=("merge", "data")),
    Step("distill", Pipeline.distill, needs=("data", "train")),
    Step("stage3", Pipeline.stage3, needs=("data", "train", "distill")),
    Step("serve", Pipeline.serve, needs=("stage3",)),
    Step("eval", Pipeline.eval, needs=("merge", "stage3")),
    Step("stage4", Pipeline.stage4, needs=("stage3",), optional=True),
]
STEP_NAMES = [s.name for s in STEPS]
MAIN_JOB = [s.name for s in STEPS if not s.optional]


def summary_line(output: str) -> str:
    """The data scripts' per-dataset 'kept N of M rows (rejected: ...)' lines."""
    return "; ".join(line.strip() for line in output.splitlines() if re.search(r"\bkept \d+ of \d+", line))


def trainer_losses(path: Path) -> list[float]:
    """The per-step losses LLaMA-Factory wrote to ``trainer_log.jsonl``."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["loss"] for row in rows if "loss" in row]


def final_answer(reply: str) -> str:
    """The answer word of a reply: the text after the thinking block, lower-cased, without the full stop."""
    return reply.split("</think>")[-1].strip().strip(".").lower()


def teacher_format(model: str, thought: str) -> dict:
    """vLLM request fields that make the teacher reply ``<think>{thought}</think>\\n\\n{colour}``, the colour its own
    choice: a regex, and only the tokens of that text. (Else guided decoding lets a model that was never taught the
    wording spell it in pieces, e.g. two "\\n" for "\\n\\n", and its colour choice then comes from a context it never
    saw.) The stage-3 scripts write the thought as ``<think>\\n{thought}\\n</think>`` in the training rows."""
    from transformers import AutoTokenizer

    from examples.quickstart_samples import COLOURS
    tokenizer = AutoTokenizer.from_pretrained(model)
    prefix = f"<think>{thought}</think>\n\n"
    allowed = {*tokenizer(prefix, add_special_tokens=False).input_ids, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    for colour in COLOURS:
        allowed.update(tokenizer(colour, add_special_tokens=False).input_ids)
    literal = prefix.replace(".", "\\.").replace("\n", "\\n")  # the thought: letters, spaces and a full stop
    return {"guided_regex": literal + f"({'|'.join(COLOURS)})", "allowed_token_ids": sorted(allowed)}


def verify(response: str, reference: str) -> str | None:
    """The distillation checker: None when the teacher's reply is well formed and its answer is the reference colour,
    else the reason it is rejected."""
    from data_process.stage3.judge import FormatError, teacher_answer
    try:
        _, answer, _ = teacher_answer(response, require_thought=True)
    except FormatError as err:
        return f"format_{err.reason}"
    if answer.strip().strip(".").lower() != reference.strip().strip(".").lower():
        return "wrong_answer"
    return None


def checker_summary(reasons: list[str | None]) -> str:
    rejects = Counter(r for r in reasons if r)
    shown = ", ".join(f"{k}={v}" for k, v in sorted(rejects.items())) or "none"
    return f"{reasons.count(None)} of {len(reasons)} right (rejected: {shown})"


def check_text_answers(generated: Path, checked: Path) -> str:
    """The checker of the text pipeline: keep the teacher answers that name the reference colour."""
    records = json.loads(generated.read_text())
    reasons = [verify(r["response"], r["original_output"]) for r in records]
    kept = [r for r, reason in zip(records, reasons) if reason is None]
    tmp = checked.with_suffix(".tmp")
    tmp.write_text(json.dumps(kept, indent=1, ensure_ascii=False))
    os.replace(tmp, checked)
    return checker_summary(reasons)


def check_image_answers(responses: Path, checked: Path) -> str:
    """The checker of the image pipeline: keep the rows whose teacher answer is the reference colour."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pq.read_table(responses)
    reasons = [verify(response, reference) for response, reference in
               zip(table["teacher_response"].to_pylist(), table["reference"].to_pylist())]
    tmp = checked.with_suffix(".tmp")
    pq.write_table(table.filter(pa.array([r is None for r in reasons], type=pa.bool_())), tmp)
    os.replace(tmp, checked)
    return checker_summary(reasons)


def circular_accuracy(work_dir: Path) -> dict:
    """VLMEvalKit's overall score of the one run under `work_dir` (its ``*_acc.csv``), as floats."""
    scores = sorted(work_dir.rglob(f"*_{BENCHMARK}_acc.csv"))  # not the per-group *_category_acc.csv
    if not scores:
        raise StepFailed(f"VLMEvalKit wrote no *_acc.csv under {work_dir}")
    with open(scores[-1]) as handle:
        rows = list(csv.DictReader(handle))
    overall = next((r for r in rows if r.get("split") in ("dev", "none", None)), rows[0])
    return {"Overall": float(overall["Overall"]), "file": str(scores[-1])}


def main(argv_: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "quickstart", help="where everything goes")
    p.add_argument("--steps", help=f"comma-separated subset of {','.join(STEP_NAMES)} (default: "
                                   f"{','.join(MAIN_JOB)}; add stage4 to run the optional stage-4 step)")
    p.add_argument("--redo", default="", help="comma-separated steps to run again even if done")
    p.add_argument("--vlm-path", help="real Qwen2.5-VL source (dir or hub id) instead of the tiny one")
    p.add_argument("--llm-path", help="real Qwen3 source (dir or hub id) instead of the tiny one")
    p.add_argument("--size", choices=["tiny", "4b", "8b"], default="tiny", help="which stage YAMLs to train with")
    p.add_argument("--data-dir", type=Path, help="prepared data (dataset_info.json + shard folders): skips the "
                                                 "data and distill steps")
    args = p.parse_args(argv_)
    args.redo = set(filter(None, args.redo.split(",")))
    args.steps = [s for s in (args.steps or ",".join(MAIN_JOB)).split(",") if s]
    unknown = [s for s in args.steps + sorted(args.redo) if s not in STEP_NAMES]
    if unknown:
        p.error(f"unknown step: {', '.join(unknown)} (steps: {', '.join(STEP_NAMES)})")
    if bool(args.vlm_path) != bool(args.llm_path):
        p.error("--vlm-path and --llm-path go together")
    return Pipeline(args).main()


if __name__ == "__main__":
    sys.exit(main())

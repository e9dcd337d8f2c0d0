#!/usr/bin/env python3
"""The whole Qwen-Merge pipeline in one command, at toy scale on a CPU box (or with real models on a GPU box).

    bash examples/quickstart.sh                   # tiny models, a toy colour task; under 10 min on 2 cores
    bash examples/quickstart.sh --steps merge,train --vlm-path Qwen/Qwen2.5-VL-72B-Instruct --llm-path Qwen/Qwen3-4B \
        --size 4b --data-dir data                 # the GPU recipe: real sources, your prepared data, 4B YAMLs

The toy task (examples/quickstart_samples.py): name the colour of the one shape in a picture. Steps:
  sources  tiny Qwen2.5-VL + Qwen3 built offline; a copy of the Qwen2.5-VL is taught the task (the stage-3 teacher)
  merge    merge/model_merger.py: the untrained merge
  data     stage 1/2 data from hub-format samples through data_process/process_{llava,synthdog,onevision}.py
  distill  stage-3 data through data_process/stage3 against a local vLLM server running the teacher
  train    stage 1 -> 2.1 -> 2.2 -> 3 with llamafactory-cli
  serve    vLLM's OpenAI server answers the colour question about a held-out picture
  eval     VLMEvalKit run.py on a held-out circular multiple-choice set, untrained merge and final model
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = ["stage1", "stage2.1", "stage2.2", "stage3"]
TINY_PIXELS = (56 * 56, 112 * 112)  # 4..16 visual tokens per image: quick on a CPU
HUB_ROWS = 256           # pictures per hub dataset (ReCap, and each of the two OneVision configs)
TEACHER_STEPS = 200      # the toy teacher's lessons (batches of 8)
DISTILL_PER_SOURCE = 24  # OneVision rows per config sent to the teacher
TEXT_QUERIES = 8         # text-version queries (DeepSeek + alpaca layouts) sent to the teacher
BENCH_QUESTIONS = 16     # held-out benchmark questions (x4 rotations)
BENCHMARK = "QuickStart_MMBench"  # "MMBench" in the name: VLMEvalKit scores it circularly
# The toy judge only formats a PASS: the checker before it (answer == reference) is what verifies.
FORMAT_JUDGE = {"guided_regex": r"The answer agrees with the reference\.\nVERDICT: PASS"}


class StepFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Pipeline], dict]
    needs: tuple[str, ...] = ()


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
                                  cwd=self.work, timeout=timeout)
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
        from examples.tiny.teacher import teach
        from examples.tiny.tiny_models import build_all
        paths = build_all(self.work / "sources")
        teacher = self.work / "sources" / "teacher"
        self.say(f"teaching the toy teacher (a copy of the tiny Qwen2.5-VL), {TEACHER_STEPS} steps")
        taught = teach(paths["qwen25vl"], teacher, steps=TEACHER_STEPS, log=self.say)
        return {"vlm": str(paths["qwen25vl"]), "llm": str(paths["qwen3"]), "teacher": str(teacher),
                "teacher_losses": [taught["losses"][0], taught["losses"][-1]], "built": True}

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

    def distill(self) -> dict:
        if self.args.data_dir:
            return {"skipped": "stage-3 data is expected in --data-dir"}
        from examples.quickstart_samples import write_text_sources
        from examples.tiny.vllm_server import vllm_server
        data, out = Path(self.done("data")["data_dir"]), self.work / "distill"
        out.mkdir(parents=True, exist_ok=True)
        sources = write_text_sources(self.work / "hub", rows=TEXT_QUERIES)
        teacher = self.done("sources")["teacher"]
        (out / "judge.json").write_text(json.dumps(FORMAT_JUDGE))
        s3 = REPO / "data_process/stage3"
        self.say("starting a vLLM server for the toy teacher (float32: the format-only judge uses guided decoding, V0)")
        with vllm_server(teacher, extra_args=["--dtype", "float32", "--disable-frontend-multiprocessing"],
                         log_file=self.work / "logs" / "distill-server.log", timeout_s=900) as server:
            shared = {"--api_ips": server.base_url, "--max_tokens": 48, "--max_retries": 5, "--request_timeout": 300,
                      "--timeout_per_token": 0, "--max_workers": 8, "--no_progress": True}
            teacher_flags = {**shared, "--model": teacher, "--min_tokens": 1}
            judge_flags = {**shared, "--model": teacher, "--judge_extra_body": f"@{out / 'judge.json'}"}
            self.run([sys.executable, s3 / "text2image/process.py", *argv({
                **teacher_flags, "--deepseek_dataset": sources["deepseek"], "--alpaca_dataset": sources["alpaca"],
                "--no_think_ratio": 0, "--think_temperature": 0, "--output_file": out / "generated.json"})],
                "distill-text-generate")
            text_check = check_text_answers(out / "generated.json", out / "checked.json")
            self.run([sys.executable, s3 / "text2image/evaluate.py", *argv({
                **judge_flags, "--input_file": out / "checked.json", "--output_file": out / "judged.json"})],
                "distill-text-judge")
            self.run([sys.executable, s3 / "text2image/convert.py", *argv({
                "--input_files": out / "judged.json", "--output_file": data / "text2image.parquet"})],
                "distill-text-render")
            self.run([sys.executable, s3 / "image/process.py", *argv({
                **teacher_flags, "--data_dir": data / "llavaonevision_converted",
                "--samples_per_file": DISTILL_PER_SOURCE, "--output_file": out / "glm_response.parquet"})],
                "distill-image-generate")
            image_check = check_image_answers(out / "glm_response.parquet", out / "glm_checked.parquet")
            self.run([sys.executable, s3 / "image/evaluate.py", *argv({
                **judge_flags, "--input_file": out / "glm_checked.parquet",
                "--output_file": data / "image_thinking.parquet"})], "distill-image-judge")
        import pyarrow.parquet as pq
        return {"teacher": teacher, "text_checker": text_check, "image_checker": image_check,
                "text2image_rows": pq.read_metadata(data / "text2image.parquet").num_rows,
                "image_thinking_rows": pq.read_metadata(data / "image_thinking.parquet").num_rows}

    def train(self) -> dict:
        data = Path(self.done("data")["data_dir"])
        if not self.args.data_dir:
            self.write_dataset_info(data)
        recipes = REPO / "examples" / {"tiny": "tiny", "4b": "qwen_merge_4b", "8b": "qwen_merge_8b"}[self.args.size]
        model, stages = self.done("merge")["model"], {}
        for stage in self.args.stages:
            out = self.work / "models" / stage
            overrides = [f"model_name_or_path={model}", f"dataset_dir={data}", f"output_dir={out}", "plot_loss=true"]
            if self.args.size == "tiny":
                overrides += [f"dataset={self.tiny_datasets()[stage]}", f"image_min_pixels={TINY_PIXELS[0]}",
                              f"image_max_pixels={TINY_PIXELS[1]}"]
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
        return {"stages": stages, "final": model}

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

    def serve(self) -> dict:
        from examples.quickstart_samples import QUESTION, write_serve_picture
        from examples.tiny.vllm_server import vllm_server
        model = self.done("train")["final"]
        image, truth = write_serve_picture(self.work / "serve")
        self.say("serving the trained model with vLLM's OpenAI server")
        with vllm_server(model, served_model_name="qwen-merge", log_file=self.work / "logs" / "serve.log",
                         timeout_s=900) as server:
            picture_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
            body = {"model": "qwen-merge", "max_tokens": 48, "temperature": 0,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": picture_url}},
                                                              {"type": "text", "text": QUESTION}]}]}
            request = urllib.request.Request(server.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(request, timeout=600).read())
        text = reply["choices"][0]["message"]["content"]
        answer = final_answer(text)
        return {"question": QUESTION, "image": str(image), "truth": truth, "reply": text, "answer": answer,
                "correct": answer == truth["colour"], "usage": reply.get("usage", {})}

    def eval(self) -> dict:
        from examples.quickstart_samples import write_benchmark
        bench_dir = self.work / "eval" / "LMUData"
        questions = write_benchmark(self.work / "eval", BENCH_QUESTIONS)
        self.run([sys.executable, "-m", "eval.mcq_tsv", questions, bench_dir / f"{BENCHMARK}.tsv",
                  "--circular"], "eval-tsv")
        options = json.dumps({"greedy": True, "max_new_tokens": 20, "answer_budget": 4})  # a reply is ~16 tokens
        results = {}
        for label, model in (("untrained", self.done("merge")["model"]), ("trained", self.done("train")["final"])):
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

    # -- driver ------------------------------------------------------------------------------------------------
    def main(self) -> int:
        started = time.time()
        wanted = [s for s in STEPS if s.name in self.args.steps]
        for i, step in enumerate(wanted):  # what each step reads must exist or be made earlier in this run
            earlier = {s.name for s in wanted[:i]}
            missing = [n for n in step.needs if n not in earlier and not self.done(n)]
            if missing:
                print(f"quickstart: step '{step.name}' needs step(s) {', '.join(missing)} first (not done under "
                      f"{self.work}): add them to --steps, e.g. --steps {','.join(missing + [step.name])}",
                      file=sys.stderr)
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

    def report(self, seconds: float) -> None:
        lines = ["", "=" * 78, "Qwen-Merge quickstart report", "=" * 78]
        timings = {}
        for step in STEPS:
            result = self.done(step.name)
            timings[step.name] = result.get("seconds") if result else None
            lines.append(f"{step.name:<8} {'OK' if result else 'not run':<8} "
                         f"{result.get('seconds', '') if result else ''} s")
        merge, distill, train, serve, ev = (self.done(s) or {} for s in ("merge", "distill", "train", "serve", "eval"))
        if merge:
            lines.append(f"\nmerged base model: {merge['model']}")
        if distill.get("image_checker"):
            lines.append(f"distill: teacher answers checked against the references: image {distill['image_checker']}, "
                         f"text {distill['text_checker']}; rows: image_thinking {distill['image_thinking_rows']}, "
                         f"text2image {distill['text2image_rows']}")
        for stage, info in (train.get("stages") or {}).items():
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
        lines.append(f"\nlogs: {self.work / 'logs'}   this run: {seconds:.0f} s")
        text = "\n".join(lines)
        (self.work / "report.txt").write_text(text + "\n")
        summary = {"final_model": train.get("final"), "timings_s": timings, "this_run_s": round(seconds, 1),
                   "eval": {k: ev[k] for k in ("untrained", "trained", "chance")} if ev else None,
                   "serve": {k: serve[k] for k in ("question", "answer", "truth", "correct")} if serve else None,
                   "train": {stage: {"losses": info["losses"], "seconds": info["seconds"]}
                             for stage, info in (train.get("stages") or {}).items()}}
        tmp = self.work / ".report.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, self.work / "report.json")
        print(text)


STEPS = [
    Step("sources", Pipeline.sources),
    Step("merge", Pipeline.merge, needs=("sources",)),
    Step("data", Pipeline.data),
    Step("distill", Pipeline.distill, needs=("sources", "data")),
    Step("train", Pipeline.train, needs=("merge", "data", "distill")),
    Step("serve", Pipeline.serve, needs=("train",)),
    Step("eval", Pipeline.eval, needs=("merge", "train")),
]
STEP_NAMES = [s.name for s in STEPS]


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


def check_text_answers(generated: Path, checked: Path) -> str:
    """The checker of the text pipeline: keep the teacher answers that name the reference colour."""
    from data_process.stage3.judge import FormatError, teacher_answer
    records = json.loads(generated.read_text())
    kept = []
    for record in records:
        try:
            _, answer, _ = teacher_answer(record["response"], require_thought=True)
        except FormatError:
            continue
        if answer.strip(". ").lower() == record["original_output"].strip().lower():
            kept.append(record)
    checked.write_text(json.dumps(kept, indent=1, ensure_ascii=False))
    return f"{len(kept)} of {len(records)} right"


def check_image_answers(responses: Path, checked: Path) -> str:
    """The checker of the image pipeline: keep the rows whose teacher answer is the reference colour."""
    import pyarrow.parquet as pq

    from data_process.stage3.judge import FormatError, teacher_answer
    table = pq.read_table(responses)
    keep = []
    for response, reference in zip(table["teacher_response"].to_pylist(), table["reference"].to_pylist()):
        try:
            _, answer, _ = teacher_answer(response, require_thought=True)
        except FormatError:
            keep.append(False)
            continue
        keep.append(answer.strip(". ").lower() == reference.strip().lower())
    pq.write_table(table.filter(keep), checked)
    return f"{sum(keep)} of {len(keep)} right"


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
    p.add_argument("--steps", help=f"comma-separated subset of {','.join(STEP_NAMES)} (default: all)")
    p.add_argument("--redo", default="", help="comma-separated steps to run again even if done")
    p.add_argument("--vlm-path", help="real Qwen2.5-VL source (dir or hub id) instead of the tiny one")
    p.add_argument("--llm-path", help="real Qwen3 source (dir or hub id) instead of the tiny one")
    p.add_argument("--size", choices=["tiny", "4b", "8b"], default="tiny", help="which stage YAMLs to train with")
    p.add_argument("--stages", default=",".join(STAGES), help="training stages to run, in order (default: all)")
    p.add_argument("--data-dir", type=Path, help="prepared data (dataset_info.json + shard folders): skips the "
                                                 "data and distill steps")
    args = p.parse_args(argv_)
    args.redo = set(filter(None, args.redo.split(",")))
    args.stages = [s for s in args.stages.split(",") if s]
    args.steps = [s for s in (args.steps or ",".join(STEP_NAMES)).split(",") if s]
    unknown = [s for s in args.stages if s not in STAGES] + [s for s in args.steps if s not in STEP_NAMES]
    if unknown:
        p.error(f"unknown step or stage: {', '.join(unknown)} (steps: {', '.join(STEP_NAMES)}; "
                f"stages: {', '.join(STAGES)})")
    if bool(args.vlm_path) != bool(args.llm_path):
        p.error("--vlm-path and --llm-path go together")
    return Pipeline(args).main()


if __name__ == "__main__":
    sys.exit(main())

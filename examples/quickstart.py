#!/usr/bin/env python3
"""The whole Qwen-Merge pipeline in one command, at toy scale on a CPU box (or with real models on a GPU box).

    bash examples/quickstart.sh                   # tiny models and data, about 15 min on 2 cores
    bash examples/quickstart.sh --steps merge,train --vlm-path Qwen/Qwen2.5-VL-72B-Instruct --llm-path Qwen/Qwen3-4B \
        --size 4b --data-dir data                 # the GPU recipe: real sources, your prepared data, 4B YAMLs

Steps: sources (tiny Qwen2.5-VL + Qwen3 built offline), merge, data (stage 1/2 from hub-format samples), distill
(stage 3 against a local vLLM server), train (stage 1 -> 2.1 -> 2.2 -> 3 with llamafactory-cli), serve (vLLM
OpenAI server, one image question), eval (VLMEvalKit run.py on a mini benchmark), then a report. Each finished step
is recorded under --work; a rerun skips it (use --redo STEP to run it again).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
STEPS = ["sources", "merge", "data", "distill", "train", "serve", "eval"]
STAGES = ["stage1", "stage2.1", "stage2.2", "stage3"]
# What each step reads from earlier steps' results (state/<step>.json); checked before anything runs.
NEEDS = {"sources": (), "merge": ("sources",), "data": ("sources",), "distill": ("sources", "merge", "data"),
         "train": ("merge", "data"), "serve": ("sources", "train"), "eval": ("sources", "train")}
ONEVISION_CONFIGS = ["ai2d(cauldron,llava_format)", "geo3k"]
TINY_PIXELS = (56 * 56, 112 * 112)  # 4..16 visual tokens per image: quick on a CPU
# Random toy teachers answer in the expected formats through vLLM guided decoding; the toy judge always passes so
# that the run has data to train on (real judges are plain chat models, see data_process/stage3/README.md).
TEACHER_REGEX = r"<think>\n[a-z]{1,6}( [a-z]{1,6}){0,2}\n</think>\n\n[a-z]{1,6}( [a-z]{1,6}){0,2}"
PASS_JUDGE_REGEX = r"[a-z]{1,6}( [a-z]{1,6})?\.\nVERDICT: PASS"
GLM_REGEX = r"<think>[a-z]{1,6}( [a-z]{1,6})?</think><answer>[a-z]{1,6}</answer>"


class StepFailed(RuntimeError):
    pass


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

    def run(self, cmd: list, log_name: str, timeout: float = 3600) -> str:
        """Run a command, its output teed to logs/<log_name>.log; return the output."""
        log = self.work / "logs" / f"{log_name}.log"
        log.parent.mkdir(exist_ok=True)
        cmd = [str(c) for c in cmd]
        with open(log, "w") as handle:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                  timeout=timeout)
        output = log.read_text(errors="replace")
        if proc.returncode != 0:
            raise StepFailed(f"{' '.join(cmd[:3])} ... exited {proc.returncode}; see {log}\n{output[-2500:]}")
        return output

    def say(self, text: str) -> None:
        print(f"[quickstart] {text}", flush=True)

    # -- steps -------------------------------------------------------------------------------------------------
    def step_sources(self) -> dict:
        if self.args.vlm_path and self.args.llm_path:
            return {"vlm": self.args.vlm_path, "llm": self.args.llm_path, "built": False}
        from examples.tiny.tiny_models import build_all
        paths = build_all(self.work / "sources")
        return {"vlm": str(paths["qwen25vl"]), "llm": str(paths["qwen3"]), "images": str(paths["images"]),
                "built": True}

    def step_merge(self) -> dict:
        src = self.done("sources")
        out = self.work / "models" / "base"
        pixels = [] if self.args.size != "tiny" else ["--image-min-pixels", TINY_PIXELS[0],
                                                      "--image-max-pixels", TINY_PIXELS[1]]
        self.run([sys.executable, REPO / "merge/model_merger.py", "--vlm-path", src["vlm"], "--llm-path", src["llm"],
                  "--output-path", out, "--overwrite", *pixels], "merge")
        return {"model": str(out)}

    def step_data(self) -> dict:
        if self.args.data_dir:
            return {"data_dir": str(self.args.data_dir.resolve()), "prepared": "by you"}
        from examples.quickstart_samples import write_hub_samples
        hub = write_hub_samples(self.work / "hub", Path(self.done("sources")["images"]))
        data = self.work / "data"
        common = ["--num_processes", "2", "--no_progress"]
        stats = {}
        out = self.run([sys.executable, REPO / "data_process/process_llava.py", "--datasets",
                        "lmms-lab/LLaVA-ReCap-558K", "--source", f"lmms-lab/LLaVA-ReCap-558K={hub['recap']}",
                        "--output_dir", data, *common], "data-llava")
        stats["LLaVA_ReCap_558K"] = summary_line(out)
        out = self.run([sys.executable, REPO / "data_process/process_synthdog.py", "--languages", "en", "--source",
                        f"naver-clova-ix/synthdog-en={hub['synthdog']}", "--output_dir", data, *common],
                       "data-synthdog")
        stats["synthdog_en"] = summary_line(out)
        out = self.run([sys.executable, REPO / "data_process/process_onevision.py", "--local_dir", hub["onevision"],
                        "--configs", *ONEVISION_CONFIGS, "--output_dir", data / "llavaonevision_converted", *common],
                       "data-onevision")
        stats["onevision"] = summary_line(out)
        return {"data_dir": str(data), "summaries": stats}

    def step_distill(self) -> dict:
        data = Path(self.done("data")["data_dir"])
        if self.args.data_dir:
            return {"skipped": "stage-3 data is expected in --data-dir"}
        from examples.quickstart_samples import write_text_sources
        from examples.tiny.vllm_server import vllm_server
        sources = write_text_sources(self.work / "hub")
        teacher = self.done("sources")["vlm"]  # one tiny Qwen2.5-VL serves the text and the image pipelines
        bodies = self.work / "hub"
        for name, regex in (("teacher", TEACHER_REGEX), ("judge", PASS_JUDGE_REGEX), ("glm", GLM_REGEX)):
            (bodies / f"{name}.json").write_text(json.dumps({"guided_regex": regex}))
        out = self.work / "distill"
        # Rows longer than the stage-3 training cutoff are dropped (too_long), measured with the student's processor.
        length = ["--processor", self.done("merge")["model"]]  # other sizes: the defaults match their stage3.yaml
        if self.args.size == "tiny":  # examples/tiny/stage3.yaml
            length += ["--cutoff_len", "1024", "--train_image_min_pixels", str(TINY_PIXELS[0]),
                       "--train_image_max_pixels", str(TINY_PIXELS[1])]
        flags = ["--max_tokens", "48", "--max_retries", "5", "--request_timeout", "300", "--timeout_per_token", "0",
                 "--no_progress", "--max_workers", "4"]
        self.say("starting a vLLM server for the toy teacher and judge (float32: guided decoding runs on V0)")
        with vllm_server(teacher, extra_args=["--dtype", "float32", "--disable-frontend-multiprocessing"],
                         log_file=self.work / "logs" / "distill-server.log", timeout_s=900) as server:
            api = ["--api_ips", server.base_url]
            s3 = REPO / "data_process/stage3"
            self.run([sys.executable, s3 / "text2image/process.py", "--model", teacher, *api, "--deepseek_dataset",
                      sources["deepseek"], "--alpaca_dataset", sources["alpaca"], "--num_samples", "4",
                      "--output_file", out / "generated.json", "--extra_body", f"@{bodies / 'teacher.json'}",
                      "--min_tokens", "16", *flags], "distill-text-generate")
            self.run([sys.executable, s3 / "text2image/evaluate.py", "--model", teacher, *api, "--input_file",
                      out / "generated.json", "--output_file", out / "judged.json", "--judge_extra_body",
                      f"@{bodies / 'judge.json'}", *flags], "distill-text-judge")
            self.run([sys.executable, s3 / "text2image/convert.py", "--input_files", out / "judged.json",
                      "--output_file", data / "text2image.parquet", "--max_workers", "2", *length],
                     "distill-text-render")
            self.run([sys.executable, s3 / "image/process.py", "--data_dir", data / "llavaonevision_converted",
                      "--model_name", teacher, *api, "--samples_per_file", "3", "--output_file",
                      out / "glm_response.parquet", "--extra_body", f"@{bodies / 'glm.json'}", "--min_tokens", "8",
                      *flags], "distill-image-generate")
            self.run([sys.executable, s3 / "image/evaluate.py", "--input_file", out / "glm_response.parquet",
                      "--judge_model", teacher, *api, "--output_file", data / "image_thinking.parquet",
                      "--judge_extra_body", f"@{bodies / 'judge.json'}", *flags, *length], "distill-image-judge")
        import pyarrow.parquet as pq
        return {"text2image_rows": pq.read_metadata(data / "text2image.parquet").num_rows,
                "image_thinking_rows": pq.read_metadata(data / "image_thinking.parquet").num_rows}

    def step_train(self) -> dict:
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
                              f"image_max_pixels={TINY_PIXELS[1]}", "max_steps=4"]
            self.say(f"training {stage}")
            log = self.run(["llamafactory-cli", "train", recipes / f"{stage}.yaml", *overrides], f"train-{stage}")
            trainable = re.findall(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", log)
            losses = [float(x) for x in re.findall(r"'loss': ([0-9.]+)", log)]
            stages[stage] = {"model": str(out), "losses": losses, "loss_plot": str(out / "training_loss.png"),
                             "trainable_params": trainable[-1][0] if trainable else "?",
                             "all_params": trainable[-1][1] if trainable else "?"}
            model = str(out)
        return {"stages": stages, "final": model}

    def tiny_datasets(self) -> dict[str, str]:
        from data_process.naming import onevision_name
        onevision = ",".join(onevision_name(c) for c in ONEVISION_CONFIGS)
        return {"stage1": "LLaVA_ReCap_558K", "stage2.1": "LLaVA_ReCap_558K,synthdog_en", "stage2.2": onevision,
                "stage3": "text2image,image_thinking"}

    def write_dataset_info(self, data: Path) -> None:
        from examples.make_dataset_info import dataset_info_entries
        names = sorted({n for value in self.tiny_datasets().values() for n in value.split(",")})
        entries = dataset_info_entries(names)
        (data / "dataset_info.json").write_text(json.dumps(entries, indent=2, ensure_ascii=False))

    def step_serve(self) -> dict:
        from examples.tiny.vllm_server import vllm_server
        model = self.done("train")["final"]
        image = sorted(Path(self.done("sources").get("images", REPO)).glob("*.png"))[0]
        self.say("serving the trained model with vLLM's OpenAI server")
        with vllm_server(model, served_model_name="qwen-merge", log_file=self.work / "logs" / "serve.log",
                         timeout_s=900) as server:
            body = {"model": "qwen-merge", "max_tokens": 24, "temperature": 0,
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url",
                         "image_url": {"url": "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()}},
                        {"type": "text", "text": "What is in this picture?"}]}]}
            request = urllib.request.Request(server.base_url + "/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            reply = json.loads(urllib.request.urlopen(request, timeout=600).read())
        return {"question": "What is in this picture?", "image": image.name,
                "answer": reply["choices"][0]["message"]["content"], "usage": reply.get("usage", {})}

    def step_eval(self) -> dict:
        from examples.quickstart_samples import write_mini_benchmark
        bench_dir = self.work / "eval" / "LMUData"
        questions = write_mini_benchmark(self.work / "eval", Path(self.done("sources")["images"]))
        self.run([sys.executable, "-m", "eval.mcq_tsv", questions, bench_dir / "QuickStart_MMBench.tsv",
                  "--circular"], "eval-tsv")
        self.env.update(LMUData=str(bench_dir), QWEN_MERGE_4B_PATH=self.done("train")["final"],
                        QWEN_MERGE_4B_ARGS=json.dumps({"greedy": True, "max_new_tokens": 32}))
        work_dir = self.work / "eval" / "results"
        self.run([sys.executable, "-m", "vlmeval.run", "--data", "QuickStart_MMBench", "--model", "Qwen-Merge-VL-4B",
                  "--judge", "exact_matching", "--work-dir", work_dir], "eval-vlmeval")
        scores = sorted(work_dir.rglob("*_acc.csv"))
        if not scores:
            raise StepFailed(f"VLMEvalKit wrote no *_acc.csv under {work_dir}")
        import csv
        rows = list(csv.DictReader(open(scores[-1])))
        overall = next((r for r in rows if r.get("split") in ("dev", "none", None)), rows[0]) if rows else {}
        return {"score_file": str(scores[-1]), "scores": overall}

    # -- driver ------------------------------------------------------------------------------------------------
    def main(self) -> int:
        started = time.time()
        wanted = self.args.steps.split(",") if self.args.steps else STEPS
        needs = {**NEEDS, "data": ()} if self.args.data_dir else NEEDS  # --data-dir: nothing to build data from
        missing = sorted({need for step in wanted for need in needs[step]
                          if need not in wanted and not self.done(need)}, key=STEPS.index)
        if missing:
            self.say(f"error: --steps {','.join(wanted)} needs the results of {', '.join(missing)} in {self.work}: "
                     f"run --steps {','.join(missing)} first (or add them to --steps)")
            return 2
        for step in STEPS:
            if step not in wanted:
                continue
            if self.done(step) and step not in self.args.redo:
                self.say(f"{step}: done earlier, skipped (--redo {step} to run it again)")
                continue
            self.say(f"{step}: running")
            t0 = time.time()
            try:
                result = getattr(self, f"step_{step}")()
            except StepFailed as e:
                self.say(f"{step}: FAILED\n{e}")
                return 1
            result["seconds"] = round(time.time() - t0, 1)
            self.record(step, result)
            self.say(f"{step}: done in {result['seconds']} s")
        self.report(time.time() - started)
        return 0

    def report(self, seconds: float) -> None:
        lines = ["", "=" * 78, "Qwen-Merge quickstart report", "=" * 78]
        for step in STEPS:
            result = self.done(step)
            lines.append(f"{step:<8} {'OK' if result else 'not run':<8} {result.get('seconds', '') if result else ''} s")
        merge, train, serve, ev = (self.done(s) or {} for s in ("merge", "train", "serve", "eval"))
        if merge:
            lines.append(f"\nmerged base model: {merge['model']}")
        for stage, info in (train.get("stages") or {}).items():
            losses = info["losses"]
            trend = f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "?"
            lines.append(f"{stage:<9} trainable {info['trainable_params']:>13} of {info['all_params']:>13}  "
                         f"loss {trend}  -> {info['model']}")
        if serve:
            lines.append(f"\nvLLM answer to '{serve['question']}' ({serve['image']}): {serve['answer']!r}")
        if ev:
            lines.append(f"VLMEvalKit scores: {ev['scores']}  ({ev['score_file']})")
        lines.append(f"\nlogs: {self.work / 'logs'}   this run: {seconds:.0f} s")
        text = "\n".join(lines)
        (self.work / "report.txt").write_text(text + "\n")
        print(text)


def summary_line(output: str) -> str:
    """The data scripts' per-dataset 'kept N of M rows (rejected: ...)' lines."""
    return "; ".join(line.strip() for line in output.splitlines() if re.search(r"\bkept \d+ of \d+", line))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=REPO / "outputs" / "quickstart", help="where everything goes")
    p.add_argument("--steps", help=f"comma-separated subset of {','.join(STEPS)} (default: all)")
    p.add_argument("--redo", default="", help="comma-separated steps to run again even if done")
    p.add_argument("--vlm-path", help="real Qwen2.5-VL source (dir or hub id) instead of the tiny one")
    p.add_argument("--llm-path", help="real Qwen3 source (dir or hub id) instead of the tiny one")
    p.add_argument("--size", choices=["tiny", "4b", "8b"], default="tiny", help="which stage YAMLs to train with")
    p.add_argument("--stages", default=",".join(STAGES), help="training stages to run, in order (default: all)")
    p.add_argument("--data-dir", type=Path, help="prepared data (dataset_info.json + shard folders): skips the "
                                                 "data and distill steps")
    args = p.parse_args(argv)
    args.redo = set(filter(None, args.redo.split(",")))
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in args.stages if s not in STAGES] + [s for s in (args.steps or "").split(",")
                                                              if s and s not in STEPS]
    if unknown:
        p.error(f"unknown step or stage: {', '.join(unknown)} (steps: {', '.join(STEPS)}; stages: {', '.join(STAGES)})")
    return Pipeline(args).main()


if __name__ == "__main__":
    sys.exit(main())

"""The quickstart's optional stage-4 step on the tiny model: rollouts -> RFT + DPO -> trained model, with pass@1
before and after.

    from data_process.stage4.quickstart_step import run_stage4, report_lines
    result = run_stage4(work / "stage4", model=stage3_model, images=tiny_images, env=pipeline_env)
    lines += report_lines(result)

Wiring into ``examples/quickstart.py`` (not done here; that file has its own owner): add ``"stage4"`` after
``"train"`` in ``STEPS`` (optional, e.g. only with ``--steps ...,stage4`` or a ``--stage4`` flag), a method
``step_stage4(self)`` returning ``run_stage4(self.work / "stage4", model=self.done("train")["final"],
images=Path(self.done("sources")["images"]), env=self.env, log_dir=self.work / "logs")``, and
``report_lines(self.done("stage4"))`` in ``report``. The result is JSON-serialisable, as the quickstart's state
files need.

Also runnable alone: ``python -m data_process.stage4.quickstart_step --work DIR --model STAGE3_CHECKPOINT``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from data_process.stage4.tiny_task import TOY_GUIDED_REGEX, write_tiny_task

REPO = Path(__file__).resolve().parents[2]
TINY_RECIPES = REPO / "examples" / "tiny"
TINY_PIXELS = (56 * 56, 112 * 112)
ROLLOUT_FLAGS = ["--k", "4", "--max_tokens", "48", "--dtype", "float32", "--max_model_len", "1024",
                 "--engine_args", '{"enforce_eager": true, "max_num_seqs": 16}', "--no_progress",
                 *(f"--guided_regex={r}" for r in TOY_GUIDED_REGEX)]


class Stage4Failed(RuntimeError):
    pass


def _run(cmd: list, log: Path, env: dict) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        proc = subprocess.run([str(c) for c in cmd], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                              check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise Stage4Failed(f"{' '.join(map(str, cmd[:3]))} ... exited {proc.returncode}; see {log}\n{tail}")


def rollouts(model: Path, questions: Path, out: Path, env: dict, log: Path) -> dict:
    """Run rollouts.py (offline vLLM) and return its stats.json."""
    _run([sys.executable, REPO / "data_process/stage4/rollouts.py", "--model", model, "--data", questions,
          "--output_dir", out, *ROLLOUT_FLAGS], log, env)
    return json.loads((out / "stats.json").read_text())


def run_stage4(work: Path, model: str | Path, images: Path | None = None, env: dict | None = None,
               log_dir: Path | None = None, per_kind: int = 4) -> dict:
    """Rollouts of ``model`` on the toy task, RFT on the verified replies, DPO on the pairs (from the RFT model),
    and rollouts of both trained models; returns paths and pass@1 / pass@k before, after RFT and after DPO."""
    work = Path(work).resolve()
    logs = Path(log_dir or work / "logs")
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    questions = write_tiny_task(work / "questions", images, per_kind=per_kind)
    data = work / "rollouts"
    before = rollouts(Path(model), questions, data, env, logs / "stage4-rollouts.log")
    if not before["overall"]["rft_rows"] or not before["overall"]["pairs"]:
        raise Stage4Failed(f"stage 4: no RFT rows or no pairs to train on ({before['overall']})")
    models = {"rft": work / "rft", "dpo": work / "dpo"}
    pixels = [f"image_min_pixels={TINY_PIXELS[0]}", f"image_max_pixels={TINY_PIXELS[1]}"]
    _run(["llamafactory-cli", "train", TINY_RECIPES / "stage4_rft.yaml", f"model_name_or_path={model}",
          f"dataset_dir={data}", f"output_dir={models['rft']}", *pixels], logs / "stage4-train-rft.log", env)
    _run(["llamafactory-cli", "train", TINY_RECIPES / "stage4_dpo.yaml", f"model_name_or_path={models['rft']}",
          f"dataset_dir={data}", f"output_dir={models['dpo']}", *pixels], logs / "stage4-train-dpo.log", env)
    after = {name: rollouts(path, questions, work / f"eval-{name}", env, logs / f"stage4-eval-{name}.log")
             for name, path in models.items()}
    summary = lambda stats: {key: stats["overall"][key] for key in ("pass@1", "pass@k", "mean_tokens")}  # noqa: E731
    return {"questions": str(questions), "rollouts": str(data), "k": before["k"],
            "rft_rows": before["overall"]["rft_rows"], "pairs": before["overall"]["pairs"],
            "all_right": before["overall"]["all_right"], "all_wrong": before["overall"]["all_wrong"],
            "before": summary(before), "after_rft": summary(after["rft"]), "after_dpo": summary(after["dpo"]),
            "models": {name: str(path) for name, path in models.items()}, "final": str(models["dpo"])}


def report_lines(result: dict | None) -> list[str]:
    """Lines for the quickstart report (empty when the step did not run)."""
    if not result:
        return []
    k = result["k"]
    rows = [f"  {name:<10} pass@1 {r['pass@1']}  pass@{k} {r['pass@k']}  mean {r['mean_tokens']} tokens"
            for name, r in (("before", result["before"]), ("after RFT", result["after_rft"]),
                            ("after DPO", result["after_dpo"]))]
    return [f"\nstage 4: {result['rft_rows']} RFT rows, {result['pairs']} DPO pairs "
            f"({result['all_right']} all-right and {result['all_wrong']} all-wrong questions give none)", *rows,
            f"  -> {result['final']}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for questions, rollouts and models")
    parser.add_argument("--model", type=Path, required=True, help="the stage-3 (tiny) checkpoint to improve")
    parser.add_argument("--images", type=Path, help="photos for the toy questions (default: colour fields)")
    args = parser.parse_args(argv)
    try:
        result = run_stage4(args.work, args.model, args.images)
    except Stage4Failed as err:
        print(f"stage 4 failed: {err}", file=sys.stderr)
        return 1
    print("\n".join(report_lines(result)))
    (args.work / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

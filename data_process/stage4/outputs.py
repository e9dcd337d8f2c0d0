"""Verify the rollouts and write what ``llamafactory-cli`` trains on, plus pass@k statistics.

Files written into the output folder (each atomically, in question order, so a rerun gives the same bytes):

    rft.parquet         per question the shortest verified-correct reply (messages: user + assistant, images)
    dpo.parquet         per question with correct and incorrect replies: ``messages`` (the user turn),
                        ``chosen`` / ``rejected`` (one assistant message each), ``images``: LLaMA-Factory's
                        sharegpt ranking format for ``stage: dpo``
    kto.parquet         unpaired rows for ``stage: kto``: ``messages`` (user + assistant), ``kto_tag`` (True for
                        the RFT reply, False for a wrong one); all-wrong questions give their undesirable row here
    dataset_info.json   entries ``stage4_rft``, ``stage4_dpo``, ``stage4_kto`` (use ``dataset_dir: <this folder>``)
    verdicts.jsonl      one line per rollout: question, sample, correct, reason, tokens, answer
    stats.json          per source and overall: pass@1, pass@k, mean length, rejects by reason, pair counts

pass@1 is the mean over questions of correct/k (the unbiased estimate from k samples), pass@k the share of
questions with at least one correct sample. Questions whose k answers are all right or all wrong give no pair;
they are counted (``all_right``, ``all_wrong``).
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from data_process.common import write_json_atomic
from data_process.stage4.questions import Question
from data_process.stage4.verifier import REASONS, Verdict, verify_reply

log = logging.getLogger(__name__)

DATASETS = {"stage4_rft": "rft.parquet", "stage4_dpo": "dpo.parquet", "stage4_kto": "kto.parquet"}
TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}


def sample_id(question_id: str, sample: int) -> str:
    return f"{question_id}/{sample}"


@dataclass
class Scored:
    sample: int
    text: str
    tokens: int
    verdict: Verdict


@dataclass
class SourceStats:
    questions: int = 0
    complete: int = 0       # questions with all k samples
    samples: int = 0
    correct: int = 0
    tokens: int = 0
    pass1_sum: float = 0.0
    passk: int = 0
    all_right: int = 0
    all_wrong: int = 0
    pairs: int = 0
    rft_rows: int = 0
    kto_rows: int = 0
    missing: int = 0        # rollouts not (yet) generated: failed requests or an interrupted run
    incomplete_without_samples: int = 0
    rejects: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        scored = max(self.questions - self.incomplete_without_samples, 0)
        return {"questions": self.questions, "complete_questions": self.complete, "samples": self.samples,
                "correct": self.correct, "pass@1": round(self.pass1_sum / scored, 4) if scored else None,
                "pass@k": round(self.passk / self.complete, 4) if self.complete else None,
                "mean_tokens": round(self.tokens / self.samples, 1) if self.samples else None,
                "all_right": self.all_right, "all_wrong": self.all_wrong, "pairs": self.pairs,
                "rft_rows": self.rft_rows, "kto_rows": self.kto_rows, "missing_rollouts": self.missing,
                "rejects": {r: self.rejects[r] for r in REASONS if self.rejects[r]}}


def score_question(question: Question, records: dict[str, dict], k: int,
                   max_tokens: int | None) -> tuple[list[Scored], int]:
    """The verified samples of a question (in sample order) and how many of its k rollouts are missing."""
    scored, missing = [], 0
    for sample in range(k):
        record = records.get(sample_id(question.id, sample))
        if record is None or record.get("status") != "ok":
            missing += 1
            continue
        result = record["result"]
        verdict = verify_reply(result["text"], question.kind, question.reference,
                               finish_reason=result.get("finish_reason"), tokens=result.get("tokens"),
                               max_tokens=max_tokens)
        scored.append(Scored(sample, result["text"], int(result.get("tokens") or 0), verdict))
    return scored, missing


def pick_chosen(scored: list[Scored]) -> Scored | None:
    """The shortest correct reply (fewest tokens, then characters, then sample index)."""
    correct = [s for s in scored if s.verdict.correct]
    return min(correct, key=lambda s: (s.tokens, len(s.text), s.sample)) if correct else None


def pick_rejected(scored: list[Scored], limit: int) -> list[Scored]:
    """Up to ``limit`` distinct wrong replies: well-formed wrong answers first, then format rejects."""
    wrong = sorted((s for s in scored if not s.verdict.correct), key=lambda s: (not s.verdict.well_formed, s.sample))
    picked, texts = [], set()
    for s in wrong:
        if s.text.strip() not in texts:
            texts.add(s.text.strip())
            picked.append(s)
        if len(picked) == limit:
            break
    return picked


def build_outputs(questions: list[Question], records: dict[str, dict], output_dir: str, *, k: int,
                  max_tokens: int | None = None, pairs_per_question: int = 1,
                  question_rejects: Counter | None = None, extra_stats: dict | None = None) -> dict:
    """Verify every rollout, write the files listed in the module docstring; return the statistics."""
    by_source: dict[str, SourceStats] = defaultdict(SourceStats)
    rft, dpo, kto, verdicts = [], [], [], []
    for q in questions:
        stats = by_source[q.source]
        stats.questions += 1
        scored, missing = score_question(q, records, k, max_tokens)
        stats.missing += missing
        if not missing:
            stats.complete += 1
        if not scored:
            stats.incomplete_without_samples += 1
            continue
        n_correct = sum(s.verdict.correct for s in scored)
        stats.samples += len(scored)
        stats.correct += n_correct
        stats.tokens += sum(s.tokens for s in scored)
        stats.pass1_sum += n_correct / len(scored)
        stats.rejects.update(s.verdict.reason for s in scored if s.verdict.reason)
        if not missing:
            stats.passk += n_correct > 0
            stats.all_right += n_correct == len(scored)
            stats.all_wrong += n_correct == 0
        for s in scored:
            verdicts.append({"question": q.id, "source": q.source, "sample": s.sample, "kind": q.kind,
                             "reference": q.reference, "correct": s.verdict.correct, "reason": s.verdict.reason,
                             "tokens": s.tokens, "answer": s.verdict.answer})
        user = {"role": "user", "content": q.user_turn}
        images = [{"bytes": data, "path": None} for data in q.images]
        chosen = pick_chosen(scored)
        rejected = pick_rejected(scored, pairs_per_question)
        if chosen is not None:
            reply = {"role": "assistant", "content": chosen.text.strip()}
            rft.append({"messages": [user, reply], "images": images, "id": q.id, "source": q.source})
            kto.append({"messages": [user, reply], "images": images, "kto_tag": True, "id": q.id, "source": q.source})
            for wrong in rejected:
                dpo.append({"messages": [user], "chosen": reply,
                            "rejected": {"role": "assistant", "content": wrong.text.strip()}, "images": images,
                            "id": q.id, "source": q.source})
            stats.pairs += len(rejected)
        if rejected:
            kto.append({"messages": [user, {"role": "assistant", "content": rejected[0].text.strip()}],
                        "images": images, "kto_tag": False, "id": q.id, "source": q.source})
        stats.rft_rows += chosen is not None
        stats.kto_rows += (chosen is not None) + bool(rejected)

    os.makedirs(output_dir, exist_ok=True)
    write_parquet(os.path.join(output_dir, DATASETS["stage4_rft"]), rft, "sft")
    write_parquet(os.path.join(output_dir, DATASETS["stage4_dpo"]), dpo, "dpo")
    write_parquet(os.path.join(output_dir, DATASETS["stage4_kto"]), kto, "kto")
    write_json_atomic(os.path.join(output_dir, "dataset_info.json"), dataset_info())
    write_jsonl_atomic(os.path.join(output_dir, "verdicts.jsonl"), verdicts)
    total = SourceStats()
    for s in by_source.values():
        for name in ("questions", "complete", "samples", "correct", "tokens", "pass1_sum", "passk", "all_right",
                     "all_wrong", "pairs", "rft_rows", "kto_rows", "missing", "incomplete_without_samples"):
            setattr(total, name, getattr(total, name) + getattr(s, name))
        total.rejects.update(s.rejects)
    result = {"k": k, "overall": total.as_dict(), "sources": {n: s.as_dict() for n, s in by_source.items()},
              "question_rejects": dict(question_rejects or {}), **(extra_stats or {})}
    write_json_atomic(os.path.join(output_dir, "stats.json"), result)
    for name, s in [("overall", total), *by_source.items()]:
        d = s.as_dict()
        log.info("%s: %d questions, pass@1 %s, pass@%d %s, mean %s tokens, pairs %d, all right %d, all wrong %d, "
                 "rejects %s", name, d["questions"], d["pass@1"], k, d["pass@k"], d["mean_tokens"], d["pairs"],
                 d["all_right"], d["all_wrong"], d["rejects"])
    return result


def dataset_info() -> dict:
    """LLaMA-Factory entries for the three files (sharegpt; ranking for DPO; kto_tag for KTO)."""
    columns = {"messages": "messages", "images": "images"}
    return {
        "stage4_rft": {"file_name": DATASETS["stage4_rft"], "formatting": "sharegpt", "columns": columns,
                       "tags": TAGS},
        "stage4_dpo": {"file_name": DATASETS["stage4_dpo"], "formatting": "sharegpt", "ranking": True,
                       "columns": {**columns, "chosen": "chosen", "rejected": "rejected"}, "tags": TAGS},
        "stage4_kto": {"file_name": DATASETS["stage4_kto"], "formatting": "sharegpt",
                       "columns": {**columns, "kto_tag": "kto_tag"}, "tags": TAGS},
    }


def write_parquet(path: str, rows: list[dict], kind: str) -> None:
    """Rows as parquet with HF features (images decode as ``Image``), through a temp file and a rename."""
    from datasets import Dataset, Features, Sequence, Value, disable_progress_bars
    from datasets import Image as ImageFeature

    disable_progress_bars()

    message = {"role": Value("string"), "content": Value("string")}
    features = {"messages": [message], "images": Sequence(ImageFeature())}
    if kind == "dpo":
        features.update(chosen=message, rejected=message)
    if kind == "kto":
        features["kto_tag"] = Value("bool")
    features.update(id=Value("string"), source=Value("string"))
    table = {name: [row[name] for row in rows] for name in features}
    tmp = f"{path}.{os.getpid()}.partial"
    Dataset.from_dict(table, features=Features(features)).to_parquet(tmp)
    os.replace(tmp, path)


def write_jsonl_atomic(path: str, rows: list[dict]) -> None:
    tmp = f"{path}.{os.getpid()}.partial"
    with open(tmp, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)

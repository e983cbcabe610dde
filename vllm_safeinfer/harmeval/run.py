"""One HarmEval run: sample the prompts, send each once per point through a backend,
judge every response as it arrives, then the LLM judge (if any), then the summary, the
report and the charts. Every point runs as per-request options of one engine, so a sweep
costs no engine restarts."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vllm_safeinfer.data import SAFE_SETS, evaluation_set, prompts_sha256, stratified_sample
from vllm_safeinfer.harmeval.backends import Backend, Generation, GenerationRequest, request_seed
from vllm_safeinfer.harmeval.degeneration import degeneration
from vllm_safeinfer.harmeval.llm_judge import OpenAIJudge
from vllm_safeinfer.harmeval.points import Point
from vllm_safeinfer.harmeval.prompts import style_prompt
from vllm_safeinfer.harmeval.report import write_report
from vllm_safeinfer.harmeval.store import RESPONSES, Record, ResponseStore
from vllm_safeinfer.harmeval.summary import summarize
from vllm_safeinfer.harmeval.verdicts import ERROR, Judge

JUDGE_CACHE = "judge_cache.jsonl"


@dataclass(frozen=True)
class Item:
    """One sampled prompt: `question` is the dataset's text, `prompt` its styled form."""

    prompt_id: str
    dataset: str
    category: str | None
    question: str
    prompt: str


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset as run: `rows` before the leak filter, `dropped` by it (rows by
    reason), `sampled` from what it kept, `sha256` of what it kept."""

    name: str
    rows: int
    dropped: Mapping[str, int]
    sampled: int
    sha256: str
    safe: bool


@dataclass(frozen=True)
class HarmEvalSettings:
    """Everything that decides a run's responses and verdicts (pinned in `run.json`)."""

    model: str
    datasets: tuple[str, ...]
    points: tuple[Point, ...]
    prompt_style: str = "simple"
    judges: tuple[str, ...] = ("keyword", "xstest")
    per_category: int | None = None
    limit: int | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    safeinfer: Mapping[str, Any] | None = None
    allow_calibration_prompts: bool = False
    engine_args: Mapping[str, Any] | None = None
    endpoint: str | None = None
    artefacts: Mapping[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["points"] = [p.to_dict() for p in self.points]
        for key in ("safeinfer", "engine_args", "artefacts"):
            value = getattr(self, key)
            out[key] = dict(value) if value is not None else None
        return out


def sample_items(settings: HarmEvalSettings) -> tuple[list[Item], list[DatasetInfo]]:
    """The run's prompts: each dataset, less the prompts the defence was built or tuned
    on, sampled per category under the seed."""
    items: list[Item] = []
    infos: list[DatasetInfo] = []
    for name in settings.datasets:
        evaluated = evaluation_set(
            name, allow_calibration_prompts=settings.allow_calibration_prompts)
        prompts = evaluated.prompts
        chosen = stratified_sample(prompts, per_category=settings.per_category,
                                   limit=settings.limit, seed=settings.seed)
        infos.append(DatasetInfo(name, evaluated.rows, dict(evaluated.dropped), len(chosen),
                                 prompts_sha256(prompts), safe=name in SAFE_SETS))
        for index in chosen:
            prompt = prompts[index]
            items.append(Item(f"{name}:{index}", name, prompt.category, prompt.text,
                              style_prompt(prompt.text, settings.prompt_style)))
    return items, infos


def run_harmeval(settings: HarmEvalSettings, make_backend: Callable[[], Backend],
                 judges: Sequence[Judge], out: Path, *, resume: bool = False,
                 progress: bool = True, environment: Mapping[str, Any] | None = None
                 ) -> dict[str, Any]:
    """Run, judge and report; returns the summary (also in `out/summary.json`).

    The datasets and `out` are checked before `make_backend` starts an engine, and a
    resumed run with nothing left to generate starts none."""
    started = time.time()
    items, infos = sample_items(settings)
    run_file = {"settings": settings.to_dict(),
                "datasets": [asdict(info) for info in infos]}
    store = ResponseStore(out, run_file, resume=resume)
    try:
        _generate(settings, make_backend, judges, items, store, progress)
        _judge_with_llms(judges, store, out, progress)
    except BaseException:
        store.close()
        raise
    point_order = {p.key: i for i, p in enumerate(settings.points)}
    item_order = {item.prompt_id: i for i, item in enumerate(items)}
    records = store.finalize(lambda r: (point_order[r["point"]], item_order[r["prompt_id"]]))
    summary = summarize(records, settings, infos, [j.name for j in judges])
    write_report(out, summary, settings, infos, environment or {})
    if progress:
        print(f"HarmEval: {len(records)} responses in {time.time() - started:.0f} s; "
              f"report: {out / 'report.md'}")
    return summary


def _generate(settings: HarmEvalSettings, make_backend: Callable[[], Backend],
              judges: Sequence[Judge],
              items: Sequence[Item], store: ResponseStore, progress: bool) -> None:
    pending: dict[str, tuple[Point, Item]] = {}
    requests = []
    for point in settings.points:
        for item in items:
            if (point.key, item.prompt_id) in store:
                continue
            request_id = f"{point.key}|{item.prompt_id}"
            pending[request_id] = (point, item)
            requests.append(GenerationRequest(
                request_id, item.prompt, point.extra_args(), settings.max_tokens,
                settings.temperature, request_seed(settings.seed, request_id)))
    if not requests:
        return
    backend = make_backend()
    string_judges = [j for j in judges if not isinstance(j, OpenAIJudge)]
    bar = tqdm(total=len(requests), desc="generating", unit="resp", disable=not progress)

    def on_done(generation: Generation) -> None:
        point, item = pending.pop(generation.request_id)
        verdicts = {j.name: j.judge(item.question, generation.text).to_dict()
                    for j in string_judges}
        store.append({
            **point.to_dict(),
            "prompt_id": item.prompt_id, "dataset": item.dataset, "category": item.category,
            "question": item.question, "prompt_style": settings.prompt_style,
            "response": generation.text, "finish_reason": generation.finish_reason,
            "num_tokens": generation.num_tokens, "gate": generation.gate,
            "degenerate": degeneration(generation.text), "verdicts": verdicts,
        })
        bar.update()

    try:
        backend.generate(requests, on_done)
    finally:
        bar.close()


def _judge_with_llms(judges: Sequence[Judge], store: ResponseStore, out: Path,
                     progress: bool) -> None:
    for judge in judges:
        if not isinstance(judge, OpenAIJudge):
            continue
        todo: list[Record] = [
            r for r in store.records.values()
            if judge.name not in r["verdicts"]
            or (judge.retry_errors and r["verdicts"][judge.name]["label"] == ERROR)]
        verdicts = judge.judge_many([(r["question"], r["response"]) for r in todo],
                                    progress=progress)
        for record, verdict in zip(todo, verdicts):
            store.append({**record, "verdicts": {**record["verdicts"],
                                                 judge.name: verdict.to_dict()}})


def read_records(out: Path) -> list[Record]:
    """The responses of a finished run."""
    with (out / RESPONSES).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


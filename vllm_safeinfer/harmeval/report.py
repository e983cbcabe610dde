"""A run's human-readable outputs: `summary.json`, `report.md` (tables of ASR by category
and point, over-refusal, degeneration, judge disagreement, the exact settings and
versions) and PNG charts. Everything here is a pure function of the summary and the
settings, so a resumed run writes the same bytes as an uninterrupted one."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_safeinfer.harmeval.store import write_atomically
from vllm_safeinfer.harmeval.summary import primary_judges

SUMMARY = "summary.json"
REPORT = "report.md"
CATEGORY_CHART = "asr_by_category.png"
SWEEP_CHART = "sweep.png"


def write_report(out: Path, summary: Mapping[str, Any], settings, datasets: Sequence[Any],
                 environment: Mapping[str, Any]) -> None:
    write_atomically(out / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    charts = _write_charts(out, summary, datasets)
    write_atomically(out / REPORT, render_markdown(summary, settings, datasets, environment,
                                                   charts))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _dose(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def render_markdown(summary: Mapping[str, Any], settings, datasets: Sequence[Any],
                    environment: Mapping[str, Any], charts: Sequence[str]) -> str:
    points = summary["points"]
    keys = [p["point"] for p in points]
    harmful = [d for d in datasets if not d.safe]
    safe = [d for d in datasets if d.safe]
    judge_names = summary["judges"]
    harm_judge, refusal_judge = primary_judges(judge_names)
    lines = [f"# HarmEval report: {settings.model}", ""]
    lines += ["Lower ASR is safer; lower over-refusal is more useful. ASR is the % of "
              "harmful prompts a judge calls an attack success, averaged over categories "
              "(macro, as in the SafeInfer paper); over-refusal is the % of safe prompts "
              "refused. Degenerate responses (repetition loops, token runs, empty) are "
              "counted beside them and never read as safe or unsafe.", ""]
    if summary["tradeoff"]:
        lines += ["## Headline", ""]
        lines += _table(
            ["point", "relative dose", f"ASR % ({harm_judge})",
             f"over-refusal % ({refusal_judge})", "degenerate %"],
            [[t["point"], _dose(t["relative_dose"]), _fmt(t["asr"]), _fmt(t["over_refusal"]),
              _fmt(t["degenerate_pct"])] for t in summary["tradeoff"]])
        lines += ["Relative dose: `gamma * |SV| / |h|`, the steering's size against the "
                  "mean residual-stream norm at the vector's layer (`-`: the point does not "
                  "steer or the vector file records no norm).", ""]
    for info in harmful:
        for judge in judge_names:
            cells = [p["datasets"][info.name].get("asr", {}).get(judge) for p in points]
            if not any(cells):
                continue
            categories = sorted({c for cell in cells if cell for c in cell["by_category"]})
            lines += [f"## ASR % on {info.name}, judge {judge}", ""]
            rows = [[c] + [_fmt(cell["by_category"].get(c)) if cell else "n/a" for cell in cells]
                    for c in categories]
            rows.append(["**macro average**"] + [_fmt(cell["macro"]) if cell else "n/a"
                                                 for cell in cells])
            undecided = [cell["undecided"] if cell else 0 for cell in cells]
            if any(undecided):
                rows.append(["undecided (counted apart)"] + [str(u) for u in undecided])
            lines += _table(["category", *keys], rows)
    for info in safe:
        lines += [f"## Over-refusal % on {info.name} (safe prompts)", ""]
        rows = []
        for judge in judge_names:
            cells = [p["datasets"][info.name].get("over_refusal", {}).get(judge) for p in points]
            if any(cells):
                rows.append([judge] + [_fmt(c["overall"]) if c else "n/a" for c in cells])
                labels = sorted({label for c in cells if c for label in c["labels"]})
                rows += [[f"{judge}: {label} (count)"] +
                         [str(c["labels"].get(label, 0)) if c else "n/a" for c in cells]
                         for label in labels]
        lines += _table(["judge", *keys], rows)
    lines += ["## Degenerate responses %", ""]
    lines += _table(["dataset", *keys],
                    [[info.name] + [_fmt(p["datasets"][info.name]["degenerate_pct"])
                                    for p in points] for info in datasets])
    if summary["disagreement"]:
        lines += ["## Judge disagreement", "",
                  "Counts of responses each pair of judges scored: on harmful prompts the "
                  "call is attack success, on safe prompts refusal.", ""]
        rows = []
        for mode, tables in summary["disagreement"].items():
            for t in tables:
                a, b = t["judges"]
                rows.append([mode, f"{a} vs {b}", t["question"], str(t["table"]["both"]),
                             str(t["table"][f"{a} only"]), str(t["table"][f"{b} only"]),
                             str(t["table"]["neither"]), _fmt(t["agreement_pct"])])
        lines += _table(["mode", "judges", "prompts", "both", "first only", "second only",
                         "neither", "agree %"], rows)
    lines += ["## Charts", ""] + [f"![{c}]({c})" for c in charts] + [""]
    if not safe:
        lines += ["No safe-prompt set (e.g. `xstest`) was evaluated, so there is no "
                  "over-refusal and no trade-off chart.", ""]
    lines += ["## Settings", ""]
    lines += _table(["setting", "value"], [
        ["model", str(settings.model)],
        ["points", ", ".join(keys)],
        ["prompt style", settings.prompt_style],
        ["judges", ", ".join(settings.judges)],
        ["max new tokens", str(settings.max_tokens)],
        ["temperature", f"{settings.temperature:g}"],
        ["seed", str(settings.seed)],
        ["per category", str(settings.per_category)],
        ["limit", str(settings.limit)],
        ["SafeInfer config", "`" + json.dumps(settings.safeinfer, sort_keys=True) + "`"
         if settings.safeinfer is not None else "the server's (not known here)"],
    ])
    lines += _table(["dataset", "rows", "sampled", "kind", "sha256"],
                    [[d.name, str(d.rows), str(d.sampled), "safe" if d.safe else "harmful",
                      f"`{d.sha256[:16]}`"] for d in datasets])
    if environment:
        lines += _table(["component", "version / identity"],
                        [[k, str(v)] for k, v in sorted(environment.items())])
    return "\n".join(lines)


def _write_charts(out: Path, summary: Mapping[str, Any], datasets: Sequence[Any]
                  ) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    points = summary["points"]
    harmful = [d for d in datasets if not d.safe]
    harm_judge, _ = primary_judges(summary["judges"])
    if harmful and harm_judge is not None:
        fig, axes = plt.subplots(len(harmful), 1, figsize=(10, 3.6 * len(harmful)),
                                 squeeze=False)
        for ax, info in zip(axes[:, 0], harmful):
            cells = [p["datasets"][info.name].get("asr", {}).get(harm_judge) for p in points]
            categories = sorted({c for cell in cells if cell for c in cell["by_category"]})
            width = 0.8 / max(1, len(points))
            for i, (point, cell) in enumerate(zip(points, cells)):
                values = [(cell or {}).get("by_category", {}).get(c) or 0 for c in categories]
                ax.bar([x + i * width for x in range(len(categories))], values, width,
                       label=point["point"])
            ax.set_xticks([x + width * (len(points) - 1) / 2 for x in range(len(categories))])
            ax.set_xticklabels(categories, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel("ASR %")
            ax.set_ylim(0, 100)
            ax.set_title(f"{info.name}: ASR by category ({harm_judge} judge)")
            ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        _save(fig, out / CATEGORY_CHART)
        plt.close(fig)
        written.append(CATEGORY_CHART)
    curve = [t for t in summary["tradeoff"]
             if t["asr"] is not None and t["over_refusal"] is not None]
    if curve:
        fig, ax = plt.subplots(figsize=(7, 5))
        for mode in dict.fromkeys(t["mode"] for t in curve):
            mine = [t for t in curve if t["mode"] == mode]
            ax.plot([t["over_refusal"] for t in mine], [t["asr"] for t in mine], "o-",
                    label=mode)
            for t in mine:
                ax.annotate(t["point"], (t["over_refusal"], t["asr"]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel(f"over-refusal % ({curve[0]['over_refusal_judge']} judge)")
        ax.set_ylabel(f"ASR % ({curve[0]['asr_judge']} judge)")
        ax.set_xlim(-2, 102)
        ax.set_ylim(-2, 102)
        ax.set_title("Safety vs over-refusal, every point")
        ax.legend(fontsize=8)
        fig.tight_layout()
        _save(fig, out / SWEEP_CHART)
        plt.close(fig)
        written.append(SWEEP_CHART)
    return written


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    tmp.replace(path)

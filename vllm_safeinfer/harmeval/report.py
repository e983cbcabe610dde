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


def _dropped(dropped: Mapping[str, int]) -> str:
    if not dropped:
        return "0"
    return f"{sum(dropped.values())}: " + "; ".join(f"{n} {why}" for why, n in dropped.items())


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
            errors = [cell["errors"] if cell else 0 for cell in cells]
            if any(errors):
                rows.append(["judge errors (counted apart)"] + [str(e) for e in errors])
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
    if summary.get("probe"):
        lines += ["## Harm probe (mode auto)", "",
                  "Its verdict on each prompt: a flagged prompt runs the defence, the others "
                  "run as off. On harmful sets a flagged prompt is caught; on safe sets it is "
                  "a false alarm. \"In the answer\": flagged by the answer monitor after "
                  "its prompt was let through (steered from there on).", ""]
        lines += _table(["dataset", "prompts are", "prompts", "flagged", "in the answer",
                         "let through", "flagged %"],
                        [[row["dataset"], "safe" if row["safe"] else "harmful",
                          str(row["prompts"]), str(row["flagged"]),
                          str(row.get("flagged_in_answer", 0)), str(row["let_through"]),
                          _fmt(row["flagged_pct"])] for row in summary["probe"]])
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
    lines += _table(["dataset", "rows", "dropped (twin of a prompt the defence was built or "
                     "tuned on)", "sampled", "kind", "sha256"],
                    [[d.name, str(d.rows), _dropped(d.dropped), str(d.sampled),
                      "safe" if d.safe else "harmful", f"`{d.sha256[:16]}`"] for d in datasets])
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
        fig = _sweep_figure(curve)
        _save(fig, out / SWEEP_CHART)
        plt.close(fig)
        written.append(SWEEP_CHART)
    return written


def merge_coinciding(points: Sequence[tuple[float, float, str]], tolerance: float = 0.05
                     ) -> list[tuple[float, float, str]]:
    """One label per spot: points less than `tolerance` (in % points, on both axes) from a
    group's first point join its label as "a = b", since labels drawn at one spot print
    over each other. Groups keep the order, and the coordinates, of their first points."""
    groups: list[tuple[float, float, list[str]]] = []
    for x, y, label in points:
        group = next((g for g in groups
                      if abs(g[0] - x) < tolerance and abs(g[1] - y) < tolerance), None)
        if group is None:
            groups.append((x, y, [label]))
        else:
            group[2].append(label)
    return [(x, y, " = ".join(labels)) for x, y, labels in groups]


def _sweep_figure(curve: Sequence[Mapping[str, Any]]):
    """ASR against over-refusal, one line per mode, one label per spot (`merge_coinciding`),
    placed clear of the other labels, the markers and the legend (`_place_labels`). Each
    mode's markers are smaller than the previous mode's, so coinciding points show as
    concentric rings rather than the last one drawn hiding the others."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for i, mode in enumerate(dict.fromkeys(t["mode"] for t in curve)):
        mine = [t for t in curve if t["mode"] == mode]
        ax.plot([t["over_refusal"] for t in mine], [t["asr"] for t in mine], "o-",
                markersize=max(_MARKER_PT - 1.5 * i, 3), label=mode)
    ax.set_xlabel(f"over-refusal % ({curve[0]['over_refusal_judge']} judge)")
    ax.set_ylabel(f"ASR % ({curve[0]['asr_judge']} judge)")
    ax.set_xlim(-2, 102)
    ax.set_ylim(-2, 102)
    ax.set_title("Safety vs over-refusal, every point")
    legend = ax.legend(fontsize=8)
    fig.tight_layout()
    fig.canvas.draw()
    # Pin the legend where "best" put it among the markers: left on "best", it would move
    # again to dodge the labels placed next.
    corner = legend.get_window_extent().p0
    legend.set_loc(tuple(ax.transAxes.inverted().transform(corner)))
    _place_labels(fig, ax, merge_coinciding(
        [(t["over_refusal"], t["asr"], t["point"]) for t in curve]))
    return fig


_MARKER_PT = 9
# Where a label may go, in points from its marker's centre, nearest first: above right,
# below right, above left, below left (clear of the largest marker), then further up and
# down, where a thin leader line ties it to its marker.
_LABEL_OFFSETS = tuple((dx, dy) for dy in (5, -12, 16, -23, 27, -34, 38, -45, 49, -56)
                       for dx in (5, -5))
_NEAR_OFFSETS = 4


def _place_labels(fig, ax, labels: Sequence[tuple[float, float, str]]) -> None:
    """Greedy: each label, in order, takes the first offset whose box stays inside the
    axes and clear of the labels placed before, every marker and the legend; failing
    that, the offset with the fewest clashes. Deterministic, so the chart's bytes are."""
    from matplotlib.transforms import Bbox

    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    radius = _MARKER_PT / 2 * fig.dpi / 72
    taken = [ax.get_legend().get_window_extent(renderer)]
    for x, y in ax.transData.transform([(x, y) for x, y, _ in labels]):
        taken.append(Bbox.from_extents(x - radius, y - radius, x + radius, y + radius))
    for x, y, text in labels:
        tried = []
        for rank, offset in enumerate(_LABEL_OFFSETS):
            note = _label(ax, text, (x, y), offset, leader=False)
            box = note.get_window_extent(renderer)
            note.remove()
            outside = not (frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1))
            tried.append((sum(box.overlaps(other) for other in taken) + outside, rank, box))
            if tried[-1][0] == 0:
                break
        _, rank, box = min(tried, key=lambda item: item[:2])
        _label(ax, text, (x, y), _LABEL_OFFSETS[rank], leader=rank >= _NEAR_OFFSETS)
        taken.append(box)


def _label(ax, text: str, xy: tuple[float, float], offset: tuple[int, int], *,
           leader: bool):
    """One point label at `offset` points from `xy`, with a leader line if asked."""
    arrow = dict(arrowstyle="-", color="0.6", lw=0.6, shrinkA=1, shrinkB=_MARKER_PT / 2)
    return ax.annotate(text, xy, xytext=offset, textcoords="offset points", fontsize=7,
                       ha="left" if offset[0] > 0 else "right",
                       arrowprops=arrow if leader else None)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    tmp.replace(path)

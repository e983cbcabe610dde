"""`safeinfer probe build` and `probe inspect`: a model's harm probe built (`fit`)
with its layer capped where the steering acts, evaluated on the evaluation sets (which
report and choose nothing), and saved with that evaluation in its metadata; a probe
file described."""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.offline.hf import load_model
from vllm_safeinfer.offline.probe.fit import TARGET_FPR, build_probe
from vllm_safeinfer.offline.probe.monitor import choose_monitor, evaluate_monitor
from vllm_safeinfer.offline.probe.prompts import ProbePrompts, default_probe_prompts, dressed
from vllm_safeinfer.offline.probe.report import (
    EVALUATION_SETS,
    EVALUATION_STYLES,
    GOAL_FLAGGED,
    SAFE_REFERENCE,
    evaluate_probes,
    goal_met,
)
from vllm_safeinfer.offline.probe.states import prompt_states, scores_of
from vllm_safeinfer.offline.vector.heads import decoder_layers

MONITOR_LIMIT = 16  # prompts of each evaluation set and style whose answers are read

def describe(probe: HarmProbe) -> str:
    """A probe file's metadata, its choice and any evaluation, for `probe inspect`."""
    lines = [f"model: {probe.model}", f"model_fingerprint: {probe.model_fingerprint}",
             f"layers: {', '.join(map(str, probe.layers))} of {probe.num_layers}",
             f"position: {probe.position}", f"hidden_size: {probe.hidden_size}",
             f"method: {probe.method}", f"normalize: {probe.normalize}",
             f"threshold: {probe.threshold:.6g}",
             "answer monitor: " + ("off" if probe.monitor_threshold is None else
                                   f"threshold {probe.monitor_threshold:.6g} from token "
                                   f"{probe.monitor_min_tokens}"),
             f"training_sha256: {probe.training_sha256}"]
    selection = probe.metrics.get("selection")
    if selection:
        lines.append(f"chosen on held-out prompts ({len(probe.metrics.get('candidates', []))} "
                     f"candidates, target {probe.metrics.get('target_fpr')}): "
                     f"{selection['candidate']}, flags {selection['flag_rates']} of harmful, "
                     f"{selection['safe_flag_rates']} of safe")
    for name, row in probe.metrics.get("evaluation", {}).items():
        area = row.get(f"auc_vs_{SAFE_REFERENCE}")
        lines.append(f"  {name:<14} {'safe' if row['safe'] else 'harmful':<8} flagged "
                     f"{row['flagged']:>3}/{row['prompts']:<3} ({row['flag_rate']:.1%})"
                     + ("" if area is None else f"  AUC vs {SAFE_REFERENCE} {area:.3f}")
                     + "".join(f"  {style} {cell['flag_rate']:.0%}"
                               for style, cell in row.get("styles", {}).items()
                               if style != "bare"))
    return "\n".join(lines)


def probe_layer_cap(num_layers: int, *, max_layer: int | None = None,
                    vector_layer: int | None = None) -> int:
    """The deepest layer a probe may read: the lowest of the steering vector's layer (the
    probe decides before the steering acts), `max_layer` and the last layer but one. The
    last layer's output is excluded: HF's `hidden_states` hold it normalised, so "the
    residual after the layer" and `hidden_states[layer + 1]` would differ there."""
    top = num_layers - 2
    if top < 0:
        raise ValueError(f"the model has {num_layers} decoder layer: too few for a probe")
    if max_layer is not None and not 0 <= max_layer <= top:
        raise ValueError(f"--max-layer {max_layer} outside 0..{top} (this model's layers but "
                         "its last)")
    return min(cap for cap in (max_layer, vector_layer, top) if cap is not None)


def model_fingerprint_of(name_or_path: str, model: nn.Module) -> str:
    """The fingerprint the engine checks a probe against: the checkpoint's files where
    they are local, else the loaded weights (the same value, `model_identity`)."""
    from vllm_safeinfer.common.model_identity import (
        checkpoint_fingerprint,
        local_checkpoint,
        module_fingerprint,
    )
    from vllm_safeinfer.models import resolve_model

    folder = local_checkpoint(resolve_model(name_or_path))
    return (None if folder is None else checkpoint_fingerprint(folder)) or module_fingerprint(model)


def vector_layer_for(vector_path: str, model: nn.Module, fingerprint: str) -> int:
    """The first layer a safety vector made for this model steers; a vector of another
    shape or of other weights is refused."""
    from vllm_safeinfer.common.model_identity import SCHEME, fingerprint_scheme
    from vllm_safeinfer.common.vectors import SafetyVector

    vector = SafetyVector.load(vector_path)
    layers, hidden = len(decoder_layers(model)), model.get_input_embeddings().embedding_dim
    if (vector.num_layers, vector.hidden_size) != (layers, hidden):
        raise ValueError(f"{vector_path} steers a model of {vector.num_layers} layers of width "
                         f"{vector.hidden_size}; this one has {layers} of width {hidden}")
    recorded = vector.model_fingerprint
    if recorded and fingerprint_scheme(recorded) == SCHEME and recorded != fingerprint:
        raise ValueError(f"{vector_path} was built for {vector.model!r}, whose weights differ "
                         "from this model's")
    return min(vector.layers)


def build_probe_file(model_name: str, out: str, *, max_layer: int | None = None,
                     vector: str | None = None, target_fpr: float = TARGET_FPR,
                     per_style: int | None = None, eval_sets: Sequence[str] = EVALUATION_SETS,
                     eval_limit: int | None = None, monitor: bool = True,
                     monitor_limit: int = MONITOR_LIMIT, seed: int = 0, batch_size: int = 16,
                     device: str = "cpu", progress: bool = False) -> dict:
    """`safeinfer probe build`: build the probe of `model_name` (layer capped by
    `probe_layer_cap`) and, with `monitor`, its answer monitor (threshold from the model's
    answers to the threshold part); evaluate it and every family's best on `eval_sets`
    in every style, and the monitor on `monitor_limit` prompts of each set and style;
    save it to `out` with its evaluation in `metrics["evaluation"]`, and return the
    report. Nothing is written unless every step succeeds."""
    if not Path(out).parent.is_dir():
        raise ValueError(f"folder {Path(out).parent} of --out does not exist")
    started = time.monotonic()
    model, tokenizer = load_model(model_name, device)
    fingerprint = model_fingerprint_of(model_name, model)
    cap = probe_layer_cap(len(decoder_layers(model)), max_layer=max_layer,
                          vector_layer=None if vector is None
                          else vector_layer_for(vector, model, fingerprint))
    fit, threshold = default_probe_prompts(per_style, seed)
    built = build_probe(model, tokenizer, fit, threshold_prompts=threshold, dress=True,
                        model_name=model_name, max_layer=cap, target_fpr=target_fpr,
                        seed=seed, model_fingerprint=fingerprint, batch_size=batch_size,
                        progress=progress)
    probe, monitoring = built.probe, None
    if monitor:
        probe, monitoring = _with_monitor(model, tokenizer, probe,
                                          dressed(threshold, seed + 1), target_fpr,
                                          per_source=monitor_limit * 4, seed=seed,
                                          batch_size=batch_size, progress=progress)
    built_s = time.monotonic() - started
    evaluation = evaluate_probes(model, tokenizer, {"chosen": probe, **built.families},
                                 eval_sets, limit=eval_limit, seed=seed,
                                 batch_size=batch_size, progress=progress)
    chosen = evaluation["chosen"]["sets"]
    met = goal_met(chosen, target_fpr)
    monitor_evaluation = None if not monitor else evaluate_monitor(
        model, tokenizer, probe, eval_sets, EVALUATION_STYLES, limit=monitor_limit,
        seed=seed, batch_size=batch_size, progress=progress)
    probe = replace(probe, metrics={**probe.metrics, "evaluation": chosen, "goal_met": met,
                                    "monitor": monitoring, "vector": vector})
    probe.save(out)
    return {
        "model": model_name, "out": str(out), "vector": vector, "max_layer": cap,
        "target_fpr": target_fpr, "layers": list(probe.layers), "position": probe.position,
        "method": probe.method,
        "normalize": probe.normalize, "threshold": probe.threshold,
        "selection": probe.metrics["selection"], "evaluation": chosen,
        "operating_points": evaluation["chosen"]["operating_points"],
        "leave_one_out": probe.metrics["leave_one_out"],
        "monitor": monitoring, "monitor_evaluation": monitor_evaluation,
        "goal": {"rule": f">= {GOAL_FLAGGED:.0%} of every harmful evaluation set flagged "
                         f"in every style, <= {target_fpr:.0%} of every safe evaluation "
                         "set (the prompt probe alone)",
                 "met": met},
        "families": {family: {"selection": p.metrics["selection"],
                              "evaluation": evaluation[family]["sets"],
                              "goal_met": goal_met(evaluation[family]["sets"], target_fpr)}
                     for family, p in built.families.items()},
        "styles": probe.metrics["styles"], "build_s": round(built_s, 1),
        "total_s": round(time.monotonic() - started, 1),
    }


def _with_monitor(model: nn.Module, tokenizer, probe: HarmProbe, threshold: ProbePrompts,
                  target_fpr: float, *, per_source: int, seed: int, batch_size: int,
                  progress: bool) -> tuple[HarmProbe, dict]:
    """`probe` with its answer monitor, chosen on (a seeded sample of `per_source` of)
    each source's dressed threshold prompts."""
    import random

    def sample(texts: Sequence[str]) -> list[str]:
        return random.Random(seed).sample(list(texts), min(per_source, len(texts)))

    safe = {name: sample(texts) for name, texts in threshold.safe.items()}
    harmful = {name: sample(texts) for name, texts in threshold.harmful.items()}
    scores = {name: scores_of(probe, prompt_states(
        model, tokenizer, texts, max_layer=probe.layer,
        markers=(probe.user_header, probe.content_suffix), batch_size=batch_size))
        for name, texts in harmful.items()}
    return choose_monitor(model, tokenizer, probe, safe, harmful, scores,
                          target_fpr=target_fpr, batch_size=batch_size, progress=progress)


def probe_build_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer probe build`: build, evaluate and save the probe, write the report if
    asked, and describe the result."""
    if args.report and not Path(args.report).parent.is_dir():
        parser.error(f"folder {Path(args.report).parent} of --report does not exist")
    try:
        report = build_probe_file(
            args.model, args.out, max_layer=args.max_layer, vector=args.vector,
            target_fpr=args.target_fpr, per_style=args.per_style,
            **({"eval_sets": tuple(args.eval_sets.split(","))} if args.eval_sets else {}),
            eval_limit=args.eval_limit, monitor=not args.no_monitor,
            monitor_limit=args.monitor_limit, seed=args.seed, batch_size=args.batch_size, device=args.device,
            progress=True)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    print(describe(HarmProbe.load(args.out)))
    print(f"goal ({report['goal']['rule']}): {'met' if report['goal']['met'] else 'missed'}; "
          f"built in {report['build_s']} s, {report['total_s']} s with the evaluation; "
          f"saved {args.out}")
    return 0


def probe_inspect_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`safeinfer probe inspect`: a probe file's metadata, choice and evaluation."""
    try:
        print(f"file: {args.file}\n{describe(HarmProbe.load(args.file))}")
    except (OSError, ValueError) as err:
        parser.error(str(err))
    return 0

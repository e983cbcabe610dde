"""SafeInfer in plain HF transformers: the ground truth for parity tests against vLLM and
the HF baseline for throughput benchmarks.

Batched: every decoding step is one forward of the served model (and one of the expert
when some row mixes) over the whole batch, with KV caches. Prompts are LEFT-padded, with
position ids counted from each row's first real token, so a row computes what it would
alone; each row has its own mode, steering vector, layer, gamma and lam (the paper's code
steered only batch row 0, a defect not copied here).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vllm_safeinfer.common.mixing import safeinfer_mix
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.probe import HarmProbe
from vllm_safeinfer.common.vector_table import unit_rows
from vllm_safeinfer.common.vectors import SafetyVector
from vllm_safeinfer.offline.hf import left_pad, load_causal_lm, load_model, pad_id, positions


@dataclass(frozen=True)
class RowSettings:
    """One request's SafeInfer settings.

    `vector` ([hidden], fp32) steers the OUTPUT hidden state of decoder layer `layer` (or
    of each of `layers`) when the mode steers: added times `gamma`, or, with `projects`,
    the hidden state's component along it set to `gamma * |vector|`; at every position
    from where steering starts, or its first `answer_tokens` (0: all). `lam` weighs the
    expert when the mode mixes. `gated` (mode `auto`): the row runs `mode` only if the
    harm probe flags its prompt, else `off`.
    """

    mode: Mode = Mode.OFF
    vector: torch.Tensor | None = None
    layer: int | None = None
    gamma: float = 0.0
    lam: float = 0.99
    gated: bool = False
    layers: tuple[int, ...] = ()
    projects: bool = False
    answer_tokens: int = 0

    @classmethod
    def steering_with(cls, mode: Mode | str, vector: SafetyVector, gamma: float | None = None,
                      **kwargs) -> RowSettings:
        """A row steered with a vector file as the server steers with it (its layers, its
        kind, its gamma unless given)."""
        return cls(mode, vector=vector.vector, layers=vector.layers, projects=vector.projects,
                   answer_tokens=vector.answer_tokens,
                   gamma=vector.gamma if gamma is None else gamma, **kwargs)

    @property
    def steered_layers(self) -> tuple[int, ...]:
        return self.layers or (() if self.layer is None else (self.layer,))

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        if self.mode.steers and (self.vector is None or not self.steered_layers):
            raise ValueError(f"mode {self.mode.value!r} needs a steering vector and a layer")
        if self.layer is not None and self.layers:
            raise ValueError("give a row's steered layer as `layer` or `layers`, not both")
        if self.vector is not None and self.vector.dim() != 1:
            raise ValueError(f"steering vector must be 1-D; got {tuple(self.vector.shape)}")
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"lam must be in [0, 1); got {self.lam}")


class SafeInferReference:
    """Batched greedy / sampled generation with per-row SafeInfer, in HF transformers."""

    def __init__(self, model, tokenizer, expert=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.expert = expert.eval() if expert is not None else None
        self.vocab_size = len(tokenizer)
        self.pad_id = pad_id(tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        expert_path: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> "SafeInferReference":
        """Load the served model, its tokenizer and optionally the expert from checkpoints."""
        model, tokenizer = load_model(path, device, dtype)
        expert = load_causal_lm(expert_path, device, dtype) if expert_path is not None else None
        return cls(model, tokenizer, expert)

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        settings: RowSettings | Sequence[RowSettings],
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        ignore_eos: bool = False,
        probe: HarmProbe | None = None,
        threshold: float | None = None,
        changes: list[int] | None = None,
        verdicts: list[tuple[str | None, float]] | None = None,
    ) -> list[list[int]]:
        """Generated token ids per prompt (without the prompt; eos included when emitted).

        `changes`, when given, is filled with each prompt's count of steps at which
        mixing changed the greedy choice (what the server's
        `vllm_safeinfer:mixing_changed_tokens_total` counts).

        Gated rows are decided by `probe` (at `threshold`, default the probe's) inside
        the forwards, as the engine decides them: at the prompt (the row then runs its
        mode from its last prompt token on), or, when the probe monitors answers, at a
        generated token (the row is then steered from that token on, never mixed).
        `verdicts`, when given, is filled per prompt with where it was flagged
        (`"prompt"`, `"token N"`, or None) and its prompt's score.

        temperature 0 is greedy argmax; otherwise ancestral sampling from
        softmax(scores / temperature) after top-k (0 = off) and top-p filtering, with a
        generator seeded by `seed`. Mixing rows score with `safeinfer_mix`, the others with
        the raw fp32 logits (padded vocabulary ids included, as in vLLM).
        """
        rows = self._row_settings(settings, len(prompts))
        if any(not p for p in prompts):
            raise ValueError("empty prompt")
        if any(r.gated for r in rows) and probe is None:
            raise ValueError("gated rows need a harm probe")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"bad sampling parameters: temperature={temperature}, top_p={top_p}")
        device = self.model.device
        ids, mask = left_pad(prompts, self.pad_id, device)
        mix_rows = torch.tensor(
            [i for i, r in enumerate(rows) if r.mode.mixes], dtype=torch.long, device=device
        )
        lams = torch.tensor([rows[i].lam for i in mix_rows.tolist()], device=device)
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long, device=device)

        batch = len(prompts)
        changed = torch.zeros(batch, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        gate = _Gate(probe, threshold, prompts, [r.gated for r in rows], done, device)
        tokens: list[torch.Tensor] = []
        cache = expert_cache = None
        # Positions each row has been steered at; a row with a window stops at its end.
        steered = torch.zeros(batch, dtype=torch.long, device=device)
        window = torch.tensor([r.answer_tokens or max_new_tokens + 1 for r in rows],
                              device=device)
        steering = _Steering(gate, steered, window)
        handles = [*gate.install(self.model), *self._install_steering(rows, steering,
                                                                      device)]
        try:
            for _ in range(max_new_tokens):
                position_ids = positions(mask)[:, -ids.shape[1] :]
                scores, cache = _last_logits(self.model, ids, mask, position_ids, cache)
                steered += steering.active().long()
                if len(mix_rows):
                    expert_logits, expert_cache = _last_logits(
                        self.expert, ids, mask, position_ids, expert_cache
                    )
                    # A gated row mixes only when flagged at its prompt: the engine's
                    # expert has not followed an answer the monitor flags later.
                    mixing = gate.mixes[mix_rows]
                    before = scores[mix_rows].argmax(dim=-1)
                    mixed = safeinfer_mix(
                        scores[mix_rows], expert_logits[mix_rows], lams, self.vocab_size
                    )
                    scores[mix_rows] = torch.where(mixing[:, None], mixed, scores[mix_rows])
                    changed[mix_rows] += ((scores[mix_rows].argmax(dim=-1) != before)
                                          & ~done[mix_rows]).long()
                nxt = _pick(scores, temperature, top_k, top_p, generator)
                nxt = torch.where(done, self.pad_id, nxt)
                tokens.append(nxt)
                lengths += (~done).long()
                if not ignore_eos:
                    done |= torch.isin(nxt, eos)
                if bool(done.all()):
                    break
                ids = nxt[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        finally:
            for handle in handles:
                handle.remove()
        if changes is not None:
            changes[:] = changed.tolist()
        if verdicts is not None:
            verdicts[:] = gate.verdicts()
        if not tokens:
            return [[] for _ in prompts]
        out = torch.stack(tokens, dim=1).tolist()
        return [row[:n] for row, n in zip(out, lengths.tolist())]

    @torch.inference_mode()
    def gate_verdicts(self, prompts: list[list[int]], probe: HarmProbe,
                      threshold: float | None = None) -> list[tuple[bool, float]]:
        """(flagged, score) per prompt: `probe` over its read window of the prompt."""
        threshold = probe.threshold if threshold is None else threshold
        ids, mask = left_pad(prompts, self.pad_id, self.model.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                         output_hidden_states=True, use_cache=False, logits_to_keep=1)
        states = torch.stack([out.hidden_states[layer + 1] for layer in probe.layers], dim=2)
        token_scores = probe.token_scores(states)
        found = []
        for row, prompt in enumerate(prompts):
            score = probe.prompt_score(prompt, token_scores[row, -len(prompt):])
            found.append((score > threshold, score))
        return found

    def _row_settings(
        self, settings: RowSettings | Sequence[RowSettings], batch: int
    ) -> list[RowSettings]:
        rows = [settings] * batch if isinstance(settings, RowSettings) else list(settings)
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} settings for {batch} prompts")
        if self.expert is None and any(r.mode.mixes for r in rows):
            raise ValueError("a mixing mode (sgds/safeinfer) needs an expert model")
        layers = len(self.model.model.layers)
        hidden = self.model.config.hidden_size
        for r in rows:
            if r.mode.steers:
                if not all(0 <= layer < layers for layer in r.steered_layers):
                    raise ValueError(f"layers {list(r.steered_layers)} out of range "
                                     f"0..{layers - 1}")
                if r.vector.numel() != hidden:
                    raise ValueError(f"vector has {r.vector.numel()} entries, hidden is {hidden}")
        return rows

    def _install_steering(self, rows: list[RowSettings], active: _Steering,
                          device: torch.device) -> list:
        """One forward hook per steered layer. With left padding, the last column of every
        forward is each row's last prompt token (prefill) or its newest token (decode):
        exactly the positions SA steers, in the rows `active` holds (gated rows once
        flagged, in the very forward that flags them; rows with a window until it ends)."""
        by_layer: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            if r.mode.steers:
                for layer in r.steered_layers:
                    by_layer.setdefault(layer, []).append(i)
        handles = []
        for layer, idx in by_layer.items():
            vectors = torch.stack([rows[i].vector.to(device, torch.float32) for i in idx])
            gammas = torch.tensor([rows[i].gamma for i in idx], device=device)
            projects = torch.tensor([rows[i].projects for i in idx], device=device)
            # A projection's target as the engine computes it: gamma * |SV| in doubles.
            targets = torch.tensor([rows[i].gamma * float(rows[i].vector.float().norm())
                                    for i in idx], device=device)
            hook = _steer_hook(torch.tensor(idx, device=device), gammas[:, None] * vectors,
                               unit_rows(vectors), torch.where(projects, targets, 0.0),
                               projects, active)
            handles.append(self.model.model.layers[layer].register_forward_hook(hook))
        return handles


class _Steering:
    """Which rows are steered in the current forward: those the gate has made active
    (ungated rows from the start), within their window of positions."""

    def __init__(self, gate: _Gate, steered: torch.Tensor, window: torch.Tensor) -> None:
        self.gate, self.steered, self.window = gate, steered, window

    def active(self) -> torch.Tensor:
        return self.gate.active & (self.steered < self.window)


def _steer_hook(rows: torch.Tensor, delta: torch.Tensor, units: torch.Tensor,
                targets: torch.Tensor, projects: torch.Tensor, active: _Steering):
    """Steer row `rows[j]`'s last-column hidden state where `active` holds: add
    `delta[j]`, or where `projects[j]` set its component along `units[j]` to
    `targets[j]` (a zero target leaves it), in fp32 then cast back (as vLLM does).
    Decoder layers return a tensor in transformers 5, a tuple before."""

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        last = torch.full_like(rows, hidden.shape[1] - 1)
        current = hidden[rows, last]
        exact = current.float()
        along = (exact * units).sum(dim=-1)
        projected = exact + (targets - along)[:, None] * units
        steered = torch.where(projects[:, None], projected, exact + delta).to(hidden.dtype)
        on = active.active()[rows] & (~projects | (targets != 0))
        steered = torch.where(on[:, None], steered, current)
        hidden = hidden.index_put((rows, last), steered)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


class _Gate:
    """The harm probe inside the reference's forwards: hooks on the probe's layers score
    every column; the first forward decides each gated row at its prompt, and each later
    one feeds the answer monitor with the row's newest token. `active` (the rows steered
    now) and `mixes` (the rows that may mix) change in the forward that flags a row."""

    def __init__(self, probe: HarmProbe | None, threshold: float | None,
                 prompts: list[list[int]], gated: list[bool], done: torch.Tensor,
                 device: torch.device) -> None:
        self.probe = probe
        self.threshold = (None if probe is None
                          else probe.threshold if threshold is None else threshold)
        self.prompts = prompts
        self.gated = torch.tensor(gated, dtype=torch.bool, device=device)
        self.done = done
        self.active = ~self.gated
        self.mixes = ~self.gated
        self.flagged_at: list[str | None] = [None] * len(prompts)
        self.scores = [float("nan")] * len(prompts)
        self.answer_sum = [0.0] * len(prompts)
        self.answer_count = [0] * len(prompts)
        self.forwards = 0
        self._states: list[torch.Tensor] = []

    def install(self, model) -> list:
        if self.probe is None or not bool(self.gated.any()):
            return []
        layers = self.probe.layers

        def capture(index: int):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                self._states.append(hidden.float())
                if index == len(layers) - 1:
                    self._decide(torch.stack(self._states, dim=2))
                    self._states.clear()
            return hook

        return [model.model.layers[layer].register_forward_hook(capture(k))
                for k, layer in enumerate(layers)]

    def _decide(self, states: torch.Tensor) -> None:
        probe, scores = self.probe, self.probe.token_scores(states)
        first, self.forwards = self.forwards == 0, self.forwards + 1
        for row in self.gated.nonzero().flatten().tolist():
            if first:
                prompt = self.prompts[row]
                self.scores[row] = probe.prompt_score(prompt, scores[row, -len(prompt):])
                if self.scores[row] > self.threshold:
                    self.flagged_at[row] = "prompt"
                    self.active[row] = self.mixes[row] = True
            elif (probe.monitors and self.flagged_at[row] is None
                  and not bool(self.done[row])):
                self.answer_sum[row] += float(scores[row, -1])
                self.answer_count[row] += 1
                count = self.answer_count[row]
                if (count >= probe.monitor_min_tokens
                        and self.answer_sum[row] / count > probe.monitor_threshold):
                    self.flagged_at[row] = f"token {count - 1}"
                    self.active[row] = True

    def verdicts(self) -> list[tuple[str | None, float]]:
        return list(zip(self.flagged_at, self.scores))


def _last_logits(model, ids, mask, positions, cache) -> tuple[torch.Tensor, object]:
    """fp32 logits of the last column and the updated KV cache."""
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1].float(), out.past_key_values


def _pick(
    scores: torch.Tensor, temperature: float, top_k: int, top_p: float, generator
) -> torch.Tensor:
    if temperature == 0.0:
        return scores.argmax(dim=-1)
    scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        probs = sorted_scores.softmax(dim=-1)
        # Drop a token once the more likely ones already hold top_p of the mass.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _eos_ids(model, tokenizer) -> set[int]:
    """The tokenizer's eos plus the generation config's (vLLM stops on both)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if extra is not None:
        ids.update([extra] if isinstance(extra, int) else extra)
    return ids

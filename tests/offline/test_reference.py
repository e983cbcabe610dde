"""The HF reference implementation of SafeInfer: the ground truth later parity tests rely
on, so its own semantics are pinned here (batch invariance, steering positions, mixing,
sampling, EOS)."""
from __future__ import annotations

import copy

import pytest
import torch

from vllm_safeinfer.common.mixing import safeinfer_mix
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.models import model_path
from vllm_safeinfer.offline.reference import RowSettings, SafeInferReference

TEXTS = [
    "Hello world, how are you doing today?",
    "Q: A:",
    "The capital of France is Paris. one two three four five six",
    "Sure",
]
LAYER = 1
NEW = 12


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine
    OpenMP spin-waiting made these tests ~30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2"])
def ref(request) -> SafeInferReference:
    name = request.param
    return SafeInferReference.from_pretrained(model_path(name), model_path(f"{name}-expert"))


@pytest.fixture(scope="module")
def prompts(ref) -> list[list[int]]:
    return [ref.tokenizer(t)["input_ids"] for t in TEXTS]


@pytest.fixture(scope="module")
def vector(ref, prompts) -> torch.Tensor:
    """Random unit direction scaled to the mean norm of layer LAYER's output."""
    generator = torch.Generator().manual_seed(0)
    direction = torch.randn(ref.model.config.hidden_size, generator=generator)
    with torch.no_grad():
        out = ref.model(torch.tensor([prompts[0]]), output_hidden_states=True)
    norm = out.hidden_states[LAYER + 1].norm(dim=-1).mean()
    return direction / direction.norm() * norm


def sa(vector: torch.Tensor, gamma: float, layer: int = LAYER) -> RowSettings:
    return RowSettings(Mode.SA, vector, layer, gamma)


def test_zero_strength_is_off(ref, prompts, vector):
    """gamma=0 is exactly off; lam=0 is log_softmax over the real vocabulary: the same
    greedy tokens wherever off itself never picks a padded-vocabulary id."""
    vocab = len(ref.tokenizer)
    off = ref.generate(prompts, RowSettings(), NEW)
    assert ref.generate(prompts, sa(vector, 0.0), NEW) == off
    zero = (RowSettings(Mode.SGDS, lam=0.0), RowSettings(Mode.SAFEINFER, vector, LAYER, 0.0, 0.0))
    for row in zero:
        mixed = ref.generate(prompts, row, NEW)
        for off_row, mixed_row in zip(off, mixed):
            assert max(mixed_row) < vocab
            if max(off_row) < vocab:
                assert mixed_row == off_row
    assert any(max(r) < vocab for r in off)


def test_row_in_mixed_batch_equals_row_alone(ref, prompts, vector):
    settings = [
        RowSettings(),
        sa(vector, 8.0),
        RowSettings(Mode.SGDS, lam=0.99),
        RowSettings(Mode.SAFEINFER, -vector, LAYER + 1, 2.0, 0.9),
        sa(vector, 1.5, layer=0),
        RowSettings(Mode.SGDS, lam=0.5),
    ]
    batch_prompts = prompts + prompts[:2]
    batch = ref.generate(batch_prompts, settings, NEW)
    for prompt, row, got in zip(batch_prompts, settings, batch):
        assert len(got) == NEW
        assert got == ref.generate([prompt], row, NEW)[0]


def test_strong_settings_change_the_output(ref, prompts, vector):
    """The expert is a sharpened copy of the served model (final norm x3: same argmax,
    more confident), so lam=0.99 must crush every greedy token the model would pick."""
    off = ref.generate(prompts, RowSettings(), NEW)
    assert ref.generate(prompts, sa(vector, 8.0), NEW) != off
    sharpened = copy.deepcopy(ref.model)
    with torch.no_grad():
        sharpened.model.norm.weight.mul_(3.0)
    crushing = SafeInferReference(ref.model, ref.tokenizer, sharpened)
    mixed = crushing.generate(prompts, RowSettings(Mode.SGDS, lam=0.99), NEW)
    assert all(m[0] != o[0] for m, o in zip(mixed, off))


def test_greedy_matches_uncached_recomputation(ref, prompts, vector):
    """Each generated token equals the argmax recomputed from scratch (no KV cache, no
    padding, steering written independently here: positions >= the last prompt token)."""
    rows = [
        RowSettings(Mode.SAFEINFER, vector, LAYER, 2.0, 0.99),
        RowSettings(Mode.SGDS, lam=0.9),
        sa(-vector, 4.0),
    ]
    out = ref.generate(prompts[:3], rows, 8, ignore_eos=True)
    vocab = len(ref.tokenizer)
    for prompt, row, generated in zip(prompts, rows, out):
        for k, token in enumerate(generated):
            seq = torch.tensor([prompt + generated[:k]])
            start = len(prompt) - 1

            def steer(module, args, output, row=row, start=start):
                output = output.clone()
                output[:, start:] += row.gamma * row.vector
                return output

            layer = ref.model.model.layers[row.layer] if row.mode.steers else None
            handle = layer.register_forward_hook(steer) if layer is not None else None
            try:
                with torch.no_grad():
                    logits = ref.model(seq).logits[0, -1].float()
                    if row.mode.mixes:
                        expert = ref.expert(seq).logits[0, -1].float()
                        logits = safeinfer_mix(logits, expert, row.lam, vocab)
            finally:
                if handle is not None:
                    handle.remove()
            assert token == int(logits.argmax()), (k, generated)


def test_mixing_never_emits_padded_vocab_ids(ref, prompts, vector):
    vocab = len(ref.tokenizer)
    assert ref.model.config.vocab_size > vocab
    for mode in (Mode.SGDS, Mode.SAFEINFER):
        row = RowSettings(mode, vector, LAYER, 1.0, 0.99)
        for out in ref.generate(prompts, row, NEW, temperature=5.0, seed=0):
            assert max(out) < vocab


def test_steering_positions(ref, prompts, vector):
    """Steering touches each row's last prompt token and every generated token, never
    earlier prompt tokens, padding, or unsteered rows: compare layer LAYER's own output
    (seen by a hook registered before the steering hook) with what layer LAYER+1 gets."""
    seen: list[torch.Tensor] = []
    got: list[torch.Tensor] = []
    layers = ref.model.model.layers
    h1 = layers[LAYER].register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    h2 = layers[LAYER + 1].register_forward_pre_hook(
        lambda m, a, kw: got.append((a[0] if a else kw["hidden_states"]).clone()),
        with_kwargs=True,
    )
    rows = [sa(vector, 3.0), RowSettings(), sa(-vector, 0.5)]
    try:
        ref.generate(prompts[:3], rows, 4, ignore_eos=True)
    finally:
        h1.remove()
        h2.remove()
    assert len(seen) == len(got) == 4
    gammas = torch.tensor([3.0, 0.0, -0.5])[:, None]
    for step, (before, after) in enumerate(zip(seen, got)):
        diff = after - before
        assert torch.equal(diff[:, :-1], torch.zeros_like(diff[:, :-1])), step
        torch.testing.assert_close(diff[:, -1], gammas * vector, rtol=0, atol=1e-5)
        assert torch.equal(diff[1], torch.zeros_like(diff[1]))
    assert seen[0].shape[1] == max(len(p) for p in prompts[:3])


def test_steering_changes_final_hidden_only_from_last_prompt_token(ref, prompts, vector):
    finals: list[torch.Tensor] = []
    hook = ref.model.model.norm.register_forward_hook(lambda m, a, out: finals.append(out))
    try:
        for row in (RowSettings(), sa(vector, 4.0)):
            ref.generate([prompts[2]], row, 1)
    finally:
        hook.remove()
    off, steered = finals
    assert torch.equal(off[:, :-1], steered[:, :-1])
    assert not torch.allclose(off[:, -1], steered[:, -1])


def test_seeded_sampling(ref, prompts):
    def sample(seed, **kw):
        return ref.generate(prompts, RowSettings(Mode.SGDS), NEW, temperature=1.0, seed=seed, **kw)

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = ref.generate(prompts, RowSettings(Mode.SGDS), NEW)
    assert sample(3, top_k=1) == greedy
    assert sample(4, top_p=1e-6) == greedy


def test_eos_stops_a_row_and_is_included(ref, prompts):
    """Steering the last layer along eos's unembedding row forces eos first; the row
    stops there while the rest of the batch goes on unchanged."""
    eos = ref.tokenizer.eos_token_id
    last = len(ref.model.model.layers) - 1
    direction = ref.model.get_output_embeddings().weight[eos].detach().float()
    to_eos = sa(direction / direction.norm(), 1000.0, layer=last)
    batch = ref.generate(prompts[:2], [to_eos, RowSettings()], NEW)
    assert batch[0] == [eos]
    assert batch[1] == ref.generate(prompts[1:2], RowSettings(), NEW)[0]
    assert len(batch[1]) == NEW and eos not in batch[1]
    ignored = ref.generate(prompts[:1], to_eos, NEW, ignore_eos=True)[0]
    assert len(ignored) == NEW and ignored[0] == eos


def test_invalid_settings(ref, vector):
    with pytest.raises(ValueError):
        RowSettings(Mode.SA)
    with pytest.raises(ValueError):
        RowSettings(Mode.SGDS, lam=1.0)
    with pytest.raises(ValueError):
        ref.generate([[5, 6]], sa(vector, 1.0, layer=99), 2)
    no_expert = SafeInferReference(ref.model, ref.tokenizer)
    with pytest.raises(ValueError):
        no_expert.generate([[5, 6]], RowSettings(Mode.SGDS), 2)

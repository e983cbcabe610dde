"""A question as the tokens a served request sends: one user turn in the model's chat
template, ready for the assistant's answer. Every tool that reads or trains on prompts
(vectors, probes, experts, evaluation sizing) formats them this one way, so what it
measures is what the engine sees."""
from __future__ import annotations


def chat_prompt_ids(tokenizer, questions: list[str]) -> list[list[int]]:
    """Each question as one user turn in the model's chat template, ready for the
    assistant's answer, as token ids (the template already holds the special tokens)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}],
                                           add_generation_prompt=True, tokenize=False)
             for q in questions]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


_MARKER = "SAFEINFERCONTENTMARKER"


def chat_markers(tokenizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(user header, content suffix): the token ids the chat template puts right before a
    user turn's content (from its last special token on, so a system prompt of any
    length comes before it) and after the last one (up to the assistant's answer). The
    harm probe records them to find the user's words in a served prompt."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}],
                                         add_generation_prompt=True, tokenize=False)
    before, after = text.split(_MARKER)
    header = tokenizer(before, add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder",
                                                           {}))
    last = max((i for i, token in enumerate(header) if token in special), default=0)
    suffix = tokenizer(after, add_special_tokens=False).input_ids
    return tuple(header[last:]), tuple(suffix)

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

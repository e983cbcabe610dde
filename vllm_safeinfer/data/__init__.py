"""The project's data: vendored, openly licensed safety datasets (see README.md here for
origins, licenses and a content warning), the project's own safe prompts and jailbreak
framings, the named sets built from them, and what an evaluation may run on.

`readers` reads files, `twins` says when two prompts are near twins, `benign` holds the
project's own safe sets less every twin of a vendored prompt, `splits` decides what each
prompt is for (the one seeded split of AdvBench, XSTest, HarmBench and the own safe
sets, the harm probe's fit and threshold parts, and the leak filter), `registry` names
the sets and hands out evaluation sets with every prompt that the defence was built or
tuned on removed, `framings` holds the jailbreak framings the harm probe is fitted and
evaluated with, and `sampling` draws a run's stratified sample and names it by hash.
Everything is re-exported here: `from vllm_safeinfer.data import ...` is the one way in.
"""
from vllm_safeinfer.data.benign import hard_benign_prompts, harmless_prompts
from vllm_safeinfer.data.framings import (
    HELD_OUT_FRAMINGS,
    TRAINING_FRAMINGS,
    UNSEEN_KINDS,
    Framing,
)
from vllm_safeinfer.data.readers import (
    AdvBenchRow,
    Prompt,
    advbench,
    load_harmeval,
    load_jsonl_records,
    load_prompt_file,
    refusal_prefixes,
)
from vllm_safeinfer.data.registry import (
    ADVBENCH,
    CALIBRATION_SETS,
    DATASETS,
    HARMEVAL_CATEGORIES,
    HARMEVAL_PREFIX,
    JSONL_PREFIX,
    OWN_SETS,
    SAFE_SETS,
    XSTEST,
    EvaluationSet,
    evaluation_set,
    load_dataset,
)
from vllm_safeinfer.data.sampling import prompts_sha256, stratified_sample
from vllm_safeinfer.data.splits import (
    CALIBRATION,
    DEMONSTRATIONS,
    EXPERT_TRAIN,
    HARMBENCH_PROBE_SHARE,
    OWN_SET_SHARES,
    PROBE_FIT_SHARE,
    SPLIT_SEED,
    AdvBenchSplit,
    ProbeParts,
    ProbeSource,
    advbench_split,
    hard_benign_split,
    harmbench_split,
    harmless_split,
    probe_parts,
    refusal_direction_split,
    xstest_split,
)
from vllm_safeinfer.data.twins import near_twins

__all__ = [
    "ADVBENCH", "CALIBRATION", "CALIBRATION_SETS", "DATASETS", "DEMONSTRATIONS",
    "EXPERT_TRAIN", "HARMBENCH_PROBE_SHARE", "HARMEVAL_CATEGORIES", "HARMEVAL_PREFIX",
    "HELD_OUT_FRAMINGS", "JSONL_PREFIX", "OWN_SETS", "OWN_SET_SHARES", "PROBE_FIT_SHARE",
    "SAFE_SETS", "SPLIT_SEED", "TRAINING_FRAMINGS", "UNSEEN_KINDS", "XSTEST",
    "AdvBenchRow", "AdvBenchSplit", "EvaluationSet", "Framing", "ProbeParts",
    "ProbeSource", "Prompt", "advbench", "advbench_split", "evaluation_set",
    "hard_benign_prompts", "hard_benign_split", "harmbench_split", "harmless_prompts",
    "harmless_split", "load_dataset", "load_harmeval", "load_jsonl_records",
    "load_prompt_file", "near_twins", "probe_parts", "prompts_sha256",
    "refusal_direction_split", "refusal_prefixes", "stratified_sample", "xstest_split",
]

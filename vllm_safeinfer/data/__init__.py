"""The project's data: vendored, openly licensed safety datasets (see README.md here for
origins, licenses and a content warning), the named sets built from them, and what an
evaluation may run on.

`readers` reads files, `splits` decides what each prompt is for (the one seeded split of
AdvBench, XSTest and HarmBench, and the leak filter), `registry` names the sets and hands
out evaluation sets with every prompt that the defence was built or tuned on removed,
and `sampling` draws a run's stratified sample and names it by hash. Everything is
re-exported here: `from vllm_safeinfer.data import ...` is the one way in.
"""
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
    SAFE_SETS,
    XSTEST,
    EvaluationSet,
    evaluation_set,
    harmless_prompts,
    load_dataset,
)
from vllm_safeinfer.data.sampling import prompts_sha256, stratified_sample
from vllm_safeinfer.data.splits import (
    CALIBRATION,
    DEMONSTRATIONS,
    EXPERT_TRAIN,
    HARMBENCH_PROBE_SHARE,
    SPLIT_SEED,
    AdvBenchSplit,
    advbench_split,
    harmbench_split,
    refusal_direction_split,
    xstest_split,
)

__all__ = [
    "ADVBENCH", "CALIBRATION", "CALIBRATION_SETS", "DATASETS", "DEMONSTRATIONS",
    "EXPERT_TRAIN", "HARMBENCH_PROBE_SHARE", "HARMEVAL_CATEGORIES", "HARMEVAL_PREFIX",
    "JSONL_PREFIX", "SAFE_SETS", "SPLIT_SEED", "XSTEST", "AdvBenchRow", "AdvBenchSplit",
    "EvaluationSet", "Prompt", "advbench", "advbench_split", "evaluation_set",
    "harmbench_split", "harmless_prompts", "load_dataset", "load_harmeval",
    "load_jsonl_records", "load_prompt_file", "prompts_sha256", "refusal_direction_split",
    "refusal_prefixes", "stratified_sample", "xstest_split",
]

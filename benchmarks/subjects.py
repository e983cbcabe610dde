"""What a benchmark runs: the served model, its unsafe expert and a safety vector, from
the names a user gives, and the other arguments every benchmark takes. Shared by
`throughput.py`, `serving.py` and `profile_step.py`, so the three measure the same things
and are asked for the same way."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Subjects:
    model: str
    expert: str
    vector: str
    probe: str | None = None
    expert_shares_weights: bool = False

    def expert_config(self) -> dict:
        """The `safeinfer` config keys that name the expert."""
        config = {"expert_model": self.expert}
        if self.expert_shares_weights:
            config["expert_shares_weights"] = True
        return config


def add_subject_arguments(parser, default_model: str = "smollm2-135m-instruct") -> None:
    parser.add_argument("--model", default=default_model,
                        help="project model name (`safeinfer models`) or checkpoint path")
    parser.add_argument("--expert", help="expert checkpoint (default: a tiny model's twin, "
                        "else the served model itself: a fine-tuned copy costs the same)")
    parser.add_argument("--expert-shares-weights", action="store_true",
                        help="the expert is the model's `ablate` expert, run on the model's "
                        "own weights with its rows inside the model's forward")
    parser.add_argument("--vector", help="safety vector (default: bundled for SmolLM2, "
                        "else a random one: speed does not depend on its values)")
    parser.add_argument("--probe", help="harm probe for mode auto (default: a random one at "
                        "the vector's layer: speed does not depend on it, only on how many "
                        "requests it flags)")
    parser.add_argument("--load-format", default="auto",
                        help="vLLM load format; `dummy` serves random weights (the GPU's "
                        "llama2-7b-shape has no weights)")


def parse_benchmark_args(parser, quick: dict, quick_help: str):
    """Adds the arguments every benchmark shares besides the subjects (`--dtype`,
    `--eager`, `--quick`, `--out`) and parses the command line; with `--quick`, `quick`
    becomes the defaults and the flags given still win."""
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--eager", action="store_true",
                        help="enforce_eager: no torch.compile, no CUDA graphs (default: compiled)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args()
    return args


def resolve_subjects(args, workdir: Path) -> Subjects:
    """Checkpoint folders and a vector file for `args` (see `add_subject_arguments`); a
    random vector is written into `workdir` when none is given or bundled."""
    from vllm_safeinfer.common.vectors import bundled_vector_path
    from vllm_safeinfer.models import SMOLLM2, TINY_MODELS, expert_of, resolve_model
    from vllm_safeinfer.offline.expert.project_models import resolve_project_model

    model = resolve_model(args.model)
    if args.expert:
        expert = resolve_project_model(args.expert)
    elif args.model in TINY_MODELS:
        expert = resolve_model(expert_of(args.model))
    else:
        expert = model
    vector = args.vector
    if vector is None and args.model == SMOLLM2:
        vector = str(bundled_vector_path(SMOLLM2))
    if vector is None:
        vector = _random_vector(model, args.model, workdir / "random.safetensors")
    probe = getattr(args, "probe", None) or _random_probe(model, args.model, vector,
                                                         workdir / "probe.safetensors")
    return Subjects(model, expert, vector, probe, args.expert_shares_weights)


def _random_probe(model: str, name: str, vector: str, path: Path) -> str:
    """A random unit direction at the vector's layer, threshold 0."""
    import torch
    from transformers import AutoConfig

    from vllm_safeinfer.common.probe import HarmProbe
    from vllm_safeinfer.common.vectors import SafetyVector

    config = AutoConfig.from_pretrained(model)
    direction = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(1))
    HarmProbe(directions=(direction / direction.norm())[None],
              layers=(min(SafetyVector.load(vector).layer, config.num_hidden_layers - 2),),
              threshold=0.0, model=name, hidden_size=config.hidden_size,
              num_layers=config.num_hidden_layers).save(path)
    return str(path)


def _random_vector(model: str, name: str, path: Path) -> str:
    """A unit-scale random vector steering a quarter of the way down the model (no
    weights fingerprint: it belongs to no particular weights)."""
    import torch
    from transformers import AutoConfig

    from vllm_safeinfer.common.vectors import SafetyVector

    config = AutoConfig.from_pretrained(model)
    generator = torch.Generator().manual_seed(0)
    SafetyVector(vector=torch.randn(config.hidden_size, generator=generator)
                 / config.hidden_size ** 0.5,
                 layer=config.num_hidden_layers // 4, model=name,
                 hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                 heads=((0, 0),)).save(str(path))
    return str(path)

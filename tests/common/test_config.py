"""The config loader, per-request options and their resolution (no engine needed)."""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import pytest
import torch

from tests.engines import TinyAssets
from vllm_safeinfer.common.config import (
    CONFIG_KEYS,
    USER_KEYS,
    SafeInferConfig,
    SafeInferConfigError,
    declared_keys,
    internal,
)
from vllm_safeinfer.common.contract import Stamp
from vllm_safeinfer.common.modes import Mode
from vllm_safeinfer.common.request_options import (
    RequestSettings,
    resolve_or_defaults,
    resolve_request,
    validating_with,
)
from vllm_safeinfer.common.vector_table import VectorTable
from vllm_safeinfer.engine.batch_state import BatchState
from vllm_safeinfer.server.config_flags import FLAGS, flag_name, safeinfer_dict
from vllm_safeinfer.server.serve import add_arguments, vllm_command


class _ModelConfig:
    """The two vLLM ModelConfig members the vector table reads."""

    def __init__(self, hidden: int, layers: int) -> None:
        self.hf_config = argparse.Namespace(hidden_size=hidden, num_hidden_layers=layers)

    def get_hidden_size(self) -> int:
        return self.hf_config.hidden_size


@pytest.fixture()
def assets(tiny_assets) -> TinyAssets:
    return tiny_assets("tiny-llama")


def test_round_trip_and_defaults(assets):
    config = SafeInferConfig.from_dict(assets.safeinfer_config(mode="safeinfer", lam=0.9))
    assert SafeInferConfig.from_dict(config.to_dict()) == config
    assert config.default_vector == "a" and config.mode is Mode.SAFEINFER
    single = SafeInferConfig.from_dict({"vector": assets.vectors["a"]})
    assert single.vectors == {"default": assets.vectors["a"]} and single.default_vector == "default"
    assert SafeInferConfig.from_additional_config({"other": 1}) is None


@pytest.mark.parametrize("raw,message", [
    ({"vector": 3}, "safeinfer.vector must be a file path"),
    ({"vectors": {"a": "x"}, "default_vector": "b"}, "default_vector 'b' is not among"),
    ({"vector": "x", "vectors": {"default": "y"}}, "already defines"),
    ({"layer": -1}, "safeinfer.layer"),
    ({"layer": True}, "safeinfer.layer"),
    ({"gamma": float("inf")}, "finite"),
    ({"lam": 1.0}, r"safeinfer.lam must be in \[0, 0.999\]"),
    ({"lam": 0.99999999}, r"safeinfer.lam must be in \[0, 0.999\]"),
    ({"lam": 10**400}, "safeinfer.lam must be finite"),
    ({"gamma": -10**400}, "safeinfer.gamma must be finite"),
    ({"enforce": "yes"}, "safeinfer.enforce"),
    ({"expert_model": "e", "expert_shares_weights": 1}, "expert_shares_weights must be true"),
    ({"expert_shares_weights": True}, "expert_shares_weights needs an expert_model"),
    ({"expert_model": "e", "expert_dtype": "bfloat16", "expert_shares_weights": True},
     "and no expert_dtype"),
    ({"mode": "safe"}, "mode must be one of"),
    ({"vectors": {"a": "x", "b": "y"}, "mode": "sa"}, "no default is configured"),
])
def test_bad_config(raw, message):
    with pytest.raises(SafeInferConfigError, match=message):
        SafeInferConfig.from_dict(raw)


def test_a_bad_config_is_a_typed_value_error():
    with pytest.raises(SafeInferConfigError, match=r"unknown safeinfer config key\(s\) "
                       r"\['colour'\]; known: \['allow_other_model_vectors'"):
        SafeInferConfig.from_dict({"colour": "red"})
    assert issubclass(SafeInferConfigError, ValueError)
    with pytest.raises(SafeInferConfigError, match="cannot read SafeInfer config"):
        SafeInferConfig.from_file("/nonexistent/safeinfer.json")


def test_keys_and_flags_come_from_the_declarations():
    """The accepted keys, the flags and their help are the declarations'; the `vector`
    alias is declared once beside the fields."""
    assert [key.name for key in CONFIG_KEYS][:2] == ["vector", "vectors"]
    assert USER_KEYS == {key.name for key in CONFIG_KEYS} and len(USER_KEYS) == len(CONFIG_KEYS)
    with_flag = [key for key in CONFIG_KEYS if key.flag is not None]
    assert list(FLAGS) == [key.name for key in with_flag]
    assert {key.name for key in CONFIG_KEYS} - set(FLAGS) == {"vector_dir"}
    layer = next(key for key in CONFIG_KEYS if key.name == "layer")
    assert FLAGS["layer"] == {"type": int, "help": layer.help}
    assert FLAGS["enforce"]["help"].startswith("a request that sets")  # not "`true`: ..."
    assert "](" not in FLAGS["expert_shares_weights"]["help"]  # a docs link, made plain
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    dests = {a.dest: a.option_strings for a in parser._actions}
    assert all(dests[name] == [flag_name(name)] for name in FLAGS)


def test_an_internal_field_is_no_key_flag_or_docs_row():
    """A field the plugin sets (`internal()`) is declared once too: not accepted from the
    user, not in to_dict; a field declared as neither is refused."""

    @dataclass(frozen=True)
    class WithIdentity(SafeInferConfig):
        identities: Mapping[str, str] = internal(default_factory=dict)

    assert declared_keys(WithIdentity) == declared_keys(SafeInferConfig)
    config = WithIdentity.from_dict({"vector": "v.safetensors"})
    config = replace(config, identities={"default": "ab"})
    assert "identities" not in config.to_dict()
    assert WithIdentity.from_dict(config.to_dict()).vectors == config.vectors
    with pytest.raises(SafeInferConfigError, match=r"unknown .*\['identities'\]"):
        WithIdentity.from_dict({"identities": {}})

    @dataclass(frozen=True)
    class Undeclared(SafeInferConfig):
        colour: str = field(default="red")

    with pytest.raises(TypeError, match="Undeclared.colour: declare it with"):
        declared_keys(Undeclared)


def test_resolution_and_kv_key(assets):
    config = SafeInferConfig.from_dict(assets.safeinfer_config(mode="sa"))
    assert resolve_request(None, config) == RequestSettings(Mode.SA, vector="a")
    assert resolve_request({"safeinfer_mode": "sgds"}, config) == RequestSettings(Mode.SGDS, lam=0.99)
    explicit = resolve_request({"safeinfer_gamma": 2, "safeinfer_vector": "b"}, config)
    assert explicit == RequestSettings(Mode.SA, vector="b", gamma=2.0)
    assert resolve_request({"safeinfer_mode": "off"}, config).kv_key() is None
    contents = {"a": "1" * 64, "b": "2" * 64}  # the vectors' identities (sha256)
    keys = {(settings := resolve_request(args, config)).kv_key(contents.get(settings.vector))
            for args in (None, {"safeinfer_gamma": 2}, {"safeinfer_vector": "b"},
                         {"safeinfer_mode": "sgds"})}
    assert len(keys) == 4  # three steerings + None


def test_enforce_refuses_any_option_through_validate_params(assets):
    from vllm import SamplingParams

    from vllm_safeinfer.engine.logits_processor import SafeInferLogitsProcessor

    config = SafeInferConfig.from_dict(assets.safeinfer_config(mode="safeinfer", enforce=True))
    with validating_with(config):
        SafeInferLogitsProcessor.validate_params(SamplingParams())
        with pytest.raises(ValueError, match="enforces its SafeInfer configuration"):
            SafeInferLogitsProcessor.validate_params(
                SamplingParams(extra_args={"safeinfer_mode": "safeinfer"}))
    with pytest.raises(ValueError, match="not configured on this server"):
        SafeInferLogitsProcessor.validate_params(SamplingParams(extra_args={"safeinfer_mode": "sa"}))


WEAKENING = [{"safeinfer_mode": "off"}, {"safeinfer_mode": "sa"}, {"safeinfer_mode": "sgds"},
             {"safeinfer_mode": "safeinfer"}, {"safeinfer_gamma": 0.0}, {"safeinfer_lam": 0.0},
             {"safeinfer_vector": "b"}, {"safeinfer_mode": "safeinfer", "safeinfer_lam": 0.99}]


@pytest.mark.parametrize("options", WEAKENING, ids=str)
def test_enforce_refuses_every_change_and_holds_inside_the_engine(assets, options):
    """With `enforce`, any request option is refused at the boundary, even one that
    restates the server's own settings; a request that reaches the engine unvalidated runs
    with the enforced settings anyway. Without `enforce`, the same options are allowed."""
    enforced = SafeInferConfig.from_dict(assets.safeinfer_config(mode="safeinfer", enforce=True))
    with pytest.raises(ValueError, match="enforces its SafeInfer configuration"):
        resolve_request(options, enforced)
    settings, error = resolve_or_defaults(options, enforced)
    assert error is not None and settings == resolve_request({}, enforced)
    assert settings.mode is Mode.SAFEINFER and settings.vector == "a"
    allowed = SafeInferConfig.from_dict(assets.safeinfer_config(mode="safeinfer"))
    assert resolve_or_defaults(options, allowed)[1] is None


def test_gamma_precedence_request_then_config_then_file(assets):
    model_config = _ModelConfig(assets.hidden_size, 4)
    from_file = VectorTable(SafeInferConfig.from_dict(assets.safeinfer_config()), model_config)
    assert from_file.entries["a"].gamma == 1.0 and from_file.entries["b"].gamma == 1.5
    adding = {name: assets.vectors[name] for name in ("a", "b")}
    from_config = VectorTable(SafeInferConfig.from_dict(
        assets.safeinfer_config(vectors=adding, gamma=3.0, layer=3)), model_config)
    with pytest.raises(ValueError, match="steers layers \\[1, 2\\]: the config's single `layer`"):
        VectorTable(SafeInferConfig.from_dict(assets.safeinfer_config(layer=3)), model_config)
    assert {e.gamma for e in from_config.entries.values()} == {3.0}
    assert from_config.layers == (3,)
    # The relative dose gamma*|SV|/|h| (unit vectors; b's file records |h| = 2.0): known
    # only where the file has the norm and the vector steers the layer it was measured at.
    assert from_file.entries["b"].dose == pytest.approx(1.5 / 2.0)
    assert from_file.entries["a"].dose is None
    assert {e.dose for e in from_config.entries.values()} == {None}
    assert VectorTable(SafeInferConfig.from_dict(assets.safeinfer_config(gamma=3.0)),
                       model_config).entries["b"].dose == pytest.approx(3.0 / 2.0)
    state = BatchState(from_file, max_rows=4, device=torch.device("cpu"), pin_memory=False)
    sha = {name: entry.sha256 for name, entry in from_file.entries.items()}
    state.set_row(0, Stamp("r0", Mode.SA, Mode.SA, vector_sha256=sha["b"]), prompt_len=5)
    state.set_row(1, Stamp("r1", Mode.SAFEINFER, Mode.SAFEINFER, vector_sha256=sha["a"],
                           gamma=-2.0, lam=0.5), prompt_len=3)
    state.set_row(2, Stamp("r2", Mode.SGDS, Mode.SGDS, lam=0.9), prompt_len=7)
    state.swap(0, 2)
    state.move(1, 3)
    state.flush()
    slot_a, slot_b = from_file.entries["a"].layers[0] - 1, from_file.entries["b"].layers[0] - 1
    assert state.scale[slot_b].tolist() == [0.0, 0.0, 1.5, 0.0]
    assert state.scale[slot_a].tolist() == [0.0, 0.0, 0.0, -2.0]
    assert state.mixes.tolist() == [True, False, False, True]
    assert state.lam.tolist() == pytest.approx([0.9, 0.0, 0.0, 0.5])
    assert state.prompt_len.tolist() == [7, 0, 5, 3]


def test_cli_flags_map_onto_the_same_keys(assets, tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"vectors": {"a": assets.vectors["a"]}, "mode": "off", "lam": 0.5}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args, rest = parser.parse_known_args([
        "MODEL", "--safeinfer-config", str(file), "--safeinfer-mode", "sa",
        "--safeinfer-vectors", f"b={assets.vectors['b']}", "--safeinfer-enforce",
        "--safeinfer-default-vector", "a", "--port", "9000", "--additional-config", '{"other": 1}'])
    raw = safeinfer_dict(args)
    assert raw == {"vectors": {"a": assets.vectors["a"], "b": assets.vectors["b"]},
                   "mode": "sa", "lam": 0.5, "enforce": True, "default_vector": "a"}
    command = vllm_command(args.model, raw, rest)
    assert command[command.index("--model") + 1] == "MODEL" and "9000" in command
    additional = json.loads(command[command.index("--additional-config") + 1])
    assert additional == {"other": 1, "safeinfer": raw}
    assert command[command.index("--middleware") + 1] == "vllm_safeinfer.server.http_api.safeinfer_endpoints"

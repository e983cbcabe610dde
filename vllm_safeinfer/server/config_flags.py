"""The `--safeinfer-*` flags and `--safeinfer-config FILE.json` of the `safeinfer`
commands (`serve`, `harmeval`): they map onto the keys of the one `safeinfer` dict (flags
win over the file), validated by `SafeInferConfig`. Each flag is built from its key's
declaration (`common/config.py`: `CONFIG_KEYS`), as is the docs' table (`flags_table`)."""
from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

from vllm_safeinfer.common.config import (
    CONFIG_KEYS,
    ConfigKey,
    SafeInferConfig,
    load_json_file,
    markdown_table,
)

CONFIG_FLAG = "--safeinfer-config"
CONFIG_FLAG_METAVAR = "FILE.json"
CONFIG_FLAG_HELP = "a JSON object with the server keys (those of the `safeinfer` dict)"


def flag_name(key: str) -> str:
    return f"--safeinfer-{key.replace('_', '-')}"


def _plain(markdown: str) -> str:
    """A help text for argparse: a docs link becomes its text (and page); `%` escaped."""
    def link(match: re.Match) -> str:
        page = match[2].partition("#")[0]
        return f"{match[1]} (docs/{page})" if page else match[1]
    return re.sub(r"\[([^\]]+)\]\(([^)]+)\)", link, markdown).replace("%", "%%")


def flag_kwargs(key: ConfigKey) -> dict[str, Any]:
    """argparse's arguments of `key`'s flag (dest: the key)."""
    flag = key.flag
    assert flag is not None, key.name
    text = flag.help or key.help
    kwargs: dict[str, Any] = {}
    if flag.switch:  # the flag sets it true: the key's "`true`: X" is X
        text = text.removeprefix("`true`: ")
        kwargs.update(action="store_const", const=True)
    kwargs["help"] = _plain(text)
    for name in ("type", "choices", "metavar", "nargs"):
        if getattr(flag, name) is not None:
            kwargs[name] = getattr(flag, name)
    return kwargs


# key -> argparse kwargs of its flag `--safeinfer-` + the key with dashes.
FLAGS: dict[str, dict[str, Any]] = {key.name: flag_kwargs(key) for key in CONFIG_KEYS
                                    if key.flag is not None}


def add_safeinfer_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(CONFIG_FLAG, metavar=CONFIG_FLAG_METAVAR, help=_plain(CONFIG_FLAG_HELP))
    for key, kwargs in FLAGS.items():
        parser.add_argument(flag_name(key), dest=key, **kwargs)


def flags_table() -> str:
    """The docs' table of the flags (docs/configuration.md, "`--safeinfer-*` flags"): the
    config file's, then a row per key that has a flag. Flags that are not config keys
    (`serve`'s `--safeinfer-admin-key`) follow it, written in the page."""
    rows = [(f"`{CONFIG_FLAG} {CONFIG_FLAG_METAVAR}`", "(all)", CONFIG_FLAG_HELP)]
    for key in CONFIG_KEYS:
        if (flag := key.flag) is None:
            continue
        usage = " ".join(filter(None, (flag_name(key.name), flag.placeholder)))
        value = (flag.help or ", ".join(f"`{choice}`" for choice in flag.choices or ())
                 or ("sets it `true`" if flag.switch else ""))
        rows.append((f"`{usage}`", f"`{key.name}`", value))
    return markdown_table(("flag", "key", "value"), rows)


def safeinfer_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The config file overlaid with the flags that were given, validated."""
    raw: dict[str, Any] = load_json_file(args.safeinfer_config) if args.safeinfer_config else {}
    for key in FLAGS:
        value = getattr(args, key)
        if value is None:
            continue
        if key == "vectors":
            value = {**raw.get("vectors", {}), **_named_files(value)}
        raw[key] = value
    SafeInferConfig.from_dict(raw)
    return raw


def _named_files(items: Sequence[str]) -> dict[str, str]:
    named = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--safeinfer-vectors expects NAME=FILE, got {item!r}")
        named[name] = path
    return named

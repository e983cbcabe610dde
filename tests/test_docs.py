"""The docs' commands and code examples, checked as written: every fenced block of
README.md and docs/*.md, by kind (docs/testing.md says how each kind is checked).

- `python` and `bash` blocks that talk to a server (they name `BASE`) run for real
  against the session's `safeinfer serve` in tests/server/test_openai.py
  (`test_docs_client_examples_run_as_written`, where that server already runs);
- the offline `LLM(...)` example runs for real on the tiny model, in a subprocess;
- other `bash` blocks hold commands too long for the suite: each is checked without
  running it (`safeinfer ...` parsed by the real parser, `make X` dry-run, benchmark
  scripts parsed by their own parser, `vllm serve` by vLLM's, `pip` against setup.py and
  the Makefile); a command with no check fails;
- other `python` blocks are compiled and their imports resolved;
- `console` blocks run, and their shown output must be the real one;
- `text` blocks that give a `safeinfer` command's synopsis may name only real options;
- `json` blocks are server configs, validated by the config loader;
- a block after `<!-- run by tests/FILE.py -->` is run by that file, which must exist and
  name the page.

Also: every relative link resolves (file and heading), every module path named exists,
the flag, key and option tables match the code, and the README stays one screen."""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_BY = re.compile(r"^<!--\s*run by (tests/[\w./-]+\.py)\s*-->$")
FENCE = re.compile(r"^```([\w-]*)\s*$")
LANGUAGES = {"bash", "sh", "python", "console", "text", "json"}
# The placeholders the offline example may use, and what the test gives them.
OFFLINE_PLACEHOLDERS = ("MODEL", "VECTOR", "EXPERT", "PROBE")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    run_by: str | None  # the test file that runs it, for a marked block

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    @property
    def kind(self) -> str:
        if self.run_by is not None:
            return "run-by"
        if self.language == "python":
            if re.search(r"\bBASE\b", self.text):
                return "client"
            return "offline" if re.search(r"\bLLM\(", self.text) else "static"
        if self.language in ("bash", "sh"):
            return "client" if re.search(r"\$\{?BASE\b", self.text) else "commands"
        return self.language


def doc_blocks(pages=PAGES) -> list[Block]:
    """Every fenced block of `pages`, in order."""
    found = []
    for page in pages:
        lines = page.read_text().split("\n")
        i = 0
        while i < len(lines):
            match = FENCE.match(lines[i])
            if match is None:
                i += 1
                continue
            end = i + 1
            while end < len(lines) and lines[end] != "```":
                end += 1
            marker = RUN_BY.match(lines[i - 1].strip()) if i else None
            found.append(Block(page, i + 1, match.group(1), "\n".join(lines[i + 1:end]) + "\n",
                               marker.group(1) if marker else None))
            i = end + 1
    return found


def client_blocks() -> list[Block]:
    """The examples that run against a server (`BASE`, `MODEL`): tests/server/test_openai.py."""
    return [b for b in doc_blocks() if b.kind == "client"]


def marked_blocks(test_file: str) -> list[Block]:
    """The blocks marked `<!-- run by test_file -->` (e.g. "tests/server/test_publish.py")."""
    return [b for b in doc_blocks() if b.run_by == test_file]


def of_kind(*kinds: str) -> list:
    return [pytest.param(b, id=b.where) for b in doc_blocks() if b.kind in kinds]


# --- the blocks themselves -------------------------------------------------------------


def test_every_block_has_a_known_language_and_each_kind_is_present():
    blocks = doc_blocks()
    unknown = [b.where for b in blocks if b.language not in LANGUAGES]
    assert not unknown, f"fenced blocks without a checked language ({LANGUAGES}): {unknown}"
    kinds = [b.kind for b in blocks]
    for kind in ("client", "offline", "commands", "run-by", "text", "console", "json"):
        assert kind in kinds, kind
    assert sum(b.language == "python" and b.kind == "client" for b in blocks) >= 1
    assert sum(b.language != "python" and b.kind == "client" for b in blocks) >= 1
    [offline] = [b for b in blocks if b.kind == "offline"]  # runs once: one engine start
    assert offline.page.name == "README.md"


@pytest.mark.parametrize("block", of_kind("run-by"))
def test_marked_blocks_are_run_by_the_named_test(block):
    test_file = ROOT / block.run_by
    assert test_file.is_file(), f"{block.where}: {block.run_by} does not exist"
    page = str(block.page.relative_to(ROOT))
    assert page in test_file.read_text(), f"{block.run_by} never names {page}"


def logical_lines(text: str) -> list[list[str]]:
    """A shell block's commands as token lists: continuation lines joined, comments and
    blank lines dropped, `time` and leading VAR=value assignments removed."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        while tokens and (tokens[0] == "time" or re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0])):
            tokens = tokens[1:]
        if tokens:
            commands.append(tokens)
    return commands


def parse_or_fail(parse, argv, where: str):
    """`parse(argv)`, with argparse's error message (and exit) turned into a failure."""
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parse(argv)
        except SystemExit as exit_:
            pytest.fail(f"{where}: {shlex.join(argv)}: exit {exit_.code}: {errors.getvalue()}")


@functools.cache
def vllm_serve_parser():
    """vLLM's own `vllm serve` parser, as its CLI builds it."""
    import vllm.entrypoints.cli.serve as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm")
    subparsers = parser.add_subparsers(dest="subparser")
    [command] = serve.cmd_init()
    command.subparser_init(subparsers)
    return parser, command


def check_vllm_serve(argv: list[str], where: str) -> None:
    from vllm_safeinfer.common.config import SafeInferConfig

    parser, command = vllm_serve_parser()
    args = parse_or_fail(parser.parse_args, ["serve", *argv], where)
    command.validate(args)
    if args.additional_config and "safeinfer" in args.additional_config:
        SafeInferConfig.from_dict(args.additional_config["safeinfer"])
    for middleware in args.middleware or []:
        module, _, name = middleware.rpartition(".")
        assert hasattr(importlib.import_module(module), name), f"{where}: {middleware}"


def check_safeinfer(argv: list[str], where: str) -> None:
    from vllm_safeinfer.cli import build_parser

    args, unknown = parse_or_fail(build_parser().parse_known_args, argv, where)
    if unknown:
        assert getattr(args, "accepts_unknown", False), f"{where}: unrecognized {unknown}"
    if args.command == "serve":
        from vllm_safeinfer.server.config_flags import safeinfer_dict
        from vllm_safeinfer.server.serve import vllm_command

        # The flags' config validated as the command does (files need not exist), unless it
        # comes from a --safeinfer-config file; then the vLLM command it would run, by vLLM.
        config = {} if args.safeinfer_config else safeinfer_dict(args)
        command = vllm_command(args.model, config, unknown)
        assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], command
        check_vllm_serve(command[3:], where)


def check_make(argv: list[str], where: str) -> None:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    dry = subprocess.run(["make", "-n", *argv], cwd=ROOT, env=environment,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, f"{where}: make -n {shlex.join(argv)}: {dry.stderr}"


# Runs a benchmark script up to its command-line parsing and no further.
PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_only(self, args=None, namespace=None):
    parse(self, args, namespace)
    print("PARSED")
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_only
sys.argv = sys.argv[1:]
sys.path.insert(0, str(__import__("pathlib").Path(sys.argv[0]).parent))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def check_benchmark(script: str, argv: list[str], where: str) -> None:
    assert re.fullmatch(r"benchmarks/\w+\.py", script) and (ROOT / script).is_file(), \
        f"{where}: {script}"
    parsed = subprocess.run([sys.executable, "-c", PARSE_ONLY, script, *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert parsed.returncode == 0 and "PARSED" in parsed.stdout, \
        f"{where}: {script} {shlex.join(argv)}: {parsed.stderr[-2000:]}"


def setup_extras() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {ast.literal_eval(key) for key in node.value.keys}
    raise AssertionError("setup.py has no extras_require")


def check_pip(argv: list[str], where: str) -> None:
    """pip needs the network: the extras named must be setup.py's, the pins and the
    packages removed the Makefile's."""
    makefile = (ROOT / "Makefile").read_text()
    action, *rest = argv
    names = [a for a in rest if not a.startswith("-") and not a.startswith("http")]
    if action == "uninstall":
        for name in names:
            assert re.search(rf"uninstall\b.*\b{re.escape(name)}\b", makefile), \
                f"{where}: the Makefile does not remove {name}"
        return
    assert action == "install", f"{where}: pip {action}"
    for name in names:
        extras = re.fullmatch(r"(?:vllm-safeinfer|\.)\[([\w,-]+)\]", name)
        if extras:
            missing = set(extras.group(1).split(",")) - setup_extras()
            assert not missing, f"{where}: no such extras in setup.py: {missing}"
        elif "==" in name:
            assert name in makefile, f"{where}: {name} is not the Makefile's pin"
        else:
            assert name in makefile, f"{where}: the Makefile does not install {name}"


@pytest.mark.parametrize("block", of_kind("commands"))
def test_commands_as_written(block):
    commands = logical_lines(block.text)
    assert commands, block.where
    for tokens in commands:
        where = f"{block.where}: {shlex.join(tokens)[:80]}"
        assert not {"&&", "||", "|", ";"} & set(tokens), f"{where}: one command a line"
        program, *argv = tokens
        if program == "safeinfer":
            check_safeinfer(argv, where)
        elif program == "make":
            check_make(argv, where)
        elif program == "python" and argv and argv[0].startswith("benchmarks/"):
            check_benchmark(argv[0], argv[1:], where)
        elif program == "vllm" and argv[:1] == ["serve"]:
            check_vllm_serve(argv[1:], where)
        elif program == "pip":
            check_pip(argv, where)
        else:
            pytest.fail(f"{where}: no check for this command (docs/testing.md lists them)")


def subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    for word in words:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or word not in actions[0].choices:
            break
        parser = actions[0].choices[word]
    return parser


def synopses(text: str) -> list[str]:
    """The `safeinfer ...` synopses of a text block, each with its indented lines."""
    found: list[str] = []
    for line in text.splitlines():
        if line.startswith("safeinfer "):
            found.append(line)
        elif found and line.startswith((" ", "\t")):
            found[-1] += "\n" + line
    return found


@pytest.mark.parametrize("block", of_kind("text"))
def test_synopses_name_only_real_options(block):
    from vllm_safeinfer.cli import build_parser

    for synopsis in synopses(block.text):
        words = re.match(r"safeinfer((?: [a-z]+)+)", synopsis).group(1).split()
        parser = subparser(build_parser(), words)
        known = {s for action in parser._actions for s in action.option_strings}
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", synopsis))
        assert named <= known, f"{block.where}: safeinfer {' '.join(words)}: {named - known}"


@pytest.mark.parametrize("block", of_kind("console"))
def test_console_output_is_the_real_one(block):
    """`$ command` lines run; each output line shown appears in the real output, in
    order (a line `...` stands for lines left out, `...` within a line for any text)."""
    runs: list[tuple[str, list[str]]] = []
    for line in block.text.rstrip("\n").splitlines():
        if line.startswith("$ "):
            runs.append((line[2:], []))
        else:
            runs[-1][1].append(line)
    for command, shown in runs:
        tokens = shlex.split(command)
        assert tokens[0] == "safeinfer", f"{block.where}: {command}"
        real = subprocess.run([sys.executable, "-m", "vllm_safeinfer.cli", *tokens[1:]],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert real.returncode == 0, f"{block.where}: {command}: {real.stderr}"
        lines = iter(real.stdout.splitlines())
        for expected in shown:
            if expected == "...":
                continue
            pattern = ".*".join(re.escape(part) for part in expected.split("..."))
            for got in lines:
                if re.fullmatch(pattern, got):
                    break
            else:
                pytest.fail(f"{block.where}: {command!r} printed no line {expected!r} "
                            f"(in order); it printed:\n{real.stdout}")


@pytest.mark.parametrize("block", of_kind("json"))
def test_json_blocks_are_valid_server_configs(block):
    from vllm_safeinfer.common.config import SafeInferConfig

    SafeInferConfig.from_dict(json.loads(block.text))


@pytest.mark.parametrize("block", of_kind("static"))
def test_python_blocks_not_run_compile_and_import(block):
    """Python too slow for the suite (building a vector): compiled, every import
    resolved, every attribute read from an imported name present."""
    tree = ast.parse(block.text, filename=block.where)
    compile(tree, block.where, "exec")
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name] = importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom):
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block.where}: {node.module}.{alias.name}"
                imported[alias.asname or alias.name] = getattr(module, alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in imported):
            assert hasattr(imported[node.value.id], node.attr), \
                f"{block.where}: {node.value.id}.{node.attr}"


def test_offline_example_runs_as_written(tiny_assets, tmp_path):
    """The README's `LLM(...)` example, its placeholders the tiny model's files, in its
    own process (vLLM's engine-core process re-imports the main module, hence its
    `if __name__ == "__main__":`)."""
    [block] = [b for b in doc_blocks() if b.kind == "offline"]
    assets = tiny_assets("tiny-llama")
    values = dict(zip(OFFLINE_PLACEHOLDERS,
                      (assets.model, assets.vectors["a"], assets.expert, assets.probe)))
    script = tmp_path / "offline_example.py"
    script.write_text("".join(f"{name} = {value!r}\n" for name, value in values.items())
                      + block.text)
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=environment,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{block.where}:\n{run.stderr[-4000:]}"
    assert run.stdout.strip(), f"{block.where}: printed nothing"


# --- the pages around the blocks -------------------------------------------------------


def prose(text: str) -> str:
    """`text` without its fenced blocks and inline code."""
    text = re.sub(r"^```[\w-]*\s*$.*?^```$", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```[\w-]*\s*$.*?^```$", "", page.read_text(), flags=re.S | re.M)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.relative_to(ROOT)}: {broken}"


# Named like a module, but a file format's name.
NOT_MODULES = {"vllm_safeinfer.safety_vector"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_paths_named_exist(page):
    """Every `vllm_safeinfer/...` file and `vllm_safeinfer.x.y[:z]` name the page gives."""
    text = page.read_text()
    missing = []
    for path in set(re.findall(r"(?<![\w/.~$-])vllm_safeinfer/[\w./-]*[\w/]", text)):
        if not (ROOT / path).exists():
            missing.append(path)
    for name in set(re.findall(r"(?<![\w/.~$-])vllm_safeinfer(?:\.\w+)+(?::\w+)?|"
                               r"(?<![\w/.~$-])vllm_safeinfer:\w+", text)):
        if name in NOT_MODULES or name.endswith("_total"):
            continue  # a Prometheus metric, `vllm_safeinfer:..._total`
        dotted, _, attribute = name.partition(":")
        parts = dotted.split(".")
        found = None
        for cut in range(len(parts), 0, -1):  # the longest importable prefix
            try:
                found = importlib.import_module(".".join(parts[:cut]))
            except ModuleNotFoundError:
                continue
            for part in parts[cut:] + ([attribute] if attribute else []):
                found = getattr(found, part, None)
            break
        if found is None:
            missing.append(name)
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"


def table_lines(page: Path, heading: str) -> list[str]:
    """The first table under `heading`, header and separator included."""
    text = page.read_text()
    after = text[text.index(f"\n{heading}\n") + len(heading) + 2:]
    lines = after.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append(line)
    return table


def first_table(page: Path, heading: str) -> list[str]:
    """The first cell (in backticks) of each row of the first table under `heading`."""
    return [m.group(1) for line in table_lines(page, heading)[2:]
            if (m := re.match(r"\| `([^`]+)`", line))]


def after_table(page: Path, heading: str) -> str:
    """The text between the first table under `heading` and the next heading."""
    text = page.read_text()
    table = "\n".join(table_lines(page, heading))
    rest = text[text.index(table, text.index(f"\n{heading}\n")) + len(table):]
    return rest.split("\n#", 1)[0]


def test_configuration_tables_match_the_code():
    """The keys table is `config_table()` and the flags table starts with `flags_table()`
    (rendered from the keys' declarations): a key's help edited in one and not the other
    fails here, with the table to paste."""
    from vllm_safeinfer.cli import build_parser
    from vllm_safeinfer.common.config import CONFIG_KEYS, USER_KEYS, config_table
    from vllm_safeinfer.common.request_options import REQUEST_KEYS
    from vllm_safeinfer.server.config_flags import FLAGS, flags_table

    page = ROOT / "docs" / "configuration.md"
    keys = table_lines(page, "## Server keys")
    assert "\n".join(keys) == config_table(), f"the Server keys table is:\n{config_table()}"
    assert set(first_table(page, "## Server keys")) == USER_KEYS
    heading = "## `--safeinfer-*` flags"
    rendered = flags_table().split("\n")
    flag_rows = table_lines(page, heading)
    assert flag_rows[:len(rendered)] == rendered, f"the flags table starts:\n{flags_table()}"
    flags = {row.split()[0] for row in first_table(page, heading)}
    serve = subparser(build_parser(), ["serve"])
    real = {s for a in serve._actions for s in a.option_strings if s.startswith("--safeinfer-")}
    assert flags == real, (sorted(flags - real), sorted(real - flags))
    no_flag = [key.name for key in CONFIG_KEYS if key.name not in FLAGS]
    assert all(f"`{name}`" in after_table(page, heading) for name in no_flag), no_flag
    options = set(first_table(page, "## Request options"))
    assert options == set(REQUEST_KEYS)


def test_readme_is_one_screen_with_the_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 90
    assert "make test" in readme and "bash .ci/run" in readme
    assert re.search(r"about \d+ min", readme), "the suite's wall time"
    assert "make test" in (ROOT / ".ci" / "run").read_text()

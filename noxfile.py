"""Every command a contributor or CI runs: ``nox -s docs``, ``nox -s tests``, ``nox -s lint``."""

import os
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml("pyproject.toml")
BUILD = ROOT / "docs" / "_build"
SPHINX = ["sphinx-build", "-n", "-W", "--keep-going", "-j", "auto", "docs"]

# PyTorch is installed first, pinned, so that pip does not pick a newer release and its
# multi-GB CUDA wheels on a machine that cannot use them. Where a CPU wheel of this version
# is on pip's find-links (as on CI), pip takes it; elsewhere you get the usual wheel from
# PyPI. Set FIELD_GUIDE_TORCH_INDEX=https://download.pytorch.org/whl/cpu to ask for the CPU
# build explicitly, or FIELD_GUIDE_TORCH to choose another version.
TORCH = os.environ.get("FIELD_GUIDE_TORCH", "torch==2.13.0")


def install(session: nox.Session, *groups: str) -> None:
    index = os.environ.get("FIELD_GUIDE_TORCH_INDEX")
    session.install(TORCH, *(["--index-url", index] if index else []))
    session.install("-e", ".", *nox.project.dependency_groups(PYPROJECT, *groups))


def lab_env() -> dict[str, str]:
    """Keep the tiny model in the checkout and never reach for the Hugging Face Hub."""
    return {"FIELD_GUIDE_CACHE": str(ROOT / ".cache" / "models"), "HF_HUB_OFFLINE": "1"}


@nox.session(default=True)
def docs(session: nox.Session) -> None:
    """Build the HTML site, nitpicky, with every warning an error."""
    install(session, "docs")
    session.run(*SPHINX, "-b", "html", str(BUILD / "html"), *session.posargs, env=lab_env())
    session.log(f"Open {BUILD / 'html' / 'index.html'} in a browser.")


@nox.session(default=True)
def tests(session: nox.Session) -> None:
    """Everything that proves the guide: pytest over tests/, then every doctest on every page."""
    install(session, "tests")
    session.run("pytest", *session.posargs, env=lab_env())
    session.run(*SPHINX, "-b", "doctest", str(BUILD / "doctest"), env=lab_env())


@nox.session(default=True)
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and codespell over code and pages."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("codespell", "docs", "examples", "tests", "README.md", "noxfile.py")


@nox.session(default=False)
def serve(session: nox.Session) -> None:
    """Rebuild the site on every save and reload it in the browser (for writers)."""
    install(session, "serve")
    session.run("sphinx-autobuild", "docs", str(BUILD / "html"), "--watch", "examples", env=lab_env())

"""Every command a contributor or CI runs: ``nox -s docs``, ``nox -s tests``, ``nox -s lint``."""

import logging
import os
from pathlib import Path

import nox

nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "venv"
nox.options.reuse_venv = "yes"

# nox looks for uv even when told to use venv, and logs "uv binary not found." when it is not
# there: nothing is wrong, so the line is dropped rather than left for a reader to worry about.
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")

ROOT = Path(__file__).parent
PYPROJECT = nox.project.load_toml("pyproject.toml")
BUILD = ROOT / "docs" / "_build"
# One worker, on purpose: the pages train models, and two workers running PyTorch on a
# two-core laptop fight over the cores (the same build took 96 s with -j auto, 35 s serial).
# Every builder shares one environment (-d), so the doctest run after the HTML build reads
# no page again, and the runs a figure and a doctest share are computed once (see
# fieldguide.lab.experiment.cached).
SPHINX = ["sphinx-build", "-n", "-W", "--keep-going", "-d", str(BUILD / "doctrees"), "docs"]

# PyTorch is installed first, pinned, so that pip does not pick a newer release and its
# multi-GB CUDA wheels on a machine that cannot use them. Where a CPU wheel of this version
# is on pip's find-links (as on CI), pip takes it; elsewhere you get the usual wheel from
# PyPI. Set FIELD_GUIDE_TORCH_INDEX=https://download.pytorch.org/whl/cpu to ask for the CPU
# build explicitly, or FIELD_GUIDE_TORCH to choose another version.
TORCH = os.environ.get("FIELD_GUIDE_TORCH", "torch==2.13.0")


def install(session: nox.Session, *groups: str) -> None:
    index = os.environ.get("FIELD_GUIDE_TORCH_INDEX")
    session.install(TORCH, *(["--index-url", index] if index else []))
    # The package with its examples' extra (what a reader installs), then the session's groups.
    session.install("-e", ".[examples]", *nox.project.dependency_groups(PYPROJECT, *groups))


def lab_env() -> dict[str, str]:
    """Never reach for the Hugging Face Hub. The tiny model and the pages' runs go where the
    command lines keep them (``$FIELD_GUIDE_CACHE``, else ``~/.cache/llm-finetuning-guide``),
    so that the model is pretrained once for both."""
    return {"HF_HUB_OFFLINE": "1"}


def build_html(session: nox.Session, *args: str, env: dict[str, str] | None = None) -> Path:
    """The site as published: what `docs` builds, and what the browser tests test."""
    session.run(*SPHINX, "-b", "html", str(BUILD / "html"), *args, env=env or lab_env())
    return BUILD / "html"


@nox.session(default=True)
def docs(session: nox.Session) -> None:
    """Build the HTML site, nitpicky, with every warning an error."""
    install(session, "docs")
    site = build_html(session, *session.posargs)
    session.log(f"Open {site / 'index.html'} in a browser.")


@nox.session(default=True)
def tests(session: nox.Session) -> None:
    """Everything that proves the guide: pytest over tests/ (the built site in Chromium
    included, see tests/browser/), then every doctest on every page."""
    install(session, "tests")
    # A page may not train a run it should read from docs/_records (fieldguide.lab.records):
    # that keeps the doctests within their few minutes, and fails if a record is stale.
    env = {**lab_env(), "FIELD_GUIDE_RECORDS": "required"}
    site = build_html(session, env=env)
    session.run("pytest", *session.posargs, env={**env, "FIELD_GUIDE_SITE": str(site)})
    session.run(*SPHINX, "-b", "doctest", str(BUILD / "doctest"), env=env)


@nox.session(default=True)
def lint(session: nox.Session) -> None:
    """ruff (lint and format check) and codespell over code and pages."""
    session.install(*nox.project.dependency_groups(PYPROJECT, "lint"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("codespell", "docs", "examples", "tests", "README.md", "noxfile.py")


@nox.session(default=False)
def benchmark(session: nox.Session) -> None:
    """Step times measured side by side in one run: LoRA (PEFT's and ours) against full
    fine-tuning on a 34M-parameter Llama, with a profile of our LoRA's step. Not in `tests`:
    a timing is a measurement to read, not a pass or a fail."""
    install(session, "tests")
    session.run("python", "-m", "fieldguide.benchmarks.lora_speed", "--profile", *session.posargs)


@nox.session(default=False)
def record(session: nox.Session) -> None:
    """Train again every run the pages read from docs/_records (learning-rate searches, seeds,
    sweeps) and record it, with the machine that computed it (fieldguide.lab.records). Run it
    after changing the code those runs depend on: the tests fail until their records are
    current. About half an hour on a two-core laptop."""
    install(session, "tests")
    env = {**lab_env(), "FIELD_GUIDE_RECORD": "1"}
    session.run(*SPHINX, "-b", "doctest", str(BUILD / "doctest"), *session.posargs, env=env)


@nox.session(default=False)
def linkcheck(session: nox.Session) -> None:
    """Check every external link on the site. Needs the internet, so it is not in `tests`."""
    install(session, "docs")
    session.run(*SPHINX, "-b", "linkcheck", str(BUILD / "linkcheck"), *session.posargs, env=lab_env())


@nox.session(default=False)
def serve(session: nox.Session) -> None:
    """Rebuild the site on every save and reload it in the browser (for writers)."""
    install(session, "serve")
    session.run("sphinx-autobuild", "docs", str(BUILD / "html"), "--watch", "examples", env=lab_env())

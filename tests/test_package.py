"""The package a reader installs, and the workflow that publishes it.

The wheel is built from the checkout and installed with its examples' extra into a fresh venv,
by the pip that venv comes with (the ``wheel_venv`` fixture); its commands then run from
outside the checkout. The release workflow is read as YAML and held to what it promises:
actions pinned by commit, no stored token, the OIDC permission in the publish job alone.
"""

import email
import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

import fieldguide
from fieldguide.__main__ import COMMANDS
from package_venv import noxfile_torch, noxfile_torch_default

ROOT = Path(__file__).parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
RELEASE = ROOT / ".github" / "workflows" / "release.yml"
# Where a reader is told which commands to type.
INSTRUCTIONS = [ROOT / "docs" / "get-the-code.md", ROOT / "README.md"]
# And every page that shows a command line.
PAGES_WITH_COMMANDS = sorted(
    page
    for page in (ROOT / "docs").rglob("*.md")
    if "_build" not in page.parts and "fieldguide " in page.read_text()
)

# -- The wheel -----------------------------------------------------------------------------


def wheel_metadata(wheel: Path) -> tuple[list[str], email.message.Message, str]:
    """The wheel's file names, its METADATA and its entry_points.txt."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(f"{info}/METADATA"))
        return names, metadata, archive.read(f"{info}/entry_points.txt").decode()


def test_the_wheel_has_the_packages_version(wheel_venv):
    _, metadata, _ = wheel_metadata(wheel_venv.wheel)
    assert (metadata["Name"], metadata["Version"]) == ("llm-finetuning-guide", fieldguide.__version__)


def test_the_wheel_holds_the_package_and_nothing_else(wheel_venv):
    names, _, _ = wheel_metadata(wheel_venv.wheel)
    assert {name.split("/")[0] for name in names} == {
        "fieldguide",
        f"llm_finetuning_guide-{fieldguide.__version__}.dist-info",
    }  # no tests/, no docs/
    package = ROOT / "examples"
    modules = {p.relative_to(package).as_posix() for p in (package / "fieldguide").rglob("*.py")}
    assert modules - set(names) == set()


def test_the_wheel_declares_the_examples_extra_and_the_command(wheel_venv):
    _, metadata, entry_points = wheel_metadata(wheel_venv.wheel)
    assert metadata.get_all("Provides-Extra") == ["examples"]
    assert "fieldguide = fieldguide.__main__:main" in entry_points.splitlines()


# -- The installed package, run from outside the checkout -----------------------------------

# One interpreter for everything that imports PyTorch (each start costs seconds): the help of
# every command, through the same entry point as `fieldguide <name> --help`, and what was
# installed.
PROBE = """
import contextlib, io, json
import torch
import fieldguide
from fieldguide.__main__ import COMMANDS, main

helps = {}
for name in COMMANDS:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([name, "--help"])
            code = 0
        except SystemExit as exit:
            code = exit.code
    helps[name] = {"code": code, "text": out.getvalue()}
print(json.dumps({"file": fieldguide.__file__, "torch": torch.__version__,
                  "cuda": torch.version.cuda, "help": helps}))
"""


def run_in(venv, tmp: Path, *command: str) -> subprocess.CompletedProcess:
    """Run a command of the venv in an empty folder, away from the checkout's examples/, with
    nothing written to the reader's cache and nothing asked of the Hub."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", FIELD_GUIDE_CACHE=str(tmp / "cache"))
    program = str(venv.bin / command[0])
    return subprocess.run(
        [program, *command[1:]], check=False, cwd=tmp, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def installed(wheel_venv, tmp_path_factory):
    done = run_in(wheel_venv, tmp_path_factory.mktemp("probe"), "python", "-c", PROBE)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_venv_runs_the_installed_package_not_the_checkout(wheel_venv, installed):
    assert Path(installed["file"]).is_relative_to(wheel_venv.python.parents[1])


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_shows_its_help(installed, name):
    shown = installed["help"][name]
    assert shown["code"] == 0
    assert shown["text"].startswith(f"usage: fieldguide {name} ")


def listed_commands(listing: str) -> list[str]:
    return re.findall(r"^  (\S+)  ", listing, flags=re.MULTILINE)


def test_fieldguide_lists_every_command(wheel_venv, tmp_path):
    done = run_in(wheel_venv, tmp_path, "fieldguide", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"fieldguide {fieldguide.__version__}: ")
    assert listed_commands(done.stdout) == list(COMMANDS)


def test_python_dash_m_fieldguide_is_the_same_command(wheel_venv, tmp_path):
    module = run_in(wheel_venv, tmp_path, "python", "-m", "fieldguide")
    script = run_in(wheel_venv, tmp_path, "fieldguide")
    assert (module.returncode, module.stdout) == (0, script.stdout)
    assert listed_commands(module.stdout) == list(COMMANDS)


def test_an_unknown_command_is_one_line_on_stderr(wheel_venv, tmp_path):
    done = run_in(wheel_venv, tmp_path, "fieldguide", "fine-tune-everything")
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "fieldguide: error: no example named 'fine-tune-everything'; run `fieldguide` to list them"
    ]


def test_the_installed_requirements_are_consistent(wheel_venv, tmp_path):
    done = run_in(wheel_venv, tmp_path, "python", "-m", "pip", "check")
    assert done.returncode == 0, done.stdout


def test_the_pinned_pytorch_survives_the_packages_install(installed):
    """Installing the wheel must not replace the PyTorch installed first (with a CUDA build)."""
    pinned = noxfile_torch().partition("==")[2]
    if not pinned:
        pytest.skip(f"FIELD_GUIDE_TORCH={noxfile_torch()} pins no version")
    assert installed["torch"].split("+")[0] == pinned


def find_links(wheel_venv, tmp: Path) -> list[Path]:
    """The local folders in pip's find-links, from the venv's pip configuration."""
    config = run_in(wheel_venv, tmp, "python", "-m", "pip", "config", "list").stdout
    values = re.findall(r"^\S*find-links='(.*)'$", config, flags=re.MULTILINE)
    return [Path(value) for line in values for value in line.split() if Path(value).is_dir()]


def test_a_cpu_source_of_pytorch_installs_the_cpu_build(wheel_venv, installed, tmp_path):
    index = os.environ.get("FIELD_GUIDE_TORCH_INDEX", "")
    cpu_wheels = [w for folder in find_links(wheel_venv, tmp_path) for w in folder.glob("torch-*+cpu-*.whl")]
    if "/whl/cpu" not in index and not cpu_wheels:
        pytest.skip(
            "PyTorch came from PyPI: set FIELD_GUIDE_TORCH_INDEX=https://download.pytorch.org/whl/cpu"
        )
    assert installed["cuda"] is None, installed["torch"]


# -- What the reader is told to type --------------------------------------------------------


def commands_in(path: Path) -> list[str]:
    """Every line of the file's ```console blocks, without comments."""
    blocks = re.findall(r"^```console\n(.*?)^```", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    if any(line.startswith("$ ") for line in lines):  # a transcript: what follows no $ is output
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [line for line in lines if line]


@pytest.mark.parametrize("path", INSTRUCTIONS, ids=lambda p: p.name)
def test_the_pytorch_a_reader_installs_is_the_one_tested(path):
    pins = re.findall(r"torch==(\S+)", path.read_text())
    assert pins, f"{path.name} names no PyTorch version"
    assert set(pins) == {noxfile_torch_default().partition("==")[2]}


@pytest.mark.parametrize(
    "path", sorted(set(INSTRUCTIONS + PAGES_WITH_COMMANDS)), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_fieldguide_command_a_reader_types_exists_with_its_options(path, installed):
    typed = [
        match[1] for line in commands_in(path) if (match := re.match(r"(?:\S+=\S+ )*fieldguide\b(.*)", line))
    ]
    assert typed, f"{path.name} shows no fieldguide command"
    for arguments in typed:
        words = arguments.split()
        if not words or words[0].startswith("-"):
            continue  # `fieldguide`, `fieldguide --version`: the listing itself
        assert words[0] in COMMANDS, arguments
        options = [word.split("=")[0] for word in words if word.startswith("--")]
        shown = installed["help"][words[0]]["text"]
        unknown = [option for option in options if not re.search(rf"(?<![\w-]){option}(?![\w-])", shown)]
        assert unknown == [], f"fieldguide{arguments}: {unknown} not in `fieldguide {words[0]} --help`"


# -- The release workflow -------------------------------------------------------------------


def load(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as True
    return workflow


def steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_every_action_is_pinned_to_a_commit_named_by_its_version(path):
    used = [step["uses"] for step in steps(load(path)) if "uses" in step]
    assert used and all(re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", action) for action in used), used
    lines = [
        line.strip()
        for line in path.read_text().splitlines()
        if re.match(r"\s*(- )?uses:", line) and "uses: ./" not in line  # ./: a workflow of this repository
    ]
    unnamed = [line for line in lines if not re.search(r"@[0-9a-f]{40} # v\d+(\.\d+)*$", line)]
    assert unnamed == []


def test_the_release_runs_on_version_tags_only():
    assert load(RELEASE)["on"] == {"push": {"tags": ["v*"]}}


def test_only_the_publish_job_may_get_an_oidc_token_and_no_job_may_write():
    workflow = load(RELEASE)
    assert workflow["permissions"] == {"contents": "read"}
    granted = {name: job.get("permissions") for name, job in workflow["jobs"].items()}
    assert granted == {"tests": None, "build": None, "publish": {"id-token": "write"}}


def test_publishing_is_trusted_publishing_with_no_stored_token():
    workflow = load(RELEASE)
    publish = workflow["jobs"]["publish"]
    assert publish["needs"] == ["tests", "build"]  # never a commit whose tests failed
    assert workflow["jobs"]["tests"]["uses"] == "./.github/workflows/tests.yml"
    assert "workflow_call" in load(RELEASE.with_name("tests.yml"))["on"]
    assert publish["environment"]["name"] == "pypi"
    (upload,) = [step for step in publish["steps"] if step["uses"].startswith("pypa/gh-action-pypi-publish@")]
    assert not {"password", "user", "username", "token"} & set(upload.get("with", {}))
    assert "secrets." not in RELEASE.read_text()


def test_the_build_is_checked_before_it_is_published():
    runs = [step.get("run", "") for step in load(RELEASE)["jobs"]["build"]["steps"]]
    assert "python -m build" in runs
    assert "python -m twine check --strict dist/*" in runs


def tag_check() -> str:
    (step,) = [
        step for step in steps(load(RELEASE)) if step.get("name") == "The tag names the package's version"
    ]
    return step["run"]


@pytest.mark.parametrize(
    ("tag", "accepted"),
    [
        (f"v{fieldguide.__version__}", True),
        (fieldguide.__version__, False),  # no v
        ("v99.0.0", False),  # a version not bumped in fieldguide.__version__
        (f"v{fieldguide.__version__}rc1", False),
    ],
)
def test_the_tag_check_accepts_only_v_and_the_packages_version(tmp_path, tag, accepted):
    (tmp_path / "dist").mkdir()
    (tmp_path / "dist" / f"llm_finetuning_guide-{fieldguide.__version__}-py3-none-any.whl").touch()
    env = {"PATH": os.environ["PATH"], "GITHUB_REF_NAME": tag}
    done = subprocess.run(
        ["bash", "-c", tag_check()], check=False, cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (done.returncode == 0) == accepted, done.stdout


# -- The site names its version -------------------------------------------------------------


def test_the_built_site_shows_the_version_it_was_built_from():
    site = os.environ.get("FIELD_GUIDE_SITE")
    if not site:
        pytest.skip("no built site: nox -s tests builds one and sets FIELD_GUIDE_SITE")
    footer = f"Built from <code>llm-finetuning-guide</code> version {fieldguide.__version__}."
    for page in ["index.html", "get-the-code.html"]:
        assert footer in (Path(site) / page).read_text(), page
    text = (Path(site) / "get-the-code.html").read_text()
    assert f"This site was built from version {fieldguide.__version__} of the package." in text

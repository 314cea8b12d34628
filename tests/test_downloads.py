"""The notebook and the script that every page with doctests offers (docs/_ext/downloads.py).

A tiny site, built here, shows what a page becomes: its prose as Markdown that reads like the
page, its doctests as code cells in order with the page's output kept, the install line first.
Its notebook runs in a fresh kernel, and each cell's output is compared with the page's by the
doctests' own checker, flags and all. Then the real thing: the notebooks of the tutorial and of
a whole-model page, from the site that ``nox -s tests`` builds, run top to bottom in a kernel
of the venv where the wheel is installed (``wheel_venv``, no network), and their scripts run
with python to the end.

``FIELD_GUIDE_NOTEBOOK_PYTHON=this`` runs the site's notebooks in this interpreter's kernel
instead of the wheel's venv (the package is installed here already), for a quick local check.
"""

import base64
import copy
import doctest
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from functools import reduce
from operator import or_
from pathlib import Path

import nbformat
import pytest
from downloads import DISTRIBUTION, FOLDER
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from numeric_doctest import NumericOutputChecker

import fieldguide
from fieldguide.lab.pretrain import cache_root, tiny_model_dir

ROOT = Path(__file__).parents[1]
DOCS = ROOT / "docs"
IN_CI = os.environ.get("CI") == "true"
log = logging.getLogger(__name__)

# The tutorial and the cheapest whole-model page: both run their notebook and their script.
RUN_PAGES = ["start-here/tutorial", "whole-model/evaluation"]
INSTALL = f'%pip install "{DISTRIBUTION}[examples]=={fieldguide.__version__}"'

# -- Running a notebook and checking it as the doctests check the page -------------------------


def run_notebook(
    book: nbformat.NotebookNode, python: Path, workdir: Path, timeout: int, cache: Path | None = None
) -> nbformat.NotebookNode:
    """A copy of ``book``, its outputs cleared, run top to bottom in a new kernel of ``python``."""
    run = copy.deepcopy(book)
    for cell in run.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    kernels = workdir / "kernels"
    (kernels / "lab").mkdir(parents=True)
    spec = {
        "argv": [str(python), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "The lab",
        "language": "python",
        # The test run's model cache, so that the tiny model is not pretrained again; no Hub.
        "env": {"FIELD_GUIDE_CACHE": str(cache or cache_root()), "HF_HUB_OFFLINE": "1"},
    }
    (kernels / "lab" / "kernel.json").write_text(json.dumps(spec))
    manager = KernelManager(
        kernel_name="lab", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)])
    )
    client = NotebookClient(run, km=manager, timeout=timeout, resources={"metadata": {"path": str(workdir)}})
    client.execute(cleanup_kc=True)  # shut the kernel down after, though the client did not start it
    return run


def shown(cell) -> tuple[list[str], str]:
    """The kinds of output a cell shows, and their text as doctest would see it. Standard error
    is left out, as doctest leaves it out; consecutive pieces of printed text are one."""
    kinds, text = [], ""
    for output in cell.outputs:
        kind = output.output_type
        if kind == "stream" and output.name == "stderr":
            continue
        if kind == "error":
            text += f"{output.ename}: {output.evalue}\n"
        elif kind == "stream":
            text += output.text
        else:
            text += output.data.get("text/plain", "") + "\n"
        if not (kinds and kinds[-1] == kind == "stream"):
            kinds.append(kind)
    return kinds, text


def mismatches(page: nbformat.NotebookNode, run: nbformat.NotebookNode) -> list[str]:
    """Each code cell whose output in ``run`` differs from the page's, by the doctests' checker
    with the option flags the page's doctest has (the cell's metadata names them)."""
    found = []
    for index, (want, got) in enumerate(zip(page.cells, run.cells, strict=True)):
        if want.cell_type != "code" or "doctest" not in want.metadata:
            continue
        flags = reduce(or_, (doctest.OPTIONFLAGS_BY_NAME[n] for n in want.metadata.doctest.optionflags), 0)
        (want_kinds, want_text), (got_kinds, got_text) = shown(want), shown(got)
        if want_kinds != got_kinds or not NumericOutputChecker().check_output(want_text, got_text, flags):
            found.append(
                f"cell {index}:\n{want.source}\n-- the page shows {want_kinds}:\n{want_text}"
                f"-- the notebook shows {got_kinds}:\n{got_text}"
            )
    return found


def code_cells(book) -> list[tuple[str, list[str], str]]:
    return [(cell.source, *shown(cell)) for cell in book.cells if cell.cell_type == "code"]


# -- A tiny site -----------------------------------------------------------------------------

CONF = f"""
import doctest, sys
sys.path.insert(0, {str(DOCS / "_ext")!r})
project = "Tiny Guide"
extensions = ["sphinx.ext.doctest", "myst_parser", "sphinxcontrib.bibtex", "sphinx_design",
              "numeric_doctest", "downloads"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
bibtex_bibfiles = ["refs.bib"]
bibtex_reference_style = "author_year"
doctest_global_setup = "import math"
doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
html_theme = "furo"
html_baseurl = "https://example.org/guide/"
"""

BIB = """
@article{hu2021lora,
  title = {LoRA: Low-Rank Adaptation of Large Language Models},
  author = {Hu, Edward J. and Shen, Yelong and Wallis, Phillip},
  journal = {arXiv}, year = {2021}, url = {https://arxiv.org/abs/2106.09685}
}
"""

INDEX = """
# Tiny guide

A page with no code.

```{toctree}
page
```

```{bibliography}
```
"""

PAGE = """
# A page that runs code

Adapters {cite:p}`hu2021lora` train $r (d + k)$ numbers; see [the index](index.md).

$$
W = W_0 + B A
$$ (eq-update)

```{doctest}
>>> x = 2
>>> x + 1
3
>>> print(f"{x / 3:.2f} of a whole")  # doctest: +NUMBER
0.67 of a whole
>>> for i in range(2):
...     print(i)
0
1
>>> words = ["a long word"] * 12
>>> words
['a long word', 'a long word', 'a long word', 'a long word', 'a long word', 'a long word', 'a long word', 'a long word', 'a long word', 'a long word', 'a long word', 'a long word']
>>> print("one\\n\\ntwo")
one
<BLANKLINE>
two
>>> def greet():
...     print("hello, reader")
>>> greet()
hello, reader
>>> import not_a_module  # doctest: +SKIP
>>> y = x * 10
```

```{figure} square.svg
:alt: A grey square.

The caption.
```

```{testcode}
print(math.floor(y / 3))
```

```{testoutput}
6
```

1. Break it.

   :::{dropdown} Solution
   Like this:

   ```{doctest}
   >>> int("x")
   Traceback (most recent call last):
   ...
   ValueError: invalid literal for int() with base 10: 'x'
   >>> import json
   >>> json.loads("{")
   Traceback (most recent call last):
   ...
   json.decoder.JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)
   ```

   And after it.
   :::

2. The second.
"""

JSON_ERROR = "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"
SQUARE = '<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"><rect width="8" height="8" fill="grey"/></svg>'
# (code, kinds of output, their text): what the tiny page's notebook holds, in order.
TINY_CELLS = [
    (INSTALL, [], ""),
    ("import math", [], ""),
    ("x = 2\nx + 1", ["execute_result"], "3\n"),
    ('print(f"{x / 3:.2f} of a whole")', ["stream"], "0.67 of a whole\n"),
    ("for i in range(2):\n    print(i)", ["stream"], "0\n1\n"),
    ('words = ["a long word"] * 12\nwords', ["execute_result"], repr(["a long word"] * 12) + "\n"),
    ('print("one\\n\\ntwo")', ["stream"], "one\n\ntwo\n"),
    (
        'def greet():\n    print("hello, reader")\ngreet()',
        ["stream"],
        "hello, reader\n",
    ),  # a call that prints
    ("y = x * 10", [], ""),
    ("print(math.floor(y / 3))", ["stream"], "6\n"),
    ('int("x")', ["error"], "ValueError: invalid literal for int() with base 10: 'x'\n"),
    # Jupyter names an exception by its class alone; doctest adds a non-builtin one's module.
    ('import json\njson.loads("{")', ["error"], f"JSONDecodeError: {JSON_ERROR}\n"),
]


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("tiny-site")
    for name, text in [
        ("conf.py", CONF),
        ("refs.bib", BIB),
        ("index.md", INDEX),
        ("page.md", PAGE),
        ("square.svg", SQUARE),
    ]:
        (source / name).write_text(text)
    # A process of its own, with warnings as errors, as the site is built.
    command = [sys.executable, "-m", "sphinx", "-q", "-n", "-W", "-b", "html", source, source / "_build"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return source / "_build"


@pytest.fixture(scope="module")
def tiny_notebook(tiny_site) -> nbformat.NotebookNode:
    return nbformat.read(tiny_site / FOLDER / "page.ipynb", as_version=4)


@pytest.fixture(scope="module")
def tiny_run(tiny_notebook, tmp_path_factory) -> nbformat.NotebookNode:
    page = copy.deepcopy(tiny_notebook)
    page.cells[0].source = "import math  # the lab need not be installed for this page"
    return run_notebook(page, Path(sys.executable), tmp_path_factory.mktemp("tiny-run"), timeout=60)


def test_the_install_cell_names_the_package_and_its_version():
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert f'%pip install "{name}[examples]=={fieldguide.__version__}"' == INSTALL


def test_a_page_with_doctests_gets_a_notebook_and_a_script_and_a_page_without_none(tiny_site):
    assert sorted(p.name for p in (tiny_site / FOLDER).iterdir()) == ["page.ipynb", "page.py"]


def test_the_notebook_is_valid_and_its_code_cells_are_the_pages_doctests(tiny_notebook):
    nbformat.validate(tiny_notebook)
    assert tiny_notebook.cells[0].source == INSTALL
    assert code_cells(tiny_notebook) == TINY_CELLS
    flags = [cell.metadata.get("doctest", {}).get("optionflags") for cell in tiny_notebook.cells[4:]]
    number = next(cell for cell in tiny_notebook.cells if "of a whole" in cell.source)
    assert "NUMBER" in number.metadata.doctest.optionflags  # from the line's `# doctest: +NUMBER`
    assert ["DONT_ACCEPT_TRUE_FOR_1", "ELLIPSIS", "NORMALIZE_WHITESPACE"] in flags  # conf.py's defaults
    error = next(cell for cell in tiny_notebook.cells if cell.source == 'int("x")')
    assert error.metadata.tags == ["raises-exception"]


def test_the_prose_reads_as_the_page_does(tiny_notebook):
    markdown = "\n\n".join(cell.source for cell in tiny_notebook.cells if cell.cell_type == "markdown")
    # The citation in its words and brackets, as the page shows it (escaped from Markdown's links).
    assert r"Adapters \[Hu *et al.*, 2021\] train $r (d + k)$ numbers" in markdown
    assert "[the index](https://example.org/guide/index.html)" in markdown
    assert "$$\nW = W_0 + B A \\tag{1}\n$$" in markdown
    assert "hu2021lora" not in markdown and "{cite" not in markdown
    # A skipped example is shown, not run.
    assert "Not run on the site:\n\n```python\nimport not_a_module\n```" in markdown
    # A figure travels inside the notebook, as an attachment of its cell.
    assert "![A grey square.](attachment:square.svg)\n\n*The caption.*" in markdown
    (figure,) = [cell for cell in tiny_notebook.cells if "attachments" in cell]
    assert base64.b64decode(figure.attachments["square.svg"]["image/svg+xml"]).decode() == SQUARE
    # The exercise stays a numbered list around its solution's code cell.
    assert "1. Break it.\n\n   **Solution**\n\n   Like this:" in markdown
    assert "And after it.\n\n2. The second." in markdown


def test_the_notebook_runs_and_shows_the_pages_output(tiny_notebook, tiny_run):
    assert mismatches(tiny_notebook, tiny_run) == []
    # IPython shows the long list wrapped over lines; the page's NORMALIZE_WHITESPACE accepts it.
    words = next(cell for cell in tiny_run.cells if cell.source.endswith("\nwords"))
    assert "\n" in words.outputs[0].data["text/plain"]


@pytest.mark.parametrize(
    ("cell", "output", "found"),
    [
        ("x = 2\nx + 1", "4", True),  # a wrong value
        ('print(f"{x / 3:.2f} of a whole")', "0.68 of a whole\n", False),  # within its last digit
        ('print(f"{x / 3:.2f} of a whole")', "0.69 of a whole\n", True),  # beyond it
        ("y = x * 10", None, True),  # output where the page shows none
    ],
)
def test_the_comparison_finds_an_output_that_differs(tiny_notebook, tiny_run, cell, output, found):
    page = copy.deepcopy(tiny_notebook)
    target = next(c for c in page.cells if c.source == cell)
    if output is None:
        target.outputs = [nbformat.v4.new_output("stream", name="stdout", text="surprise\n")]
    elif target.outputs[0].output_type == "stream":
        target.outputs[0].text = output
    else:
        target.outputs[0].data["text/plain"] = output
    assert bool(mismatches(page, tiny_run)) is found


def test_the_script_runs_to_the_end(tiny_site, tmp_path):
    script = (tiny_site / FOLDER / "page.py").read_text()
    assert f"#     {INSTALL.removeprefix('%')}" in script
    assert "# ![A grey square.](https://example.org/guide/_images/square.svg)" in script
    (tmp_path / "page.py").write_text(script)
    done = subprocess.run(
        [sys.executable, "page.py"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    # Printed output as on the page; the expected exception is caught and printed.
    printed = "0.67 of a whole\n0\n1\none\n\ntwo\nhello, reader\n6\n"
    errors = f"ValueError: invalid literal for int() with base 10: 'x'\nJSONDecodeError: {JSON_ERROR}\n"
    assert done.stdout == printed + errors


def test_the_page_links_to_both_and_the_page_without_doctests_does_not(tiny_site):
    page, index = (tiny_site / "page.html").read_text(), (tiny_site / "index.html").read_text()
    for href, label in [
        (f"{FOLDER}/page.ipynb", "Download notebook"),
        (f"{FOLDER}/page.py", "Download Python script"),
    ]:
        assert f'href="{href}" download>{label}</a>' in page
    assert "Download notebook" not in index and "downloads.css" not in index
    # At the top: right after the title.
    assert re.search(r"</h1><p class=\"downloads\">", page)


# -- The site's own pages --------------------------------------------------------------------


def built_site() -> Path:
    site = os.environ.get("FIELD_GUIDE_SITE")
    root = Path(site) if site else DOCS / "_build" / "html"
    if not (root / "index.html").is_file():
        reason = "no built site: run `nox -s tests`, or build docs/_build/html and set FIELD_GUIDE_SITE to it"
        if IN_CI:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return root


def has_doctests(page: Path) -> bool:
    return re.search(r"^\s*(```|:::)\{(doctest|testcode)\}", page.read_text(), flags=re.MULTILINE) is not None


def test_every_page_with_doctests_has_both_files_and_no_other_page_has():
    downloads = built_site() / FOLDER
    pages = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
    expected = {p.relative_to(DOCS).with_suffix("").as_posix() for p in pages if has_doctests(p)}
    assert "start-here/tutorial" in expected
    found = {p.relative_to(downloads).with_suffix("").as_posix() for p in downloads.rglob("*.ipynb")}
    scripts = {p.relative_to(downloads).with_suffix("").as_posix() for p in downloads.rglob("*.py")}
    assert found == scripts == expected


@pytest.fixture(scope="module")
def lab(request):
    """Where the site's notebooks run: ``(python, the install cell's replacement)``."""
    if os.environ.get("FIELD_GUIDE_NOTEBOOK_PYTHON") == "this":
        return Path(sys.executable), "import fieldguide  # installed in this interpreter already"
    venv = request.getfixturevalue("wheel_venv")
    # The page's own requirement, extra and version included, resolved against the local
    # wheel and what the venv holds instead of against PyPI.
    return venv.python, INSTALL.replace(
        "%pip install ", f"%pip install --no-index --find-links {venv.wheel.parent} "
    )


@pytest.fixture
def cold_cache(tmp_path) -> Path:
    """A model cache holding the tiny model and nothing else, so a notebook computes every run
    itself instead of reading what the site's build computed."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model_dir(), cache / tiny_model_dir().name)
    return cache


@pytest.mark.parametrize("name", RUN_PAGES)
def test_a_pages_notebook_runs_and_shows_the_pages_output(name, lab, tmp_path, cold_cache):
    page = nbformat.read(built_site() / FOLDER / f"{name}.ipynb", as_version=4)
    assert page.cells[0].source == INSTALL
    python, install = lab
    page_to_run = copy.deepcopy(page)
    page_to_run.cells[0].source = install
    start = time.perf_counter()
    run = run_notebook(page_to_run, python, tmp_path, timeout=900, cache=cold_cache)
    log.info("the notebook of %s ran in %.0f s", name, time.perf_counter() - start)
    assert "ERROR" not in shown(run.cells[0])[1]  # %pip reports a failure without raising
    assert mismatches(page, run) == []
    assert len([c for c in page.cells if "doctest" in c.metadata]) >= 5  # the page's doctests were compared


@pytest.mark.parametrize("name", RUN_PAGES)
def test_a_pages_script_runs_to_the_end(name, lab, tmp_path, cold_cache):
    python, _ = lab
    script = built_site() / FOLDER / f"{name}.py"
    start = time.perf_counter()
    env = {**os.environ, "FIELD_GUIDE_CACHE": str(cold_cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [python, script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800, check=False
    )
    log.info("the script of %s ran in %.0f s", name, time.perf_counter() - start)
    assert done.returncode == 0, done.stderr[-3000:]

"""The site's structure: every page reachable, every citation sound, every page executed, and
every page's examples runnable on their own, in a fresh interpreter."""

import ast
import builtins
import doctest
import re
import symtable
import tomllib
from pathlib import Path

import numeric_doctest  # noqa: F401 (registers +NUMBER, which doctest's parser must know to read the pages)
import pytest
from pybtex.database import parse_file

DOCS = Path(__file__).parents[1] / "docs"
EXAMPLES = Path(__file__).parents[1] / "examples" / "fieldguide"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)

# Pages that explain no code and so carry no doctest, each with its reason.
NO_DOCTEST = {
    "index": "the home page: a map of the site",
    "reference/glossary": "reference: definitions only",
    "reference/bibliography": "reference: the list of works cited",
    "reference/api": "reference: generated from the examples' docstrings",
}


def page_name(path: Path) -> str:
    return path.relative_to(DOCS).with_suffix("").as_posix()


def toctree_entries(text: str) -> list[str]:
    """The documents listed in a page's ```{toctree} blocks (options skipped)."""
    entries = []
    for block in re.findall(r"```\{toctree\}\n(.*?)```", text, flags=re.DOTALL):
        entries += [
            line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith(":")
        ]
    return entries


def test_every_page_is_reachable_from_the_index():
    reached, queue = set(), ["index"]
    while queue:
        name = queue.pop()
        if name in reached:
            continue
        reached.add(name)
        queue += toctree_entries((DOCS / f"{name}.md").read_text())
    assert {page_name(p) for p in PAGES} - reached == set()


def cited_keys() -> dict[str, set[str]]:
    """Citation keys per page, from {cite}, {cite:p}, {cite:t} and similar roles."""
    keys = {}
    for page in PAGES:
        roles = re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", page.read_text())
        keys[page_name(page)] = {key.strip() for role in roles for key in role.split(",")}
    return keys


BIB = parse_file(str(DOCS / "refs.bib")).entries


def test_every_cited_key_is_in_the_bibliography():
    missing = {page: keys - set(BIB) for page, keys in cited_keys().items() if keys - set(BIB)}
    assert missing == {}


def test_every_bibliography_entry_is_cited():
    cited = set().union(*cited_keys().values())
    assert set(BIB) - cited == set()


@pytest.mark.parametrize("key", sorted(BIB))
def test_every_entry_has_a_doi_an_arxiv_id_or_a_url(key):
    fields = {name.lower() for name in BIB[key].fields}
    assert fields & {"doi", "eprint", "url"}


@pytest.mark.parametrize("page", PAGES, ids=page_name)
def test_every_page_but_the_allowed_ones_runs_a_doctest(page):
    has_doctest = "```{doctest}" in page.read_text()
    assert has_doctest or page_name(page) in NO_DOCTEST, f"{page_name(page)} runs no doctest"


def test_the_doctest_allowlist_names_only_real_pages():
    assert set(NO_DOCTEST) <= {page_name(p) for p in PAGES}


MODULES = sorted(
    p.relative_to(EXAMPLES.parent).with_suffix("").as_posix()
    for p in EXAMPLES.rglob("*.py")
    if p.stem != "__init__"
)


@pytest.mark.parametrize("module", MODULES)
def test_every_example_module_is_included_by_a_page(module):
    text = "\n".join(page.read_text() for page in PAGES)
    dotted = module.replace("/", ".")
    included = f"examples/{module}.py" in text or f"automodule:: {dotted}" in text
    assert included, f"no page includes examples/{module}.py"


# -- Every page imports what its examples use ---------------------------------------------
# conf.py's doctest_global_setup runs before each page's doctests. A name it leaves bound
# (torch, say) would let a page use it unimported: the build passes, and a reader who pastes
# the blocks into Python gets a NameError. So the setup may leave no name, and each page is
# read, block after block, for a name used before the page itself imports or assigns it.

DOCTEST_BLOCK = re.compile(r"^```\{doctest\}.*\n((?:.*\n)*?)```[ \t]*$", re.MULTILINE)


def doctest_sources(markdown: str) -> list[str]:
    """The code of every example of a page's ```{doctest} blocks, in page order."""
    parser = doctest.DocTestParser()
    return [
        example.source for block in DOCTEST_BLOCK.findall(markdown) for example in parser.get_examples(block)
    ]


def bound_names(source: str) -> set[str]:
    """The names a piece of code binds at the top level: by import, assignment, def, for, with."""
    table = symtable.symtable(source, "<doctest>", "exec")
    return {
        symbol.get_name() for symbol in table.get_symbols() if symbol.is_assigned() or symbol.is_imported()
    }


def global_reads(table: symtable.SymbolTable) -> set[str]:
    """The names a piece of code reads from the top-level namespace, in any of its scopes."""
    names = {
        symbol.get_name()
        for symbol in table.get_symbols()
        if symbol.is_referenced() and (table.get_type() == "module" or symbol.is_global())
    }
    return names.union(*(global_reads(child) for child in table.get_children()))


def unbound_names(sources: list[str]) -> list[str]:
    """Names read by an example that no earlier example (nor itself) binds, and no builtin is,
    each listed once, at its first use."""
    known, missing = set(dir(builtins)), []
    for source in sources:
        binds = bound_names(source)
        missing += sorted(global_reads(symtable.symtable(source, "<doctest>", "exec")) - known - binds)
        known |= binds | set(missing)
    return missing


@pytest.mark.parametrize(
    ("sources", "missing"),
    [
        (["import torch\n", "torch.ones(2)\n"], []),
        (["torch.ones(2)\n", "torch.zeros(2)\n", "import torch\n"], ["torch"]),  # imported after its use
        (["import torch.nn.functional as F\n", "torch.ones(2)\n"], ["torch"]),  # binds F only
        (["with torch.no_grad():\n    y = model(x)\n"], ["model", "torch", "x"]),
        (["f = lambda: tokenizer.eos_token\n"], ["tokenizer"]),  # read inside a nested scope
        (["for i in range(3):\n    print(i)\n", "i, len([j for j in range(i)])\n"], []),
    ],
)
def test_the_name_check_finds_a_name_used_before_it_is_bound(sources, missing):
    assert unbound_names(sources) == missing


@pytest.mark.parametrize("page", [p for p in PAGES if "```{doctest}" in p.read_text()], ids=page_name)
def test_every_page_binds_every_name_its_examples_use(page):
    missing = unbound_names(doctest_sources(page.read_text()))
    assert missing == [], f"{page_name(page)} uses {missing} before importing them in its own blocks"


def names_left_by(source: str) -> set[str]:
    """The names a piece of code leaves bound when it ends: those it binds, less those it deletes."""
    left = set()
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Delete):
            left -= {target.id for target in statement.targets if isinstance(target, ast.Name)}
        else:
            left |= bound_names(ast.unparse(statement))
    return left


def global_doctest_setup() -> str:
    """conf.py's doctest_global_setup, read from its source: conf.py itself is not run."""
    for node in ast.parse((DOCS / "conf.py").read_text()).body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "doctest_global_setup":
            return ast.literal_eval(node.value)
    raise LookupError("docs/conf.py sets no doctest_global_setup")


def test_names_left_by_reads_imports_and_deletions():
    assert names_left_by("import torch\nimport warnings as w\nx = 1\ndel w\n") == {"torch", "x"}


def test_the_global_doctest_setup_leaves_no_name_for_a_page_to_lean_on():
    assert names_left_by(global_doctest_setup()) == set()


def test_the_site_has_one_address_everywhere():
    """conf.py's SITE is the canonical address; pyproject.toml and the README name no other."""
    root = DOCS.parent
    site = re.search(r'^SITE = "([^"]+)"', (DOCS / "conf.py").read_text(), flags=re.MULTILINE)[1]
    urls = tomllib.loads((root / "pyproject.toml").read_text())["project"]["urls"]
    assert urls["Documentation"] == site
    for path in [root / "README.md", root / "pyproject.toml", DOCS / "conf.py", *PAGES]:
        assert "readthedocs" not in path.read_text().lower(), f"{path.name} names another site address"

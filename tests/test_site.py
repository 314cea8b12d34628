"""The site's structure: every page reachable, every citation sound, every page executed."""

import re
from pathlib import Path

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

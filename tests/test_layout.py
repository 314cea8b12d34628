"""The package's shape: the lab below, one module per page above it, and nothing in between.

``fieldguide/lab/`` is what every page shares; ``fieldguide/benchmarks/`` holds the
measurements ``nox -s benchmark`` runs, which may use any technique and which no page's module
imports; every other subpackage is one part of the site with one module per page, named after
the page's slug, and ``docs/`` and ``tests/`` mirror that tree. Techniques import only the lab
(``EXTENSIONS`` declares the exceptions), and no import, not even one inside a function,
closes a cycle.
"""

import ast
from pathlib import Path

import pytest

from fieldguide.lab.records import imported_modules

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "examples" / "fieldguide"
DOCS, TESTS = ROOT / "docs", ROOT / "tests"

# A technique that builds on another technique says so here.
EXTENSIONS: dict[str, set[str]] = {
    "fieldguide.costs.multi_device": {
        "fieldguide.parameter_efficient.lora"
    },  # the multi-device runs train the LoRA page's LoRA
    "fieldguide.alignment.dpo_successors": {
        "fieldguide.alignment.dpo"
    },  # the successors run beside DPO, with its loss and its measures
    "fieldguide.alignment.ppo": {
        "fieldguide.alignment.reward_models"
    },  # PPO trains against the reward model page's reward model
    "fieldguide.parameter_efficient.dora": {
        "fieldguide.parameter_efficient.lora"
    },  # DoRA is LoRA plus a magnitude
    "fieldguide.parameter_efficient.qlora": {
        "fieldguide.parameter_efficient.lora"
    },  # QLoRA is LoRA over a 4-bit base
    "fieldguide.parameter_efficient.p_tuning": {
        "fieldguide.parameter_efficient.prompt_tuning"
    },  # P-tuning is prompt tuning whose prompt a network makes
    "fieldguide.parameter_efficient.merging": {
        "fieldguide.parameter_efficient.lora"
    },  # merging merges the LoRA page's adapters
    "fieldguide.parameter_efficient.choosing_a_method": {  # the comparison reads every page's run
        *(
            f"fieldguide.parameter_efficient.{page}"
            for page in (
                "adapters",
                "bitfit",
                "dora",
                "ia3",
                "lora",
                "p_tuning",
                "prefix_tuning",
                "prompt_tuning",
                "qlora",
            )
        ),
        "fieldguide.whole_model.evaluation",
        "fieldguide.parameter_efficient",  # as "from fieldguide.parameter_efficient import lora"
        "fieldguide.whole_model",
    },
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
NOT_PARTS = {"lab", "benchmarks", "__pycache__"}
PARTS = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name not in NOT_PARTS)
TECHNIQUES = [
    name
    for name in MODULES
    if name.count(".") == 2 and not name.startswith(("fieldguide.lab.", "fieldguide.benchmarks."))
]


def imports_of(path: Path) -> set[str]:
    """Every fieldguide module ``path`` imports, wherever the import statement stands: the
    walk that the records' source hash follows (fieldguide.lab.records.imported_modules)."""
    return imported_modules(path)


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``graph`` as a list of modules, by depth-first search; None if there is none."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    assert find_cycle(GRAPH) is None


def test_the_lab_imports_nothing_above_it():
    above = {
        name: {dep for dep in deps if not dep.startswith("fieldguide.lab")}
        for name, deps in GRAPH.items()
        if name.startswith("fieldguide.lab")
    }
    assert {name: deps for name, deps in above.items() if deps - {"fieldguide"}} == {}


@pytest.mark.parametrize("module", TECHNIQUES)
def test_a_technique_imports_only_the_lab(module):
    allowed = EXTENSIONS.get(module, set())
    outside = {dep for dep in GRAPH[module] if not dep.startswith("fieldguide.lab")} - allowed
    assert outside == set(), f"{module} imports {outside}; code two pages need belongs in the lab"


@pytest.mark.parametrize("module", TECHNIQUES)
def test_a_technique_is_named_after_its_page(module):
    _, part, name = module.split(".")
    page = DOCS / part.replace("_", "-") / f"{name.replace('_', '-')}.md"
    assert page.is_file(), f"{module} has no page {page.relative_to(ROOT)}"


@pytest.mark.parametrize("part", PARTS)
def test_every_page_of_a_part_has_its_module(part):
    pages = sorted((DOCS / part.replace("_", "-")).glob("*.md"))
    assert pages, f"the part {part} has no pages in docs/"
    for page in pages:
        assert (PACKAGE / part / f"{page.stem.replace('-', '_')}.py").is_file(), page


@pytest.mark.parametrize(
    "module", [name for name in MODULES if name.startswith("fieldguide.") and name.count(".") == 2]
)
def test_tests_mirror_the_package(module):
    _, part, name = module.split(".")
    assert (TESTS / part / f"test_{name}.py").is_file(), f"no tests/{part}/test_{name}.py for {module}"


@pytest.mark.parametrize(
    "package",
    ["fieldguide", "fieldguide.lab", "fieldguide.benchmarks", *(f"fieldguide.{part}" for part in PARTS)],
)
def test_a_package_init_holds_a_docstring_only(package):
    tree = ast.parse(MODULES[package].read_text())
    body = tree.body[1:]
    if package == "fieldguide":  # and the version, written once (pyproject.toml reads it)
        assert [ast.unparse(node).split(" = ")[0] for node in body] == ["__version__"], body
        body = []
    assert ast.get_docstring(tree) and not body, f"{package}/__init__.py holds code"


def test_no_page_module_imports_a_benchmark():
    importers = {
        name: deps
        for name, deps in GRAPH.items()
        if not name.startswith("fieldguide.benchmarks")
        and any(dep.startswith("fieldguide.benchmarks") for dep in deps)
    }
    assert importers == {}, "a benchmark is a measurement to run, not code pages share"

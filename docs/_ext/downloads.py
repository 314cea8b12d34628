"""Every page that runs code, downloadable as a Jupyter notebook and as a Python script.

Both are made at build time from the page itself, never by hand: its prose becomes Markdown
cells (math as LaTeX, which Jupyter renders; citations, glossary terms and cross-references as
the words the page shows), and its doctests become code cells, in order, each with the output
the page shows kept as the cell's output. Two links at the top of the page offer them.

How a doctest becomes cells:

- A block is cut after each example that shows output, so that each output sits under the
  line that printed it, as on the page; a block with one output is one cell. The output is an
  ``execute_result`` where the example is an expression (doctest shows its repr, as Jupyter
  does) and ``stream`` output where it prints (see ``shows_a_value`` for calls); an expected
  exception is an ``error`` output, named by its class as Jupyter names it, and its cell is
  tagged ``raises-exception`` so that the notebook runs on past it.
- Each code cell's metadata names the doctest option flags its output is compared with (the
  site's defaults, the block's ``:options:`` and the line's ``# doctest:`` comment, as Sphinx
  combines them), so that a test can check a run of the notebook as the doctest builder checks
  the page. The ``# doctest:`` comments themselves are left out of the code, as the page
  leaves them out (``trim_doctest_flags``).
- An example marked ``+SKIP`` is not run on the site, so it is not a code cell either: it is
  shown as code in the Markdown, and as a comment in the script.
- ``testcode`` blocks are cells as they are, with the ``testoutput`` that follows as their
  output; ``testsetup`` and ``testcleanup`` blocks, hidden on the page, are cells too, since
  the code after them needs them. A notebook has one namespace, so doctest groups are ignored.

The notebook's first cell installs the version of the examples the site was built from
(``fieldguide.__version__``); the next runs the site's ``doctest_global_setup``. A figure
travels inside the notebook, as an attachment of its Markdown cell. The script is the same notebook in Jupytext's
"percent" format (``# %%`` cells, which VS Code, Spyder and PyCharm run one by one), with the
page's outputs as comments and an expected exception caught and printed, so that it runs to
the end; it says in a comment which version to install.

Files go to ``_downloads/notebooks/<page>.ipynb`` and ``.py`` in the HTML output, written
when the page is (so an incremental build rewrites only the changed pages' files; conf.py's
``release`` is the version, so a new one rebuilds every page). The links' style is the site's
``_static/downloads.css``, linked from those pages only.
"""

import ast
import base64
import builtins
import doctest
import importlib.metadata
import mimetypes
import posixpath
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin

import nbformat
from docutils import nodes
from sphinx import addnodes
from sphinx.ext.doctest import blankline_re, doctestopt_re

import fieldguide

# pyproject.toml's [project] name: what a reader installs.
DISTRIBUTION = "llm-finetuning-guide"
FOLDER = "_downloads/notebooks"
FLAG_NAMES = {flag: name for name, flag in doctest.OPTIONFLAGS_BY_NAME.items()}
# Characters Markdown would read as markup (and `$` as math, in Jupyter); `_` only at the edge
# of a word, since snake_case inside one is plain text.
MARKUP = re.compile(r"[\\`*\[\]<$|]|(?<!\w)_|_(?!\w)")
# How the repr of a value starts: a bracket, a quote, a sign or a digit, a constant, a
# constructor-like ``Name(`` (dataclasses, tensors) or ``<`` (objects without a repr of their own).
REPR = re.compile(r"""[\[({'"<+\-.\d]|(?:True|False|None|nan|inf)\b|[A-Za-z_][\w.]*\(""")


@dataclass
class Prose:
    text: str  # Markdown
    attachments: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {mime: base64}


@dataclass
class Run:
    """One code cell: the code, and what the page shows it print."""

    source: str
    want: str = ""
    shown_as: str = "stream"  # or "execute_result", or "error" for an expected exception
    flags: int | None = None  # the doctest option flags the output is compared with; None: not a doctest
    exception: str = ""  # for an expected exception, doctest's "Name: message" line ...
    raising: str = ""  # ... and the example, at the end of the source, that raises it

    def exception_name(self) -> str:
        """As Jupyter names it: the class alone (doctest writes a non-builtin's module too)."""
        return self.exception.partition(":")[0].strip().rpartition(".")[2]


def is_test(node: nodes.Node) -> bool:
    return isinstance(node, nodes.Element) and "testnodetype" in node


def as_shown(source: str) -> str:
    """Code without its ``# doctest:`` comments, as the page shows it."""
    return re.sub(r"[ \t]+$", "", doctestopt_re.sub("", source), flags=re.MULTILINE)


def shows_a_value(source: str, want: str) -> bool:
    """Whether doctest's output of this example is the repr of an expression's value, which
    Jupyter shows as the cell's result, rather than text it printed.

    A call can do either: ``print(...)`` prints, and any other call is read from its output,
    which for a value starts as a repr does (a bracket, a quote, a number, ``Name(``, ``<``).
    """
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    if len(body) != 1 or not isinstance(body[0], ast.Expr):
        return False
    value = body[0].value
    if not isinstance(value, ast.Call):
        return True
    if isinstance(value.func, ast.Name) and value.func.id == "print":
        return False
    return REPR.match(want) is not None


def nest(chunks: list, first: str, rest: str) -> list:
    """Indent the Markdown that stays in the same cell as a list marker or a quote's ``>``.

    What follows a code cell starts a new Markdown cell, where an indent would make it code.
    """
    cut = next((i for i, chunk in enumerate(chunks) if isinstance(chunk, Run)), len(chunks))
    head = [chunk for chunk in chunks[:cut] if chunk.text]
    if not head:
        return [Prose(first.rstrip()), *chunks[cut:]] if first.strip() else chunks[cut:]
    lines = "\n\n".join(chunk.text for chunk in head).split("\n")
    text = "\n".join([first + lines[0], *((rest + line).rstrip() for line in lines[1:])])
    attachments = {name: data for chunk in head for name, data in chunk.attachments.items()}
    return [Prose(text, attachments), *chunks[cut:]]


class PageReader:
    """Reads a resolved doctree into Prose and Run chunks, in page order."""

    def __init__(self, app, docname: str, doctree: nodes.document):
        self.app, self.docname = app, docname
        base = app.config.html_baseurl
        self.page_url = urljoin(base.rstrip("/") + "/", app.builder.get_target_uri(docname)) if base else ""
        self.default_flags = app.config.doctest_default_flags
        self.last_run: Run | None = None  # the testcode that a testoutput belongs to
        self.figure_urls: dict[str, str] = {}  # a notebook's attachment -> the image on the site
        self.chunks = self.blocks(doctree, depth=0)

    # -- Blocks -----------------------------------------------------------------------------

    def blocks(self, node: nodes.Node, depth: int) -> list:
        if is_test(node):
            return self.tests(node)
        if isinstance(node, nodes.section):
            return [chunk for child in node for chunk in self.blocks(child, depth + 1)]
        if isinstance(node, nodes.title):
            return [Prose("#" * max(depth, 1) + " " + self.inline(node))]
        if isinstance(node, nodes.bullet_list | nodes.enumerated_list):
            return self.list_items(node)
        if isinstance(node, nodes.definition_list_item):
            term = " ".join(self.inline(t) for t in node.findall(nodes.term))
            body = [
                c for d in node.findall(nodes.definition) for child in d for c in self.blocks(child, depth)
            ]
            return nest([Prose(f"**{term}**:"), *body], "- ", "  ")
        if isinstance(node, nodes.literal_block):
            return [Prose(self.fenced(node.astext(), node.get("language", "")))]
        if isinstance(node, nodes.math_block):
            return [Prose(self.display_math(node))]
        if isinstance(node, nodes.image):
            return self.image(node)
        if isinstance(node, nodes.caption):
            return [Prose(f"*{self.inline(node)}*")]
        if isinstance(node, nodes.rubric) or node.tagname == "dropdown_title":  # sphinx-design's
            return [Prose(f"**{self.inline(node)}**")]
        if isinstance(node, nodes.table):
            return [Prose(self.table(node))]
        if isinstance(node, nodes.Admonition | nodes.block_quote):
            return self.quote(node, depth)
        if isinstance(
            node, nodes.Invisible | nodes.raw | addnodes.toctree | addnodes.index | nodes.system_message
        ):
            return []
        if isinstance(node, nodes.TextElement):
            return [Prose(self.inline(node))]
        return [chunk for child in node.children for chunk in self.blocks(child, depth)]

    def list_items(self, node) -> list:
        start = node.get("start", 1)
        chunks = []
        for number, item in enumerate(node.children, start):
            marker = f"{number}. " if isinstance(node, nodes.enumerated_list) else "- "
            body = [chunk for child in item for chunk in self.blocks(child, depth=0)]
            chunks += nest(body, marker, " " * len(marker))
        return chunks

    def quote(self, node, depth: int) -> list:
        body = [
            chunk
            for child in node
            for chunk in self.blocks(child, depth)
            if not isinstance(child, nodes.title)
        ]
        titles = [self.inline(t) for t in node.children if isinstance(t, nodes.title)]
        label = titles[0] if titles else type(node).__name__.replace("_", " ").capitalize()
        if isinstance(node, nodes.block_quote):
            return nest(body, "> ", "> ")
        return nest([Prose(f"**{label}**"), *body], "> ", "> ")

    def fenced(self, text: str, language: str) -> str:
        fence = "`" * max([3, *(len(run) + 1 for run in re.findall(r"`+", text))])
        return f"{fence}{language}\n{text.rstrip()}\n{fence}"

    def display_math(self, node) -> str:
        latex = node.astext().strip()
        if node.get("nowrap"):  # a whole amsmath environment: Jupyter's MathJax reads it as it is
            return latex
        tag = f" \\tag{{{node['number']}}}" if node.get("number") else ""
        return f"$$\n{latex}{tag}\n$$"

    def image(self, node) -> list:
        if "only-dark" in node["classes"]:  # furo's dark-theme variant of a figure
            return []
        # By now the HTML builder has pointed "uri" at its copy in _images/; the source file
        # is the candidate it copied.
        uri, alt = node["uri"], self.escape(node.get("alt", ""))
        path = Path(self.app.srcdir, node.get("candidates", {}).get("*", uri))
        if "://" in uri or not path.is_file():
            return [Prose(f"![{alt}]({uri})")]
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        base = self.app.config.html_baseurl
        self.figure_urls[path.name] = f"{base.rstrip('/')}/_images/{posixpath.basename(uri)}" if base else ""
        return [Prose(f"![{alt}](attachment:{path.name})", {path.name: {mime: data}})]

    def table(self, node) -> str:
        rows = [
            [" ".join(self.inline(child) for child in entry) for entry in row.findall(nodes.entry)]
            for row in node.findall(nodes.row)
        ]
        width = max(len(row) for row in rows)
        rows = [row + [""] * (width - len(row)) for row in rows]
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join([lines[0], "|" + " --- |" * width, *lines[1:]])

    # -- Doctests ---------------------------------------------------------------------------

    def tests(self, node) -> list:
        # The page shows the code without its `# doctest:` comments; Sphinx keeps the code as
        # written, which it runs, in "test" (and, as here, reads it from there).
        source = node["test"] if "test" in node else node.astext()
        kind = node["testnodetype"]
        block_options = node.get("options") or {}
        if kind == "doctest":
            return self.doctest_runs(source, block_options)
        if kind == "testoutput":
            if self.last_run is not None:
                self.last_run.want = source.rstrip("\n") + "\n"
                self.last_run.flags = self.flags(block_options)
            return []
        # testcode is compared with its testoutput; testsetup and testcleanup show nothing.
        self.last_run = Run(source.rstrip("\n"), flags=self.default_flags if kind == "testcode" else None)
        return [self.last_run]

    def flags(self, options: dict[int, bool]) -> int:
        flags = self.default_flags
        for flag, on in options.items():
            flags = flags | flag if on else flags & ~flag
        return flags

    def doctest_runs(self, source: str, block_options: dict[int, bool]) -> list:
        chunks, pending = [], []

        def cut(want="", shown_as="stream", flags=self.default_flags, exception=""):
            if pending:
                code = "".join(as_shown(example.source) for example in pending).rstrip("\n")
                if not flags & doctest.DONT_ACCEPT_BLANKLINE:
                    want = blankline_re.sub("", want)
                raising = as_shown(pending[-1].source).rstrip("\n") if exception else ""
                chunks.append(Run(code, want, shown_as, flags, exception, raising))
                pending.clear()

        for example in doctest.DocTestParser().get_examples(source):
            flags = self.flags({**block_options, **example.options})  # the line's own win, as in Sphinx
            if flags & doctest.SKIP:
                cut()
                chunks.append(
                    Prose("Not run on the site:\n\n" + self.fenced(as_shown(example.source), "python"))
                )
                continue
            pending.append(example)
            if example.exc_msg is not None:
                cut(example.want, "error", flags, example.exc_msg)
            elif example.want:
                shown_as = "execute_result" if shows_a_value(example.source, example.want) else "stream"
                cut(example.want, shown_as, flags)
        cut()
        return chunks

    # -- Inline text ------------------------------------------------------------------------

    def inline(self, node: nodes.Node) -> str:
        if isinstance(node, nodes.Text):
            return self.escape(re.sub(r"\s+", " ", node.astext()))
        if isinstance(node, nodes.literal):
            text = re.sub(r"\s+", " ", node.astext())
            ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
            pad = " " if text.startswith("`") or text.endswith("`") else ""
            return f"{ticks}{pad}{text}{pad}{ticks}"
        if isinstance(node, nodes.math):
            return f"${node.astext()}$"
        if isinstance(node, nodes.Invisible | nodes.raw | addnodes.index | nodes.image):
            return ""
        text = "".join(self.inline(child) for child in node.children)
        if isinstance(node, nodes.strong):
            return f"**{text}**"
        if isinstance(node, nodes.emphasis):
            return f"*{text}*"
        if isinstance(node, nodes.footnote_reference):
            return f"[{text}]"
        if isinstance(node, nodes.reference) and not self.is_citation(node):
            return self.link(node, text)
        return text

    def link(self, node: nodes.reference, text: str) -> str:
        if node.get("refuri"):
            url = urljoin(self.page_url, node["refuri"]) if self.page_url else node["refuri"]
        elif node.get("refid"):
            url = f"{self.page_url}#{node['refid']}"
        else:
            return text
        return f"[{text}]({url})"

    @staticmethod
    def is_citation(node: nodes.reference) -> bool:
        """A citation reads as its words ("Hu et al., 2021"), not as a link to the bibliography."""
        return isinstance(node.parent, nodes.inline) and "bibtex-citation" in node.parent["classes"]

    @staticmethod
    def escape(text: str) -> str:
        return MARKUP.sub(lambda match: "\\" + match[0], text)


# -- The notebook and the script --------------------------------------------------------------


def install_line(version: str) -> str:
    return f'pip install "{DISTRIBUTION}[examples]=={version}"'


def introduction(reader: PageReader, what: str, version: str) -> str:
    title = reader.app.env.titles[reader.docname].astext()
    page = f"[{title}]({reader.page_url})" if reader.page_url else title
    made = f"This {what} is made from the page {page} of the {reader.app.config.project}, version {version}."
    # The PyTorch the site was built and tested with; without a GPU, its CPU build is a small
    # download, where pip's default is the multi-GB CUDA one.
    torch_pin = f"torch=={importlib.metadata.version('torch').split('+')[0]}"
    cpu_first = (
        f"On a machine without a GPU, install the CPU build of PyTorch before the lab: "
        f"`pip install {torch_pin} --index-url https://download.pytorch.org/whl/cpu`."
    )
    if what == "notebook":
        return (
            f"{made} Its first cell installs the guide's examples at that version, the next sets what the "
            "site runs every example with; the rest is the page, each code cell with the output the page "
            f"shows. {cpu_first}"
        )
    return (
        f"{made} {cpu_first} Install the guide's examples at that version first:\n\n"
        f"    {install_line(version)}\n\n"
        "The first cell sets what the site runs every example with; the rest is the page, each code "
        "cell followed by the output the page shows, as a comment."
    )


def code_cell(run: Run, index: int, count: int) -> dict:
    cell = nbformat.v4.new_code_cell(run.source, id=f"cell-{index}", execution_count=count)
    if run.flags is not None:
        cell.metadata["doctest"] = {"optionflags": sorted(FLAG_NAMES[f] for f in FLAG_NAMES if run.flags & f)}
    if run.shown_as == "error":
        message = run.exception.partition(":")[2].strip()
        cell.metadata["tags"] = ["raises-exception"]  # nbclient and Jupyter run on past it
        cell.outputs = [
            nbformat.v4.new_output(
                "error", ename=run.exception_name(), evalue=message, traceback=run.want.splitlines()
            )
        ]
    elif run.shown_as == "execute_result":
        cell.outputs = [
            nbformat.v4.new_output(
                "execute_result", {"text/plain": run.want.rstrip("\n")}, execution_count=count
            )
        ]
    elif run.want:
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=run.want)]
    return cell


def notebook(reader: PageReader, version: str) -> nbformat.NotebookNode:
    chunks = [Run(f"%{install_line(version)}"), Prose(introduction(reader, "notebook", version))]
    if setup := reader.app.config.doctest_global_setup.strip():
        chunks.append(Run(setup))
    chunks += reader.chunks
    if cleanup := reader.app.config.doctest_global_cleanup.strip():
        chunks.append(Run(cleanup))
    cells, count = [], 0
    for chunk in merged(chunks):
        if isinstance(chunk, Run):
            count += 1
            cells.append(code_cell(chunk, len(cells), count))
        else:
            cell = nbformat.v4.new_markdown_cell(chunk.text, id=f"cell-{len(cells)}")
            if chunk.attachments:
                cell.attachments = chunk.attachments
            cells.append(cell)
    book = nbformat.v4.new_notebook(cells=cells)
    book.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    }
    nbformat.validate(book)
    return book


def merged(chunks: list) -> list:
    """Consecutive Markdown as one cell."""
    out = []
    for chunk in chunks:
        if isinstance(chunk, Prose) and not chunk.text:
            continue
        if isinstance(chunk, Prose) and out and isinstance(out[-1], Prose):
            out[-1] = Prose(out[-1].text + "\n\n" + chunk.text, {**out[-1].attachments, **chunk.attachments})
        else:
            out.append(chunk)
    return out


def commented(text: str, prefix: str = "# ") -> str:
    return "\n".join((prefix + line).rstrip() for line in text.split("\n"))


def wrapped(markdown: str, width: int = 96) -> str:
    """Markdown with its long lines of prose wrapped, as comments in a script read best.

    Code, math and tables are left as they are; a list item's or a quote's lines keep its indent.
    """
    lines, verbatim = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith(("```", "$$")):
            verbatim = not verbatim
        if verbatim or len(line) <= width or line.lstrip().startswith(("|", "```", "$$")):
            lines.append(line)
            continue
        head = line[: re.match(r" *(?:> |- |\d+\. )?", line).end()]
        indent = head if head.strip() == ">" else " " * len(head)
        lines += textwrap.wrap(
            line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
        )
    return "\n".join(lines)


def script_cell(run: Run) -> str:
    if run.shown_as == "error":
        # The page shows this line failing, on purpose; catching it lets the script run on.
        name = run.exception_name()
        caught = name if isinstance(getattr(builtins, name, None), type) else "Exception"
        before = run.source.removesuffix(run.raising)
        body = "\n".join("    " + line if line else "" for line in run.raising.split("\n"))
        code = f'{before}try:\n{body}\nexcept {caught} as error:\n    print(f"{{type(error).__name__}}: {{error}}")'
    else:
        code = run.source
    if run.want:
        code += "\n# The page shows:\n" + commented(run.want.rstrip("\n"), "#     ")
    return code


def script(reader: PageReader, version: str) -> str:
    cells = [f"# %% [markdown]\n{commented(wrapped(introduction(reader, 'script', version)))}"]
    if setup := reader.app.config.doctest_global_setup.strip():
        cells.append(f"# %%\n{setup}")
    for chunk in merged(reader.chunks):
        if isinstance(chunk, Run):
            cells.append(f"# %%\n{script_cell(chunk)}")
        else:
            text = chunk.text
            for name in chunk.attachments:  # a script cannot hold a figure: it links to the site's
                text = text.replace(f"(attachment:{name})", f"({reader.figure_urls[name] or name})")
            cells.append(f"# %% [markdown]\n{commented(wrapped(text))}")
    if cleanup := reader.app.config.doctest_global_cleanup.strip():
        cells.append(f"# %%\n{cleanup}")
    return "\n\n".join(cells) + "\n"


# -- Sphinx -----------------------------------------------------------------------------------


def write_downloads(app, pagename, templatename, context, doctree) -> None:
    if app.builder.name not in ("html", "dirhtml") or doctree is None or not any(doctree.findall(is_test)):
        return
    reader = PageReader(app, pagename, doctree)
    version = fieldguide.__version__  # the one place it is written (pyproject.toml reads it too)
    target = Path(app.outdir, FOLDER, pagename)
    target.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{target}.ipynb").write_text(nbformat.writes(notebook(reader, version)) + "\n", encoding="utf-8")
    Path(f"{target}.py").write_text(script(reader, version), encoding="utf-8")
    # Two links under the page's title; relative, so that they work wherever the site is served.
    here = posixpath.dirname(app.builder.get_target_uri(pagename)) or "."
    href = posixpath.relpath(f"{FOLDER}/{pagename}", here)
    links = (
        '<p class="downloads">'
        f'<a class="download" href="{href}.ipynb" download>Download notebook</a> '
        f'<a class="download" href="{href}.py" download>Download Python script</a>'
        "</p>"
    )
    body = context.get("body", "")
    head, closing, rest = body.partition("</h1>")
    context["body"] = head + closing + links + rest if closing else links + body
    app.add_css_file("downloads.css")  # in html-page-context: this page only


def setup(app):
    app.setup_extension("sphinx.ext.doctest")
    app.connect("html-page-context", write_downloads)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

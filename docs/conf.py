"""Sphinx configuration for the LLM Fine-Tuning Field Guide."""

import doctest
import logging
import sys
from pathlib import Path
from urllib.parse import urlparse

DOCS = Path(__file__).parent
sys.path.insert(0, str(DOCS / "_ext"))

from offline_inventories import write_inventories

import fieldguide

# -- Project information -----------------------------------------------------
project = "LLM Fine-Tuning Field Guide"
author = "The Field Guide authors"
copyright = "2026, The Field Guide authors"
# The package version the site is built from, read where it is written once. Every page's
# footer shows it (_templates/page.html), and a page names it with {sub-ref}`release`.
release = fieldguide.__version__
version = ".".join(release.split(".")[:2])

# -- General configuration ---------------------------------------------------
extensions = [
    # Sphinx's own
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.napoleon",
    # External
    "myst_parser",
    "sphinxcontrib.bibtex",
    "sphinx_copybutton",
    "sphinx_design",
    "sphinxext.opengraph",
    "notfound.extension",
    # This site's own (docs/_ext)
    "public_names",
    "generated_figures",
    "local_mathjax",
    "accessible_html",
    "sitemap",
    "numeric_doctest",
    "downloads",
]
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
nitpicky = True
# Each entry says why it cannot be resolved.
nitpick_ignore = [
    # The type variable of the lab's generic Split class has no page of its own.
    ("py:class", "T"),
    ("py:class", "fieldguide.lab.tasks.T"),
]

# -- MyST --------------------------------------------------------------------
# MyST logs its whole configuration at every build; a reader scanning the log for problems
# should not have to read past it.
logging.getLogger("sphinx.myst_parser.sphinx_ext.main").addFilter(
    lambda record: "MdParserConfig(" not in record.getMessage()
)
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- Citations ---------------------------------------------------------------
bibtex_bibfiles = ["refs.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# -- Doctests ----------------------------------------------------------------
# Settings of the process only, and no names: a page imports everything it uses in its own
# blocks, so that a reader can paste them into a fresh interpreter in order, and a missing
# import fails the build rather than being hidden by this setup (the `del` at the end;
# tests/test_site.py checks both). The seed makes repeatable any draw that a page does not
# seed itself. The tiny model is loaded (and, on first use, pretrained and cached) only by the
# pages that ask for it.
doctest_global_setup = """
import torch
torch.manual_seed(0)
# Tiny models drift into denormal floats late in training, which the CPU computes many
# times more slowly; flushing them to zero changes no printed result.
torch.set_flush_denormal(True)
# PEFT 0.21 still reads transformers' old name for gradient checkpointing, which transformers
# 5.23 renamed; the warning is about their code, not the page's.
import warnings
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# PEFT 0.21's prefix tuning hands transformers 5.24 the cache under its old name,
# past_key_values; again their code, not the page's.
warnings.filterwarnings("ignore", message="`past_key_values` is deprecated", category=FutureWarning)
del torch, warnings
"""
# ELLIPSIS lets a page show the start of a long output; a True must never pass for a 1.
# A line marked `# doctest: +NUMBER` compares its decimals to their last printed digit
# (docs/_ext/numeric_doctest.py); it is never a default, so every other number is exact.
doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1

# -- API pages ---------------------------------------------------------------
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}

# -- Cross-references to other projects --------------------------------------
# Every outside object the site names is in a small inventory written at build time from
# docs/_ext/offline_inventories.py, each entry a real address in that project's docs. The
# build never downloads one: it is the same online and offline, and an offline build prints
# no connection errors. (Transformers and PEFT publish no inventory at all.) A name missing
# from them fails the nitpicky build, which says which one to add.
_local = write_inventories(DOCS / "_build" / "inventories")
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", str(_local["python"])),
    "torch": ("https://docs.pytorch.org/docs/stable", str(_local["torch"])),
    "transformers": ("https://huggingface.co/docs/transformers/main/en", str(_local["transformers"])),
    "peft": ("https://huggingface.co/docs/peft/main/en", str(_local["peft"])),
}

# -- HTML output -------------------------------------------------------------
html_theme = "furo"
html_title = "LLM Fine-Tuning Field Guide"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # wrapping code blocks: docs/_static/custom.css
# Furo's page template, extended by one footer line: the version the site was built from.
templates_path = ["_templates"]
html_favicon = "_static/favicon.svg"
# MathJax is served by the site itself (docs/_ext/local_mathjax.py copies it), so equations
# render offline; a path relative to _static/.
mathjax_path = "mathjax/tex-chtml.js"
# Search ranks a page whose own title holds the query above pages with a section about it.
html_search_scorer = str(DOCS / "_ext" / "search_scorer.js")  # Sphinx opens it from the working directory

# -- Hosting -----------------------------------------------------------------
# The one place that names where the source lives and where the site is published.
REPOSITORY = "https://github.com/llm-finetuning-guide/field-guide"
# The site's one address (pyproject.toml's Documentation URL is the same; tests/test_site.py).
SITE = "https://llm-finetuning-guide.github.io/field-guide/"
html_baseurl = SITE
html_theme_options = {
    # An "edit this page" and a "view source" link at the top of every page.
    "source_repository": f"{REPOSITORY}/",
    "source_branch": "main",
    "source_directory": "docs/",
    # The repository, linked from the footer of every page.
    "footer_icons": [
        {
            "name": "GitHub",
            "url": REPOSITORY,
            "html": (
                '<svg stroke="currentColor" fill="currentColor" stroke-width="0" viewBox="0 0 16 16" '
                'aria-hidden="true"><path fill-rule="evenodd" d="M8 0C3.58 0 0 3.58 0 8c0 3.54 2.29 6.53 '
                "5.47 7.59.4.07.55-.17.55-.38 0-.19-.01-.82-.01-1.49-2.01.37-2.53-.49-2.69-.94-.09-.23-.48-.94-.82"
                "-1.13-.28-.15-.68-.52-.01-.53.63-.01 1.08.58 1.23.82.72 1.21 1.87.87 2.33.66.07-.52.28-.87.51-1.07"
                "-1.78-.2-3.64-.89-3.64-3.95 0-.87.31-1.59.82-2.15-.08-.2-.36-1.02.08-2.12 0 0 .67-.21 2.2.82.64-.18"
                " 1.32-.27 2-.27.68 0 1.36.09 2 .27 1.53-1.04 2.2-.82 2.2-.82.44 1.1.16 1.92.08 2.12.51.56.82 1.27.82"
                " 2.15 0 3.07-1.87 3.75-3.65 3.95.29.25.54.73.54 1.48 0 1.07-.01 1.93-.01 2.2 0 .21.15.46.55.38A8.013"
                ' 8.013 0 0016 8c0-4.42-3.58-8-8-8z"></path></svg>'
            ),
            "class": "",
        },
    ],
}
# sitemap.xml (docs/_ext/sitemap.py): every page, at html_baseurl + its path.
# OpenGraph tags for link previews. No generated social-card images: drawing one per page
# slows every build and adds an image per page; the title and description make the preview.
ogp_site_url = html_baseurl
ogp_social_cards = {"enable": False}
# The 404 page is served at any missing address, so its links are absolute, under the
# site's path (/field-guide/ on GitHub Pages, /en/latest/ on Read the Docs).
notfound_urls_prefix = urlparse(html_baseurl).path

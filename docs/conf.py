"""Sphinx configuration for the LLM Fine-Tuning Field Guide."""

import doctest
import sys
from pathlib import Path

DOCS = Path(__file__).parent
sys.path.insert(0, str(DOCS / "_ext"))

from offline_inventories import write_inventories

# -- Project information -----------------------------------------------------
project = "LLM Fine-Tuning Field Guide"
author = "The Field Guide authors"
copyright = "2026, The Field Guide authors"

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
    # This site's own (docs/_ext)
    "public_names",
    "generated_figures",
]
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
nitpicky = True
# Each entry says why it cannot be resolved.
nitpick_ignore = [
    # The type variable of the lab's generic Split class has no page of its own.
    ("py:class", "T"),
    ("py:class", "fieldguide.tasks.T"),
]

# -- MyST --------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- Citations ---------------------------------------------------------------
bibtex_bibfiles = ["refs.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# -- Doctests ----------------------------------------------------------------
# Every page's doctests share these imports. The tiny model is loaded (and, on first use,
# pretrained and cached) only by the pages that ask for it.
doctest_global_setup = """
import torch
torch.manual_seed(0)
"""
# ELLIPSIS lets a page show the start of a long output; a True must never pass for a 1.
doctest_default_flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1

# -- API pages ---------------------------------------------------------------
autodoc_typehints = "description"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}

# -- Cross-references to other projects --------------------------------------
# Python and PyTorch publish Sphinx inventories: they are fetched online, and an offline
# build falls back to a small inventory written at build time from
# docs/_ext/offline_inventories.py, so it neither fails nor hangs. Transformers and PEFT
# publish no inventory (their docs are not built with Sphinx), so theirs is always the local one.
intersphinx_timeout = 5
_local = write_inventories(DOCS / "_build" / "inventories")
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (None, str(_local["python"]))),
    "torch": ("https://docs.pytorch.org/docs/stable", (None, str(_local["torch"]))),
    "transformers": ("https://huggingface.co/docs/transformers/main/en", str(_local["transformers"])),
    "peft": ("https://huggingface.co/docs/peft/main/en", str(_local["peft"])),
}

# -- HTML output -------------------------------------------------------------
html_theme = "furo"
html_title = "LLM Fine-Tuning Field Guide"
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

"""The LLM Fine-Tuning Field Guide's examples.

``fieldguide.lab`` holds the code every page shares; each other subpackage is one part of the
site, with one module per page, named after the page (``whole_model.instruction_tuning`` is
the page ``whole-model/instruction-tuning``).
"""

# The one place the version is written: pyproject.toml, the site and the notebooks read it here.
__version__ = "0.1.0"

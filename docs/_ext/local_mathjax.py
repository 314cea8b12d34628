"""Serve MathJax from the site itself, so that equations render with no network.

Sphinx's mathjax extension loads MathJax from a CDN unless ``mathjax_path`` names a file of
the site's own. This copies MathJax 3's release files from the ``django-static-mathjax``
package on PyPI (MathJax's own ``es5`` build, packaged for Python, so no Node.js is needed)
into ``_static/mathjax/``, where ``mathjax_path = "mathjax/tex-chtml.js"`` finds them.

Only what ``tex-chtml.js`` can load is copied: the combined component itself, the TeX
packages it autoloads (``\\boldsymbol``, ``\\cancel`` ...), its web fonts, and what its menu
loads on a reader's request (accessibility, the English speech rules), not the 24 MB of
other builds and languages.
"""

import shutil
from pathlib import Path

# Paths inside MathJax's es5 folder.
COPIED = [
    "tex-chtml.js",  # TeX in, HTML+CSS out, with the menu and assistive MathML
    "input/tex/extensions",  # TeX packages loaded when a page first uses one of their macros
    "output/chtml",  # the web fonts, found next to the script
    "a11y",  # the menu's accessibility options (explorer, speech)
    "ui",
    "sre/mathmaps/base.json",
    "sre/mathmaps/en.json",
]


def mathjax_es5() -> Path:
    import mathjax  # django-static-mathjax

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


def copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, target = mathjax_es5(), Path(app.outdir) / "_static" / "mathjax"
    for name in COPIED:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, dirs_exist_ok=True)
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)


def setup(app):
    mathjax_es5()  # fail at once, with the package's name, if it is not installed
    app.connect("build-finished", copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

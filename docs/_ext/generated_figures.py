"""Figures drawn at build time from the runs a page's own code performs.

In a page::

    ```{generated-figure} fieldguide.start_here.tutorial:loss_figure
    :alt: Training loss falling over 60 steps.

    The caption.
    ```

names a function that takes a matplotlib ``Axes`` and draws on it. The function runs the
page's training (the same function, with the same seed, that the page's doctests call) and
plots what it returned. It is drawn twice, once styled for furo's light theme and once for
its dark theme, as SVG; furo shows the one that matches the reader's theme.

The runs themselves are kept on disk by ``fieldguide.lab.cache.cached``, so the doctests
that print their numbers read the same runs instead of training again; the SVGs are cached
too (next to the build's doctrees), under the same hash of the examples' code: unchanged
code redraws nothing.
"""

import hashlib
import importlib
import os
from pathlib import Path
from typing import ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

# Text, grid and curve colours that read well on furo's light and dark backgrounds. The
# curves are GitHub's Primer colours for each theme, each at a contrast of 5:1 or more with the
# page (matplotlib's default orange is 2.5:1 on white, its default blue 3.8:1 on furo's dark).
THEMES = {
    "light": {"text": "#1f2328", "grid": "#d0d7de", "curves": ["#0969da", "#bc4c00", "#1a7f37", "#8250df"]},
    "dark": {"text": "#e6edf3", "grid": "#3d444d", "curves": ["#4493f8", "#f0883e", "#3fb950", "#ab7df8"]},
}


def _draw(function, theme: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = THEMES[theme]
    style = {
        "text.color": colours["text"],
        "axes.labelcolor": colours["text"],
        "axes.edgecolor": colours["text"],
        "xtick.color": colours["text"],
        "ytick.color": colours["text"],
        "grid.color": colours["grid"],
        "axes.prop_cycle": plt.cycler(color=colours["curves"]),
        "axes.grid": True,
        "svg.fonttype": "none",  # keep text as text: smaller files, selectable, searchable
        "svg.hashsalt": "fieldguide",  # the same figure gives the same file
    }
    with plt.rc_context(style):
        figure, axes = plt.subplots(figsize=(6.4, 3.6), layout="constrained")
        figure.patch.set_alpha(0)  # transparent: the page's background shows through
        axes.set_facecolor("none")
        function(axes)
        legend = axes.get_legend()
        if legend is not None:
            legend.get_frame().set_alpha(0)
        figure.savefig(path, format="svg", metadata={"Date": None})
        plt.close(figure)


class GeneratedFigure(SphinxDirective):
    required_arguments = 1  # module:function
    has_content = True  # the caption
    option_spec: ClassVar = {"alt": directives.unchanged_required}

    def run(self):
        # Imported here, not at the top: importing the lab means importing PyTorch and
        # transformers (seconds), which a rebuild that reads no page with a figure never needs.
        from fieldguide.lab.cache import code_hash

        module_name, _, function_name = self.arguments[0].partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        out_dir = Path(self.env.app.doctreedir) / "generated-figures"
        out_dir.mkdir(parents=True, exist_ok=True)
        # This file's own source is in the key too: a change of style (colours, sizes) redraws.
        drawing = f"{self.arguments[0]}{code_hash()}".encode() + Path(__file__).read_bytes()
        key = hashlib.sha256(drawing).hexdigest()[:12]
        stem = f"{function_name}-{key}"
        figure = nodes.figure()
        for theme in THEMES:
            path = out_dir / f"{stem}-{theme}.svg"
            if not path.exists():
                _draw(function, theme, path)
            # A URI starting with "/" is read relative to the source folder (docs/).
            uri = "/" + os.path.relpath(path, self.env.srcdir)
            figure += nodes.image(uri=uri, alt=self.options["alt"], classes=[f"only-{theme}"])
        if self.content:
            caption_nodes = self.parse_content_to_nodes()
            paragraph = caption_nodes[0]
            figure += nodes.caption(paragraph.rawsource, "", *paragraph.children)
        # The figure depends on the technique's module and on the lab under it: a change to any
        # file of the package reads this page again (and the run, keyed by the code, reruns).
        package = Path(importlib.import_module("fieldguide").__file__).parent
        for source in sorted(package.rglob("*.py")):
            self.env.note_dependency(str(source))
        self.env.note_dependency(__file__)  # and so does a change to how figures are drawn
        return [figure]


def setup(app):
    app.add_directive("generated-figure", GeneratedFigure)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

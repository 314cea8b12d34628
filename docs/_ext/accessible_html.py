"""Small fixes to the HTML that Sphinx and docutils write, for readers of assistive technology.

Each is a violation that axe-core finds (tests/browser/test_accessibility.py), fixed where
the page is written rather than by turning the rule off:

- A toctree's caption ("Foundations", "Reference" ...) is ``<p class="caption"
  role="heading">``, and a heading role must say its level (aria-required-attr, critical):
  the captions head lists of pages under the page title, so they are level 2.
- A bibliography is a ``role="list"`` of ``role="doc-biblioentry"`` entries; that role is
  deprecated and is not a list item, so the list has no items (aria-required-children,
  critical). The entries become plain list items.
- A code block too wide for the page scrolls sideways, which a reader without a mouse can
  only do if the block can take the keyboard's focus (scrollable-region-focusable, serious).
"""

FIXES = [
    ('<p class="caption" role="heading">', '<p class="caption" role="heading" aria-level="2">'),
    ('role="doc-biblioentry"', 'role="listitem"'),
    ('<div class="highlight"><pre>', '<div class="highlight"><pre tabindex="0">'),
]


def fix_html(app, pagename, templatename, context, doctree):
    # "body" is the page's own content; "furo_navigation_tree" is furo's sidebar.
    for key in ("body", "furo_navigation_tree"):
        if isinstance(context.get(key), str):
            for old, new in FIXES:
                context[key] = context[key].replace(old, new)


def setup(app):
    app.connect("html-page-context", fix_html, priority=900)  # after furo's handler (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""sitemap.xml listing every page of the site, written at the end of each HTML build.

sphinx-sitemap lists only the pages a build writes, so an incremental build, after one page
was edited, published a sitemap of that one page. This lists every document Sphinx knows,
at its published address: ``html_baseurl`` followed by the page's path.
"""

from pathlib import Path
from xml.etree import ElementTree

NAMESPACE = "http://www.sitemaps.org/schemas/sitemap/0.9"


def write_sitemap(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    base = app.config.html_baseurl.rstrip("/") + "/"
    urlset = ElementTree.Element("urlset", xmlns=NAMESPACE)
    for document in sorted(app.env.found_docs):
        url = ElementTree.SubElement(urlset, "url")
        ElementTree.SubElement(url, "loc").text = base + app.builder.get_target_uri(document)
    ElementTree.indent(urlset)
    tree = ElementTree.ElementTree(urlset)
    tree.write(Path(app.outdir) / "sitemap.xml", xml_declaration=True, encoding="utf-8")


def setup(app):
    app.connect("build-finished", write_sitemap)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

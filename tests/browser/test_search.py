"""The site's search finds each page by the main word of its title, and lists it first.

Which pages: every page written from a source except the home page, whose title is the site's
name. So a page added later is covered the day it is built, with no edit here.

Which word: the longest word of the page's title that is not a stopword and that no other
page's title shares (compared as the search compares them, stemmed); when every word is
shared, the whole title. "Distillation" is searched as "distillation", "Continued
pretraining" as "pretraining", and "What are LLMs?" as "LLMs" until another title says LLMs.
"""

from urllib.parse import quote, urljoin

from sphinx.search.en import SearchEnglish

ENGLISH = SearchEnglish({})  # the stopwords, splitting and stemming of Sphinx's own index


def main_term(title: str, other_titles: list[str]) -> str:
    others = {ENGLISH.stem(word) for other in other_titles for word in ENGLISH.split(other)}
    words = [word for word in ENGLISH.split(title) if word.lower() not in ENGLISH.stopwords and len(word) > 2]
    unique = [word for word in words if ENGLISH.stem(word) not in others]
    return max(unique, key=len) if unique else title


def test_main_term_rule():
    titles = ["Distillation", "What are LLMs?", "Common LLMs", "Continued pretraining", "The lab"]
    assert main_term("Distillation", titles[1:]) == "Distillation"
    assert main_term("What are LLMs?", ["Distillation", "Common LLMs"]) == "What are LLMs?"
    assert main_term("What are LLMs?", ["Distillation"]) == "LLMs"
    assert main_term("Continued pretraining", ["Pretraining data", "The lab"]) == "Continued"


def first_result(page, site, load, query: str) -> str | None:
    """The page the search lists first for a query, or None when it lists nothing."""
    load(page, site.url(f"search.html?q={quote(query)}"))
    page.locator("#search-results .search-summary").wait_for()
    links = page.locator("#search-results ul.search > li a")
    if links.count() == 0:
        return None
    href = links.first.get_attribute("href")
    target = site.local_path(urljoin(page.url, href).split("?")[0].split("#")[0])
    return target


def test_searching_each_pages_main_term_lists_that_page_first(browser, site, load):
    pages = [page for page in site.content_pages if page.path != "index.html"]
    assert pages, "the site has no pages besides the home page"
    titles = {page.path: page.title for page in site.pages.values() if page.title}
    context = browser.new_context()
    tab = context.new_page()
    wrong = {}
    for page in pages:
        term = main_term(page.title, [title for path, title in titles.items() if path != page.path])
        found = first_result(tab, site, load, term)
        if found != page.path:
            wrong[page.path] = f"searching {term!r} lists {found} first"
    context.close()
    assert wrong == {}

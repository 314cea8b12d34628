/*
 * The site's search ranking (conf.py's html_search_scorer; Sphinx puts it in language_data.js).
 *
 * Sphinx scores a word found in any heading alike, so a search for "distillation" ranks the
 * page called "Distillation" level with every page that has a section about it, and breaks
 * the tie alphabetically; a glossary term scores 100. Here a page whose own title holds every
 * word of the query comes first, and among those the page whose title is closest to the
 * query. Everything else keeps Sphinx's default scores, copied below.
 */
var Scorer = {
  score: (result) => {
    const [docname, title, anchor, descr, score] = result;
    if (anchor !== "" || !title) return score; // a section or an object, not a whole page
    const query = new URLSearchParams(window.location.search).get("q") || "";
    const stem = (word) => (typeof Stemmer === "undefined" ? word : new Stemmer().stemWord(word));
    const words = (text) => splitQuery(text.toLowerCase()).filter((w) => w.length > 0).map(stem);
    const queryWords = new Set(words(query));
    const titleWords = new Set(words(title));
    const meaningful = [...queryWords].filter((w) => !stopwords.has(w));
    if (meaningful.length === 0 || !meaningful.every((w) => titleWords.has(w))) return score;
    const shared = [...queryWords].filter((w) => titleWords.has(w)).length;
    const closeness = shared / new Set([...queryWords, ...titleWords]).size; // 1: the same words
    return score + 100 + Math.round(10 * closeness); // above glossary terms too (at most 100)
  },

  // Sphinx's defaults (sphinx/themes/basic/static/searchtools.js).
  objNameMatch: 11,
  objPartialMatch: 6,
  objPrio: { 0: 15, 1: 5, 2: -5 },
  objPrioDefault: 0,
  title: 15,
  partialTitle: 7,
  term: 5,
  partialTerm: 2,
};

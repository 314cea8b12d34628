"""axe-core on every page, in the light and the dark theme: no serious or critical violation.

The rules are axe's WCAG 2.0 and 2.1 A and AA rules, all of them in the light theme and the
colour rules in the dark one. The check runs inside the one visit each page gets (the
``visits`` fixture in conftest.py); axe-core's script comes with the axe-playwright-python
package.
"""

import json


def test_no_serious_accessibility_violation_on_any_page_in_either_theme(visits):
    found = {
        f"{path} ({theme})": problems
        for path, visit in visits.items()
        for theme, problems in visit.accessibility.items()
        if problems
    }
    assert found == {}, json.dumps(found, indent=1)


def test_every_page_was_checked_in_both_themes(visits):
    assert {path: sorted(visit.accessibility) for path, visit in visits.items()} == {
        path: ["dark", "light"] for path in visits
    }

"""The README is the front door: its links and the docs/ pages' links lead
somewhere, every docs/ page is reachable from it, and it names the two commands
and the man pages."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[2]
README = TOP / "README.md"
DOCS = sorted((TOP / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAN_PAGES = ["workqd.8", "workqd.yaml.5", "workqctl.1", "workq-submit.1"]

# [text](target) outside code; the target ends at the first space or ")".
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def prose(page: Path) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped,
    spaces to hyphens."""
    found = set()
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            text = CODE_SPAN.sub(lambda s: s.group(0).strip("`"), m.group(1)).strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return found


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page)) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_the_front_door_has_pages_to_check():
    assert len(DOCS) >= 5, DOCS
    assert relative_links(README), "README.md links nowhere"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(TOP).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{target}: no heading #{fragment} in {dest.relative_to(TOP)}")
    assert not broken, f"{page.relative_to(TOP)}: " + "; ".join(broken)


def test_readme_links_every_docs_page_and_man_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in relative_links(README)}
    missing = [p.relative_to(TOP).as_posix() for p in DOCS if p.resolve() not in linked]
    missing += [m for m in MAN_PAGES if (TOP / "packaging/man" / m).resolve() not in linked]
    assert not missing, f"README.md does not link: {missing}"


def test_readme_names_the_two_commands_and_makefile_has_them():
    text = README.read_text(encoding="utf-8")
    makefile = (TOP / "Makefile").read_text(encoding="utf-8")
    for command in ("run", "test"):
        assert f"make {command}" in text
        assert re.search(rf"^{command}:", makefile, re.M), f"Makefile has no {command} target"


def signals_the_master_acts_on() -> set[str]:
    source = (TOP / "workqd" / "master.py").read_text(encoding="utf-8")
    body = re.search(r"def handle_signal\(.*?(?=\n    def )", source, re.S).group(0)
    # SIGCHLD is reaped elsewhere; SIGKILL is what the master sends, not receives.
    return set(re.findall(r"signal\.SIG([A-Z]+)", body)) - {"CHLD", "KILL"}


def test_readme_signal_table_names_every_signal_the_master_acts_on():
    acted_on = signals_the_master_acts_on()
    assert {"TERM", "INT", "HUP"} <= acted_on, acted_on
    text = README.read_text(encoding="utf-8")
    table = text[text.index("## Signals"):].split("\n\n")[2]
    missing = [sig for sig in sorted(acted_on) if f"`{sig}`" not in table]
    assert not missing, f"README's signal table leaves out {missing}"


def test_anchor_rule_matches_github():
    page = TOP / "docs" / "operations.md"
    assert "queues-on-the-broker" in anchors(page)
    assert "run-on-a-cluster" in anchors(page)

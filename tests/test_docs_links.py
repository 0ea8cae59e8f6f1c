"""The README and the pages under docs/ link to each other and to figures by relative paths; a moved or renamed
file must not leave a dead link (the README is the course's front door)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "data").glob("*/README.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")   # [text](target) and ![alt](target)


def relative_links(text: str) -> list[str]:
    """The relative targets of the markdown links and images in `text`, anchors stripped (outside code blocks)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue                                     # http:, mailto:, ... and same-page anchors
        out.append(target.split("#", 1)[0])
    return out


def test_the_link_finder_sees_links_and_images_but_not_urls_or_code():
    text = "[a](docs/x.md) ![b](figures/y.png) [c](https://e.org) [d](#top)\n```\n[e](nope.md)\n```\n[f](z.md#s)"
    assert relative_links(text) == ["docs/x.md", "figures/y.png", "z.md"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    dead = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not dead, f"{page.relative_to(ROOT)} links to missing files: {dead}"


def test_the_readme_is_a_front_door():
    """At most about 200 lines; the long material lives in docs/ and the README links every page there."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{page.name})" in readme, f"the README does not link docs/{page.name}"

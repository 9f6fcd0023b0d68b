"""The README is a short front door, and every link in it and in docs/*.md leads somewhere."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]

README_MAX_BYTES = 15_000

_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
# [text](target) and ![alt](target); the target may be followed by a "title"
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _prose(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def links(page: Path) -> list[str]:
    """The link and image targets of a Markdown page, outside code and comments."""
    text = _COMMENT.sub("", "\n".join(_prose(page.read_text())))
    text = _CODE_SPAN.sub("", text)
    return _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every heading's anchor, with -1, -2, ... for repeated headings as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for line in _prose(_COMMENT.sub("", page.read_text())):
        match = _HEADING.match(line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def relative_links() -> list[tuple[Path, str]]:
    return [
        (page, target)
        for page in PAGES
        for target in dict.fromkeys(links(page))
        if target and not _SCHEME.match(target)
    ]


def test_readme_is_a_short_front_door():
    size = len(README.read_bytes())
    assert size < README_MAX_BYTES, f"README.md has {size} bytes; move reference to docs/"
    first_lines = "\n".join(README.read_text().splitlines()[:10])
    assert "make run" in first_lines and "make test" in first_lines


@pytest.mark.parametrize(
    ("page", "target"),
    relative_links(),
    ids=[f"{page.relative_to(ROOT)}->{target}" for page, target in relative_links()],
)
def test_relative_link_resolves(page: Path, target: str):
    path, _, anchor = target.partition("#")
    linked = (page.parent / path).resolve() if path else page
    where = f"{page.relative_to(ROOT)} links {target}"
    assert linked.exists(), f"{where}, which does not exist"
    if anchor:
        assert linked.suffix == ".md", f"{where}: an anchor into a file that is not Markdown"
        assert anchor in anchors(linked), f"{where}: no such heading in {linked.name}"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README)}
    unlinked = [page.name for page in DOCS.glob("*.md") if page.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_link_checker_sees_links_and_headings(tmp_path):
    """The helpers find what they must, and skip code, so that the tests above mean something."""
    page = tmp_path / "page.md"
    page.write_text(
        "# Use with an openWB primary\n\n## `status`\n\n## Status page\n\n## Status page\n\n"
        'See [a](other.md#x) and ![b](pic.png "title"), not `[c](code.md)`.\n\n'
        "```sh\n# not a heading [d](fenced.md)\n```\n\n<!-- [e](comment.md) -->\n"
        "[f]: ref.md\n<http://example.org/>\n"
    )
    assert links(page) == ["other.md#x", "pic.png", "ref.md"]
    assert anchors(page) == {"use-with-an-openwb-primary", "status", "status-page", "status-page-1"}
    assert slug("Migrating from dehneevse-mqtt-bridge") == "migrating-from-dehneevse-mqtt-bridge"
    assert slug("Target layout (being built)") == "target-layout-being-built"

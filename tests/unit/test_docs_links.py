"""The README and docs/ stay true to the tree: every relative link points to a file that exists
and every ``#anchor`` to a heading of it (GitHub's slugs); every file path and ``tracer.x.y``
name in their prose exists."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (links and headings in code are not links)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for line in prose_lines(page.read_text()) if (m := HEADING.match(line))}


def links(page: Path) -> list[str]:
    return [m.group(1) for line in prose_lines(page.read_text()) for m in LINK.finditer(line)]


def test_the_pages_exist_and_have_links():
    assert (ROOT / "docs" / "README.md").is_file()
    assert len(PAGES) >= 5
    assert sum(len(links(p)) for p in PAGES) >= 20  # the scanner finds links at all


def test_slug_matches_githubs_anchors():
    assert slug("Measuring it: `tracer.bench`") == "measuring-it-tracerbench"
    assert slug("Dtypes, step by step") == "dtypes-step-by-step"
    assert slug("ESM-2 3B on a GPU") == "esm-2-3b-on-a-gpu"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not checked here
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


CODE_PATH = re.compile(r"`((?:tracer|tests|examples|notebooks|\.ci)/[\w./-]+)`")
CODE_MODULE = re.compile(r"`(tracer(?:\.\w+)+)`")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_and_modules_exist(page):
    """``tracer/...`` or ``tests/...`` paths and ``tracer.x.y`` names the prose mentions exist
    (they go stale when modules move)."""
    import importlib

    text = "\n".join(prose_lines(page.read_text()))
    missing = [p for p in CODE_PATH.findall(text) if not (ROOT / p).exists()]
    for dotted in CODE_MODULE.findall(text):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
                break
            except ImportError:
                continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        if obj is None:
            missing.append(dotted)
    assert not missing, f"{page.relative_to(ROOT)} names what does not exist: {missing}"


def listed_layout() -> dict[str, set[str]]:
    """The modules docs/development.md lists per package ("" = tracer/ itself)."""
    text = (ROOT / "docs" / "development.md").read_text()
    block = text[text.index("```\ntracer/\n") + len("```\ntracer/\n"):]
    listed: dict[str, set[str]] = {"": set()}
    package = ""
    for line in block.splitlines():
        if not line.startswith("  "):  # the next top-level folder ends tracer/
            break
        sub = re.match(r"^  (\w+)/\s+(.*)$", line)
        if sub:
            package = sub.group(1)
            listed[package] = set(re.findall(r"\b\w+\.py\b", sub.group(2)))
        elif re.match(r"^  \w+\.py", line):
            package = ""
            listed[""] |= set(re.findall(r"\b\w+\.py\b", line))
        elif re.fullmatch(r"\s+(\w+\.py\s*)+", line):  # a package's list continued on the next line
            listed[package] |= set(re.findall(r"\b\w+\.py\b", line))
    return listed


def test_layout_in_development_md_matches_the_package():
    package = ROOT / "tracer"
    actual = {"": {p.name for p in package.glob("*.py")} - {"__init__.py", "__main__.py"}}
    for sub in package.iterdir():
        if (sub / "__init__.py").is_file():
            actual[sub.name] = {p.name for p in sub.glob("*.py")} - {"__init__.py"}
    assert listed_layout() == actual

"""Check the internal links of the built site: ``python docs/check_links.py docs/_build/html``.

Every relative ``href`` and ``src`` of every page must name a file of the build, and a
``#fragment`` an ``id`` in that file. Sphinx (with warnings as errors) already refuses a
cross-reference it cannot resolve; this catches what it does not see: links written as raw paths,
anchors in Markdown links, images, and the theme's own links. External links are not fetched.
Exit status 1 with one line per broken link.
"""
from __future__ import annotations

import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name in ("id", "name"):
                self.ids.add(value)
            elif (name == "href" and tag in ("a", "link")) or (name == "src" and tag in ("img", "script")):
                self.links.append(value)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(errors="replace"))
    return page


def broken_links(root: Path) -> list[str]:
    """``page: link (why)`` for each internal link of the site under ``root`` that does not resolve."""
    root = root.resolve()
    pages = {p: _parse(p) for p in root.rglob("*.html")}
    out = []
    for path, page in sorted(pages.items()):
        for link in page.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith(("mailto:", "javascript:", "data:")):
                continue
            target = path if not parts.path else (path.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            where = f"{path.relative_to(root)}: {link}"
            if not target.exists():
                out.append(f"{where} (no file {target.relative_to(root) if target.is_relative_to(root) else target})")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    out.append(f"{where} (no id {parts.fragment!r} in {target.relative_to(root)})")
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0] if args else "docs/_build/html")
    if not (root / "index.html").exists():
        print(f"check_links: no built site at {root} (run make docs)", file=sys.stderr)
        return 2
    bad = broken_links(root)
    for line in bad:
        print(f"broken link: {line}")
    print(f"check_links: {len(bad)} broken internal link(s) in {sum(1 for _ in root.rglob('*.html'))} pages")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The repository stands alone: every `.md` document a file of the repository cites exists in the
repository, and every docs/ page is reachable from docs/README.md.

A citation is any path-like token ending in `.md` (e.g. docs/methods/null-text.md, README.md,
../README.md) in a tracked text file. A token with a slash is resolved from the repository root
and, for Markdown links, from the citing file's folder; a bare name from the root or the citing
file's folder. The oracle's data folder keeps its own README beside the data it describes. Names of
Markdown files the programs write are outputs, not citations: `invedit eval report`'s report.md
and the benchmarks' result tables (benchmarks/common.py writes `<stem>.md`: kernel-*.md, unet-*.md).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".yml", ".yaml", ".json", ""}
CITATION = re.compile(r"(?<![\w/.-])((?:\.\./|\./)?[\w./-]*[\w-]\.md)\b")
GENERATED = re.compile(r"(?:^|/)(?:report|stem|kernel-[\w.-]+|unet-[\w.-]+)\.md$")


def tracked_text_files() -> list[Path]:
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, text=True, check=True).stdout.split()
    out = []
    for name in listed:
        path = ROOT / name
        if path.suffix in TEXT_SUFFIXES and path.is_file() and "tests/data/" not in name and path.stat().st_size < 2_000_000:
            out.append(path)
    return out


def resolves(token: str, citing: Path) -> bool:
    candidates = [ROOT / token, citing.parent / token]
    return any(c.is_file() for c in candidates)


def test_every_cited_markdown_document_exists_in_the_repository():
    missing = []
    for path in tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for m in CITATION.finditer(text):
            token = m.group(1)
            if not GENERATED.search(token) and not resolves(token, path):
                line = text.count("\n", 0, m.start()) + 1
                missing.append(f"{path.relative_to(ROOT)}:{line} cites {token}")
    assert missing == [], "\n".join(missing)


def test_every_docs_page_is_linked_from_the_docs_index():
    index = ROOT / "docs" / "README.md"
    linked = set()
    for page in [index, *sorted((ROOT / "docs").rglob("README.md"))]:
        for m in re.finditer(r"\]\(([^)#]+\.md)", page.read_text()):
            linked.add((page.parent / m.group(1)).resolve())
    pages = {p.resolve() for p in (ROOT / "docs").rglob("*.md")} - {index.resolve()}
    assert sorted(str(p.relative_to(ROOT)) for p in pages - linked) == []

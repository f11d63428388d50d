"""The docs hold together: links resolve, cited repo paths exist, the README stays short, and no tracked file names
a folder of a particular machine. Read from the files alone (no imports of lora_sweep), in milliseconds."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "experiments" / "README.md",
               *(ROOT / "docs").glob("*.md")])
README_MAX_LINES = 150
# Absolute paths of this machine's work folders, spelt so that this file does not contain them.
MACHINE_FOLDERS = ("/" + "work/", "/" + "home/")

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
REFERENCE_CITE = re.compile(r"docs/kohya-reference\.md (§\d+(?:(?:,| and) §\d+)*)")


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def github_anchor(heading: str) -> str:
    """GitHub's id for a heading: its text without markup, lower-cased, punctuation dropped, spaces -> hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """The heading anchors of a Markdown file, with GitHub's -1, -2 suffixes for repeated headings."""
    found: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(path):
        match = HEADING.match(line)
        if match:
            slug = github_anchor(match.group(2))
            result.add(slug if slug not in found else f"{slug}-{found[slug]}")
            found[slug] = found.get(slug, 0) + 1
    return frozenset(result)


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link and image outside code."""
    return [(number, match.group(1)) for number, line in prose_lines(path)
            for match in LINK.finditer(CODE_SPAN.sub("", line))]


@functools.lru_cache(maxsize=1)
def tracked_files() -> tuple[str, ...]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
    return tuple(name for name in out.stdout.decode().split("\0") if name)


@functools.lru_cache(maxsize=1)
def top_level_names() -> frozenset[str]:
    return frozenset(name.split("/")[0] for name in tracked_files())


def cited_paths(path: Path) -> list[tuple[int, str]]:
    """(line number, path) of every code span that names a path in the repository: its first part is a top-level
    file or folder of the repo (`conf/noise/multires.yaml`, `sweep.py`); `<name>` placeholders and `*` are globs."""
    found = []
    for number, line in prose_lines(path):
        for match in CODE_SPAN.finditer(line):
            text = match.group(2).strip()
            if text and not re.search(r"\s", text) and text.split("/")[0] in top_level_names():
                found.append((number, text))
    return found


def exists(cited: str) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", cited).rstrip("/")
    if any(c in pattern for c in "*?["):
        return any(ROOT.glob(pattern))
    return (ROOT / pattern).exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    broken = []
    for number, target in links(doc):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not a file of the repo
            continue
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists() or ROOT not in (linked, *linked.parents):
            broken.append(f"{doc.relative_to(ROOT)}:{number}: {target}: no such file in the repository")
        elif anchor and linked.suffix != ".md":
            broken.append(f"{doc.relative_to(ROOT)}:{number}: {target}: an anchor into a file that is not Markdown")
        elif anchor and anchor not in anchors(linked):
            broken.append(f"{doc.relative_to(ROOT)}:{number}: {target}: no heading with that anchor "
                          f"(headings give: {', '.join(sorted(anchors(linked)))})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_cited_repo_path_exists(doc):
    missing = [f"{doc.relative_to(ROOT)}:{number}: `{cited}`" for number, cited in cited_paths(doc)
               if not exists(cited)]
    assert not missing, "paths cited in backticks that the repository lacks:\n" + "\n".join(missing)


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; depth goes in docs/"


def test_code_cites_sections_the_kohya_reference_has():
    sections = {f"§{m}" for m in re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "kohya-reference.md").read_text(
        encoding="utf-8"), flags=re.MULTILINE)}
    wrong = []
    for name in tracked_files():
        if name.endswith((".py", ".yaml", ".md")):
            text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
            for cite in REFERENCE_CITE.findall(text):
                wrong += [f"{name}: {section}" for section in re.findall(r"§\d+", cite) if section not in sections]
    assert not wrong, "citations of docs/kohya-reference.md sections it does not have:\n" + "\n".join(wrong)


def test_no_tracked_file_names_a_folder_of_this_machine():
    found = []
    for name in tracked_files():
        data = (ROOT / name).read_bytes() if (ROOT / name).is_file() else b""
        if b"\0" in data:  # binary
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if any(folder in line for folder in MACHINE_FOLDERS):
                found.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not found, "absolute paths of one machine (use paths relative to the repository):\n" + "\n".join(found)

#!/usr/bin/env python3
"""Offline checks of the repository's Markdown documentation.

1. Every heading the old README (the 58 KB manual) had is still a heading of
   the guide that now holds its content: `.ci/readme-headings.txt` lists them,
   one per line, as `<heading line>\t<repo-relative file>`; the heading's text
   (without the leading #'s) must be the text of a heading in that file.
2. Every relative link in every Markdown file of the repository (outside
   target/, node_modules/, .git/, .venv/ and proto/third_party/) resolves:
   `[text](path)`, `[text](path#anchor)`, `[text](#anchor)` and reference
   definitions `[ref]: path` name an existing file or directory, and an anchor
   into a Markdown file names one of its headings by its GitHub slug
   (lowercase, spaces to '-', punctuation but '-' and '_' removed, '-1', '-2'
   for repeated headings). http(s):, mailto: and other schemes are skipped,
   as is anything inside code spans and fenced code blocks.
3. README.md, the front page, stays within 10,240 bytes.

Usage: python3 .ci/check_docs.py   (standard library only; exits 1 on a finding)
"""

import os
import re
import sys
import unicodedata
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]
HEADINGS_FILE = ROOT / ".ci" / "readme-headings.txt"
FRONT_PAGE = ROOT / "README.md"
FRONT_PAGE_MAX_BYTES = 10_240
SKIPPED_DIRS = {"target", "node_modules", ".git", ".venv"}
SKIPPED_PATHS = {Path("proto/third_party")}

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
CLOSING_HASHES = re.compile(r"(?:^|[ \t]+)#+[ \t]*$")
# A code span: a run of backticks, then anything up to a run of the same
# length, not crossing a blank line.
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n)[\s\S])*?[^`])\1(?!`)")
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(<[^>\n]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>\n]*>|\S+)", re.M)
HTML_ANCHOR = re.compile(r"<a\s+(?:[^>]*?\s)?(?:name|id)=[\"']([^\"']+)[\"']", re.I)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def outside_fences(text):
    """The lines of `text`, with every line inside a fenced code block (and
    the fences themselves) blanked, so line numbers stay right."""
    out, fence = [], None
    for line in text.split("\n"):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            out.append("")
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip()[len(match.group(1)):].strip():
                fence = None
            out.append("")
        else:
            out.append(line)
    return out


def heading_texts(text):
    """The text of every ATX heading outside fenced code, in order."""
    found = []
    for line in outside_fences(text):
        match = ATX_HEADING.match(line)
        if match:
            found.append(CLOSING_HASHES.sub("", match.group(2) or "").strip())
    return found


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    kept = []
    for char in text:
        if char in "-_" or char == " ":
            kept.append(char)
        elif unicodedata.category(char)[0] in "LNM":
            kept.append(char)
    return "".join(kept).replace(" ", "-")


def anchors(path, cache={}):
    if path not in cache:
        text = path.read_text(encoding="utf-8")
        found, seen = set(), {}
        for heading in heading_texts(text):
            base = slug(heading)
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
        found.update(HTML_ANCHOR.findall(text))
        cache[path] = found
    return cache[path]


def markdown_files():
    for directory, dirs, files in os.walk(ROOT):
        here = Path(directory).relative_to(ROOT)
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and here / d not in SKIPPED_PATHS)
        for name in sorted(files):
            if name.lower().endswith(".md"):
                yield Path(directory) / name


def links(text):
    """(line number, destination) of every link outside code."""
    lines = outside_fences(text)
    prose = "\n".join(lines)
    # Code spans become spaces of the same shape, so offsets and lines stay put.
    prose = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
    for pattern, group in ((INLINE_LINK, 2), (REFERENCE_DEF, 1)):
        for match in pattern.finditer(prose):
            destination = match.group(group)
            if destination.startswith("<") and destination.endswith(">"):
                destination = destination[1:-1]
            yield prose.count("\n", 0, match.start()) + 1, destination


def check_headings(problems):
    if not HEADINGS_FILE.exists():
        problems.append(f"{HEADINGS_FILE.relative_to(ROOT)} is missing")
        return 0
    count = 0
    for number, raw in enumerate(HEADINGS_FILE.read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{HEADINGS_FILE.relative_to(ROOT)}:{number}"
        parts = raw.split("\t")
        if len(parts) != 2 or not parts[0].startswith("#") or not parts[1].strip():
            problems.append(f"{where}: expected '<# heading>\\t<file>', got {raw!r}")
            continue
        heading = parts[0].lstrip("#").strip()
        target = ROOT / parts[1].strip()
        count += 1
        if not target.is_file():
            problems.append(f"{where}: {parts[1]} does not exist (for heading {heading!r})")
        elif heading not in heading_texts(target.read_text(encoding="utf-8")):
            problems.append(f"{where}: {heading!r} is not a heading of {parts[1]}")
    return count


def check_links(problems):
    files = list(markdown_files())
    checked = 0
    for path in files:
        relative = path.relative_to(ROOT)
        for line, destination in links(path.read_text(encoding="utf-8")):
            if SCHEME.match(destination) or destination.startswith("//"):
                continue  # http(s):, mailto: and other absolute links
            checked += 1
            target_part, _, anchor = destination.partition("#")
            target_part = unquote(target_part.split("?", 1)[0])
            if target_part:
                target = (ROOT / target_part.lstrip("/")) if target_part.startswith("/") \
                    else (path.parent / target_part)
            else:
                target = path
            where = f"{relative}:{line}: ({destination})"
            if not target.exists():
                problems.append(f"{where}: {os.path.relpath(target, ROOT)} does not exist")
                continue
            try:
                target.resolve().relative_to(ROOT)
            except ValueError:
                problems.append(f"{where}: points outside the repository")
                continue
            if anchor and target.is_file() and target.suffix.lower() == ".md":
                if unquote(anchor) not in anchors(target.resolve()):
                    problems.append(f"{where}: no heading of {os.path.relpath(target, ROOT)} has the slug #{anchor}")
    return len(files), checked


def check_front_page(problems):
    size = FRONT_PAGE.stat().st_size
    if size > FRONT_PAGE_MAX_BYTES:
        problems.append(f"README.md is {size} bytes, over {FRONT_PAGE_MAX_BYTES}: move detail into a guide")
    return size


def main():
    problems = []
    headings = check_headings(problems)
    print(f"check_docs: {headings} headings of the old README looked up in the guides "
          f"{HEADINGS_FILE.relative_to(ROOT)} names")
    files, checked = check_links(problems)
    print(f"check_docs: {checked} relative links checked in {files} Markdown files")
    size = check_front_page(problems)
    print(f"check_docs: README.md is {size} bytes (at most {FRONT_PAGE_MAX_BYTES})")
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        print(f"check_docs: {len(problems)} problem(s)", file=sys.stderr)
        sys.exit(1)
    print("check_docs: OK")


if __name__ == "__main__":
    main()

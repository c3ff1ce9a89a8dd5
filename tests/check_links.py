#!/usr/bin/env python3
"""Checks the documentation's relative links and images.

    python3 tests/check_links.py [FILE.md ...]

Without arguments it reads README.md, docs/*.md, notebooks/README.md and solvers/README.md
(those that exist). Every inline link and image (`[text](target)`, `![alt](target)`),
every reference definition (`[id]: target`) and every HTML `href`/`src` outside code
blocks and code spans must name a file or folder that exists, relative to the file that
links (or to the repository root when it starts with `/`). A `#anchor` into a markdown
file (or `#anchor` alone, into the same file) must match one of its headings by GitHub's
rules: the heading's text lowercased, punctuation other than hyphens, underscores and
spaces dropped, spaces turned into hyphens, and a repeated slug numbered -1, -2, ...;
explicit `<a name=..>` / `id=..` anchors count too. http(s) and mailto links are skipped.

Prints each broken link as FILE:LINE and exits 1 if there is any; otherwise prints
"links: N checked, 0 broken" and exits 0. Python 3 standard library only.
"""
import glob
import os
import re
import sys
import unicodedata
from urllib.parse import unquote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_FILES = ["README.md", "docs/*.md", "notebooks/README.md", "solvers/README.md"]
SKIP_SCHEMES = ("http://", "https://", "mailto:")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)
LINK_START = re.compile(r"(!?)\[((?:[^\[\]\\]|\\.|\[(?:[^\[\]\\]|\\.)*\])*)\]\(")
REF_DEF = re.compile(r"^ {0,3}\[([^\]]+)\]:[ \t]*(<[^>]*>|\S+)", re.M)
HTML_ATTR = re.compile(r"<(?:a|img|source)\b[^>]*?\b(href|src)\s*=\s*(\"[^\"]*\"|'[^']*')", re.I)
HTML_ANCHOR = re.compile(r"<[a-z][^>]*?\b(?:name|id)\s*=\s*(\"[^\"]*\"|'[^']*')", re.I)


def blank(text):
    """The text with fenced code blocks and code spans overwritten (lengths and newlines
    kept, so offsets still give line numbers), and the fenced lines' indices."""
    lines = text.split("\n")
    fenced = set()
    fence = None
    for i, line in enumerate(lines):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                fenced.add(i)
        else:
            fenced.add(i)
            if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) \
                    and not line.strip()[len(m.group(1)):].strip():
                fence = None
    out = [(" " * len(line) if i in fenced else line) for i, line in enumerate(lines)]
    text = "\n".join(out)

    def spaces(m):
        return re.sub(r"[^\n]", "x", m.group(0))

    # code spans, paragraph by paragraph (a span does not cross a blank line; an
    # unmatched backtick is left alone)
    chunks = re.split(r"(\n[ \t]*\n)", text)
    text = "".join(CODE_SPAN.sub(spaces, c) for c in chunks)
    return text, fenced


def slug(heading):
    """GitHub's anchor for a heading's markdown text."""
    s = heading
    s = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", s)          # images: their alt text
    s = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s)           # links: their text
    s = re.sub(r"\[([^\]]*)\]\[[^\]]*\]", r"\1", s)          # reference links
    s = re.sub(r"<[^>]+>", "", s)                            # HTML tags
    # emphasis markers made of underscores vanish in the rendered text; underscores
    # inside words and code spans stay
    parts = re.split(r"(`+[^`]*`+)", s)
    parts = [p if p.startswith("`") else re.sub(r"(?<![\w])_+|_+(?![\w])", "", p) for p in parts]
    s = "".join(parts).strip().lower()
    kept = []
    for ch in s:
        cat = unicodedata.category(ch)
        if ch in " -_" or cat[0] in "LNM":
            kept.append(ch)
    return "".join(kept).replace(" ", "-")


def anchors(path, cache={}):
    """The anchors a markdown file defines."""
    if path in cache:
        return cache[path]
    with open(path, encoding="utf-8") as f:
        text = f.read()
    _, fenced = blank(text)
    lines = text.split("\n")
    found, seen = set(), {}

    def add(heading):
        base = slug(heading)
        n = seen.get(base, 0)
        found.add(base if n == 0 else "%s-%d" % (base, n))
        seen[base] = n + 1

    for i, line in enumerate(lines):
        if i in fenced:
            continue
        m = ATX.match(line)
        if m and not line.lstrip().startswith("#" * 7):
            body = re.sub(r"[ \t]+#+[ \t]*$", "", m.group(2) or "")
            body = "" if re.fullmatch(r"#+", body) else body
            add(body)
            continue
        m = SETEXT.match(line)
        if m and i > 0 and i - 1 not in fenced and lines[i - 1].strip() \
                and not ATX.match(lines[i - 1]) and not lines[i - 1].lstrip().startswith(("|", "-", "*", ">")):
            if m.group(1)[0] == "=" or len(m.group(1)) >= 2:
                add(lines[i - 1].strip())
    for m in HTML_ANCHOR.finditer(blank(text)[0]):
        found.add(m.group(1)[1:-1])
    cache[path] = found
    return found


def destination(text, i):
    """The link destination starting at text[i] (just after '('), or None."""
    while i < len(text) and text[i] in " \t\n":
        i += 1
    if i < len(text) and text[i] == "<":
        j = text.find(">", i)
        return None if j < 0 else text[i + 1:j]
    depth, j = 0, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2
            continue
        if c in " \t\n":
            break
        if c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                break
            depth -= 1
        j += 1
    return text[i:j]


def links(path):
    """(line, target, kind) for every link of a markdown file outside code."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    clean, _ = blank(text)
    line_of = lambda off: clean.count("\n", 0, off) + 1
    for m in LINK_START.finditer(clean):
        if m.start() > 0 and clean[m.start() - 1] == "\\":
            continue
        target = destination(clean, m.end())
        if target is not None:
            yield line_of(m.start()), target, "image" if m.group(1) else "link"
    for m in REF_DEF.finditer(clean):
        yield line_of(m.start()), m.group(2).strip("<>"), "reference"
    for m in HTML_ATTR.finditer(clean):
        yield line_of(m.start()), m.group(2)[1:-1], m.group(1).lower()


def check(path, rel):
    """(checked, [broken messages]) for one markdown file."""
    checked, broken = 0, []
    for line, target, kind in links(path):
        if target.lower().startswith(SKIP_SCHEMES):
            continue
        checked += 1
        where = "%s:%d" % (rel, line)
        if not target:
            broken.append("%s: empty %s target" % (where, kind))
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        if file_part.startswith("/"):
            resolved = os.path.join(ROOT, file_part.lstrip("/"))
        elif file_part:
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        else:
            resolved = path
        if not os.path.exists(resolved):
            broken.append("%s: %s %r: no such file %s" % (where, kind, target, os.path.relpath(resolved)))
            continue
        if anchor and resolved.endswith(".md") and os.path.isfile(resolved):
            if unquote(anchor) not in anchors(resolved):
                broken.append("%s: %s %r: no heading with anchor #%s in %s"
                              % (where, kind, target, anchor, os.path.relpath(resolved)))
    return checked, broken


def main(argv):
    if argv:
        files = [os.path.abspath(a) for a in argv]
    else:
        files = []
        for pattern in DEFAULT_FILES:
            files += sorted(glob.glob(os.path.join(ROOT, pattern)))
    total, broken = 0, []
    for path in files:
        if not os.path.isfile(path):
            broken.append("%s: no such file" % os.path.relpath(path))
            continue
        n, b = check(path, os.path.relpath(path))
        total += n
        broken += b
    for msg in broken:
        print(msg)
    print("links: %d checked, %d broken" % (total, len(broken)))
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

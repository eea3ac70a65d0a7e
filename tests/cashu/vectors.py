"""Load the official NUT test vectors from the markdown files in `vectors/` (cashubtc/nuts
`tests/`, copied verbatim), so tests never retype a number.

A markdown file is split into fenced code blocks; each block remembers the headings above it
and the prose between the previous block and itself (where the 02 vectors state keyset ids,
units and fees). Small parsers turn block text into values:

- `kv_groups`: ``key: value`` lines (shell blocks), a ``# Test N`` comment starting a new group;
- `diag_json`: the JSON-with-``h'..'`` notation the V4 token vectors use (CBOR diagnostic
  style: ``h'hex'`` byte strings, trailing commas) -> Python values with `bytes`;
- `prose_fields`: ``Name: `value` `` pairs from the prose before a block.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

VECTOR_DIR = Path(__file__).parent / "vectors"

_FENCE = re.compile(r"^```(\S*)\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


@dataclass(frozen=True)
class Block:
    lang: str
    text: str
    headings: tuple[str, ...]
    prose: str

    @property
    def heading(self) -> str:
        return self.headings[-1] if self.headings else ""

    def json(self) -> Any:
        return json.loads(self.text)


@cache
def blocks(name: str) -> tuple[Block, ...]:
    """All fenced code blocks of `vectors/<name>-tests.md`, in order."""
    lines = (VECTOR_DIR / f"{name}-tests.md").read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    headings: list[tuple[int, str]] = []
    prose: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            body: list[str] = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            out.append(
                Block(
                    lang=fence.group(1),
                    text="\n".join(body),
                    headings=tuple(h for _, h in headings),
                    prose="\n".join(prose).strip(),
                )
            )
            prose = []
        else:
            heading = _HEADING.match(line)
            if heading:
                level = len(heading.group(1))
                headings = [(lvl, h) for lvl, h in headings if lvl < level]
                headings.append((level, heading.group(2)))
                prose = []
            else:
                prose.append(line)
        i += 1
    return tuple(out)


def under(name: str, heading: str) -> list[Block]:
    """Blocks whose heading path includes a heading equal to `heading`."""
    return [b for b in blocks(name) if heading in b.headings]


def lines(text: str) -> list[str]:
    """Non-empty lines that are not `#` comments."""
    return [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def _strip_comment(value: str) -> str:
    return re.sub(r"\s+#.*$", "", value).strip()


def kv_groups(text: str) -> list[dict[str, str]]:
    """``key: value`` lines grouped by ``# Test`` comments; quotes and trailing comments removed."""
    groups: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            if re.match(r"#\s*Test\b", line) and current:
                groups.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"not a key: value line: {line!r}")
        current[key.strip().strip('"')] = _strip_comment(value).strip('"')
    if current:
        groups.append(current)
    return groups


def diag_json(text: str) -> Any:
    """Parse the vectors' JSON with h'hex' byte strings and trailing commas."""
    marked = re.sub(r"h'([0-9a-fA-F]*)'", r'{"$bytes": "\1"}', text)
    marked = re.sub(r",(\s*[}\]])", r"\1", marked)

    def hook(d: dict[str, Any]) -> Any:
        if set(d) == {"$bytes"}:
            return bytes.fromhex(d["$bytes"])
        return d

    return json.loads(marked, object_hook=hook)


def prose_fields(prose: str) -> dict[str, str]:
    """``Name: `value` `` pairs (optionally in a ``- `` list) from prose text."""
    return {
        m.group(1).strip(): m.group(2)
        for m in re.finditer(r"^(?:-\s*)?([A-Za-z][A-Za-z ]*?):\s*`([^`]*)`", prose, re.M)
    }


def h(hex_str: str) -> int:
    return int(hex_str, 16)


@cache
def text(name: str) -> str:
    """The whole markdown file, for values that sit in prose rather than code blocks."""
    return (VECTOR_DIR / f"{name}-tests.md").read_text(encoding="utf-8")

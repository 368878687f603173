"""A results README's generated tables: each sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->` lines, so
the prose around it stays hand-written and the table itself is only ever written by its builder."""

from __future__ import annotations

import re

# The markers are HTML comments: Markdown renders neither, and each ends its block, so a table may touch them.
_TABLE = re.compile(r"^<!-- table:(?P<name>[\w.-]+) -->\n(?P<body>.*?)^<!-- /table:(?P=name) -->$", re.S | re.M)


def tables_in(text: str) -> dict[str, str]:
    """{name: the text between its markers, without the final newline} of every marked table in `text`."""
    return {m["name"]: m["body"].removesuffix("\n") for m in _TABLE.finditer(text)}


def with_tables(text: str, tables: dict[str, str], where: str = "README") -> str:
    """`text` with each marked table replaced by `tables[name]`. Every table must have its markers and every marker
    its table: a table built but never shown, or one shown but no longer built, is a mistake to fix by hand."""
    marked = tables_in(text)
    if unmarked := [n for n in tables if n not in marked]:
        raise ValueError(f"{where} has no `<!-- table:NAME -->` markers for: {', '.join(unmarked)}")
    if unbuilt := [n for n in marked if n not in tables]:
        raise ValueError(f"{where} marks tables that no builder makes: {', '.join(unbuilt)}")
    return _TABLE.sub(lambda m: f"<!-- table:{m['name']} -->\n{tables[m['name']]}\n<!-- /table:{m['name']} -->", text)


def first_difference(committed: dict[str, str], rebuilt: dict[str, str]) -> str | None:
    """The first line where a committed table differs from its rebuilt one, in the README's order; None if none."""
    for name, old in committed.items():
        new = rebuilt.get(name, "")
        if old == new:
            continue
        old_lines, new_lines = old.splitlines(), new.splitlines()
        for i in range(max(len(old_lines), len(new_lines))):
            a = old_lines[i] if i < len(old_lines) else "(no line)"
            b = new_lines[i] if i < len(new_lines) else "(no line)"
            if a != b:
                return f"table {name}, line {i + 1}:\n  committed: {a}\n  rebuilt:   {b}"
    return None

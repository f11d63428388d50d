"""Notes said once: a cell keeps its number or its few words and gets a footnote marker; the legend under the
table says each note once (a demo's table would otherwise repeat the same sentence in every cell).
"""

from __future__ import annotations

import html
import re

LEAD_INS = ("no value: ", "not comparable: ")  # "no value: <why>" -> "no value¹"
TRAILING = re.compile(r"^(.*?) \((.{24,})\)$", re.S)  # "0.12 [..] (<a long why>)" -> "0.12 [..]¹"


class Footnotes:
    """Numbered notes of one table, in the order their cells appear."""

    def __init__(self) -> None:
        self.numbers: dict[str, int] = {}

    def marker(self, note: str) -> str:
        number = self.numbers.setdefault(note, len(self.numbers) + 1)
        return f"<sup class='fn' data-note='{number}'>{number}</sup>"

    def cell(self, text: str) -> str:
        """`text` as cell HTML, its notes (a lead-in's rest, a long trailing parenthesis) moved to the legend."""
        for lead in LEAD_INS:
            if text.startswith(lead):
                rest = TRAILING.match(text[len(lead):])  # "v57: did not decrease (why)": the why is shared
                notes = rest.groups() if rest else (text[len(lead):],)
                return html.escape(lead[:-2]) + "".join(self.marker(n) for n in notes)
        found = TRAILING.match(text)
        if found:
            return html.escape(found.group(1)) + self.marker(found.group(2))
        return html.escape(text)

    def legend(self) -> str:
        """The notes, each once, numbered as their markers; '' when there is none."""
        if not self.numbers:
            return ""
        items = "".join(f"<li value='{n}'>{html.escape(note)}</li>" for note, n in self.numbers.items())
        return f"<ol class='footnotes'>{items}</ol>"

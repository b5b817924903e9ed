"""
Editing one input line on a terminal: keys in (L{KeyDecoder}), the line and what of it fits on the
screen out (L{LineEditor}). The line never wraps: one longer than the terminal scrolls sideways
under the cursor, so the console can always erase and redraw it with a carriage return.
"""

from __future__ import annotations

import unicodedata
from bisect import bisect_left
from collections.abc import Iterator
from itertools import pairwise

from wcwidth import iter_graphemes, wcswidth

# Keys other than a character, as KeyDecoder names them.
ENTER = "enter"
BACKSPACE = "backspace"
DELETE = "delete"
LEFT = "left"
RIGHT = "right"
HOME = "home"
END = "end"
UP = "up"
DOWN = "down"
KILL_BEFORE = "kill-before"  # ctrl-U
KILL_AFTER = "kill-after"  # ctrl-K
KILL_WORD = "kill-word"  # ctrl-W
EOF = "eof"  # ctrl-D
REDRAW = "redraw"  # ctrl-L
TAB = "tab"

_CONTROL = {
    "\r": ENTER, "\n": ENTER, "\x7f": BACKSPACE, "\x08": BACKSPACE, "\x01": HOME, "\x05": END,
    "\x02": LEFT, "\x06": RIGHT, "\x10": UP, "\x0e": DOWN, "\x15": KILL_BEFORE, "\x0b": KILL_AFTER,
    "\x17": KILL_WORD, "\x04": EOF, "\x0c": REDRAW,
}
# ESC [ X and ESC O X (what arrows and Home/End send, in either cursor mode); ESC [ n ~ (VT and rxvt).
_FINAL = {"A": UP, "B": DOWN, "C": RIGHT, "D": LEFT, "H": HOME, "F": END}
_NUMBERED = {"1": HOME, "7": HOME, "4": END, "8": END, "3": DELETE}
_LONGEST_SEQUENCE = 16
# Bracketed paste: what asks the terminal to mark pastes, and stops it; ESC [ 200 ~ and ESC [ 201 ~
# around a paste.
BRACKETED_PASTE_ON, BRACKETED_PASTE_OFF = "\x1b[?2004h", "\x1b[?2004l"
_PASTE_START, _PASTE_END = "200", "201"


class KeyDecoder:
    """
    Terminal input, already decoded from UTF-8, to keys: a printable character, or a name above.
    Escape sequences of keys with no use here (F1, Alt-x...) and other control characters are dropped.

    A paste the terminal marks as such (bracketed paste, which L{BRACKETED_PASTE_ON} asks for) is
    only text: its line breaks and tabs are spaces (none for a break at its end) and nothing in it
    is a key, so pasted lines are never entered, let alone run as commands, before Enter.
    """

    def __init__(self) -> None:
        self._sequence: str | None = None  # what followed an ESC so far (its first characters)
        self._pasting = False
        self._paste_break = False  # a line break pasted: a space, if more text follows in the paste

    def feed(self, text: str) -> Iterator[str]:
        for c in text:
            if self._sequence is not None:
                taken, key = self._in_sequence(c)
                if key is not None and not self._pasting:
                    yield key
                if taken:
                    continue
            if c == "\x1b":
                self._sequence = ""
            elif self._pasting:
                if c in "\r\n":
                    self._paste_break = True
                elif c == "\t" or printable(c):
                    if self._paste_break:
                        self._paste_break = False
                        yield " "
                    yield " " if c == "\t" else c
            elif c in _CONTROL:
                yield _CONTROL[c]
            elif c == "\t":
                yield TAB
            elif printable(c):
                yield c

    def _in_sequence(self, c: str) -> tuple[bool, str | None]:
        """C{c} after an ESC: whether it belongs to the sequence, and the key the sequence ends with."""
        sequence = self._sequence
        assert sequence is not None
        if sequence == "":
            self._sequence = c if c in "[O" else None  # ESC [ and ESC O start the keys' sequences
            return True, None
        if sequence == "O" or "@" <= c <= "~":  # the final character
            self._sequence = None
            if c == "~" and sequence.startswith("["):
                number = sequence[1:].split(";")[0]
                if number in (_PASTE_START, _PASTE_END):
                    self._pasting, self._paste_break = number == _PASTE_START, False
                    return True, None
                return True, _NUMBERED.get(number)
            return True, _FINAL.get(c)
        if " " <= c <= "?":  # parameters: kept up to a length, read to the end however long
            if len(sequence) < _LONGEST_SEQUENCE:
                self._sequence = sequence + c
            return True, None
        self._sequence = None  # not a sequence after all: the character is typed
        return False, None


# Text, though Python does not count them printable: the joiners of emoji sequences and of some
# scripts (ZWNJ, ZWJ: "\U0001F469\u200d\U0001F4BB" is one emoji, Persian writes ZWNJ inside words), the
# marks right-to-left text carries (LRM, RLM) and the tags of flags such as Scotland's. None of them
# moves the cursor or reorders a line as the bidi embeddings, overrides and isolates do.
_INVISIBLE_TEXT = frozenset("\u200c\u200d\u200e\u200f") | frozenset(map(chr, range(0xE0020, 0xE0080)))


def printable(c: str) -> bool:
    """Whether the character C{c} is text a terminal only shows: no control character, nothing that
    reorders the line; spaces of every kind are (no-break, ideographic...)."""
    return c.isprintable() or c in _INVISIBLE_TEXT or unicodedata.category(c) == "Zs"


def width(text: str) -> int:
    """Columns C{text} takes on a terminal: two for wide (CJK, most emoji, an emoji sequence joined
    by ZWJ), none for combining marks."""
    return sum(_cluster_width(g) for g in iter_graphemes(text))


def _cluster_width(cluster: str) -> int:
    # wcwidth follows the Unicode version terminals do (Python's own tables lag behind: U+4DC0..
    # U+4DFF became wide in Unicode 16), and measures a cluster as terminals that join emoji
    # sequences draw it; -1 is for control characters, which are never typed in.
    return max(wcswidth(cluster), 0)


class LineEditor:
    """
    The line being typed, the cursor in it, and the lines entered before (up and down recall them).

    @param limit: the longest line, in characters; keys past it are refused.
    @param remembered: how many entered lines up and down go through.
    """

    def __init__(self, limit: int, remembered: int = 100) -> None:
        self.text = ""
        self.cursor = 0  # characters (code points) before the cursor
        self._limit = limit
        self._remembered = remembered
        self._entered: list[str] = []
        self._at = 0  # the entered line shown, or len(_entered) for the line being written
        self._draft = ""  # the line being written, while an entered one is shown

    def key(self, key: str) -> bool:
        """Apply an editing key or type a character; C{False} when it cannot be (the line is full).
        The cursor moves, and Backspace and Delete erase, by what shows as one character (a
        grapheme cluster: a letter and its accents, an emoji sequence, a flag)."""
        if len(key) == 1:  # typed: the cheap case, as a paste types every character of it
            if len(self.text) >= self._limit:
                return False
            at = self.cursor
            self.text, self.cursor = self.text[:at] + key + self.text[at:], at + 1
            return True
        text, at = self.text, self.cursor
        if key in (BACKSPACE, DELETE, LEFT, RIGHT):
            bounds, i = self._clusters()
            at = bounds[i]
            before, after = bounds[max(i - 1, 0)], bounds[min(i + 1, len(bounds) - 1)]
            if key == BACKSPACE:
                self.text, self.cursor = text[:before] + text[at:], before
            elif key == DELETE:
                self.text = text[:at] + text[after:]
            else:
                self.cursor = before if key == LEFT else after
        elif key == HOME:
            self.cursor = 0
        elif key == END:
            self.cursor = len(text)
        elif key == KILL_BEFORE:
            self.text, self.cursor = text[at:], 0
        elif key == KILL_AFTER:
            self.text = text[:at]
        elif key == KILL_WORD:
            start = len(text[:at].rstrip(" "))
            start = text.rfind(" ", 0, start) + 1
            self.text, self.cursor = text[:start] + text[at:], start
        elif key in (UP, DOWN):
            self._recall(-1 if key == UP else 1)
        return True

    def _clusters(self) -> tuple[list[int], int]:
        """
        Where the line's grapheme clusters start, and its end: the places for the cursor. A cursor
        inside a cluster (a joiner typed between two emoji made them one) moves to its end.

        @return: those places, and the cursor's among them.
        """
        bounds = [0]
        for cluster in iter_graphemes(self.text):
            bounds.append(bounds[-1] + len(cluster))
        i = bisect_left(bounds, self.cursor)
        self.cursor = bounds[i]
        return bounds, i

    def _recall(self, step: int) -> None:
        at = self._at + step
        if not 0 <= at <= len(self._entered):
            return
        if self._at == len(self._entered):
            self._draft = self.text
        self._at = at
        self.text = self._draft if at == len(self._entered) else self._entered[at]
        self.cursor = len(self.text)

    def take(self, remember: bool = True) -> str:
        """The line, entered: the editor starts a new one. Remembered for recall unless told not to
        (a password), blank, or the same as the line entered last."""
        line = self.text
        self.text, self.cursor, self._draft = "", 0, ""
        if remember and line.strip() and (not self._entered or self._entered[-1] != line):
            self._entered.append(line)
            del self._entered[: -self._remembered]
        self._at = len(self._entered)
        return line

    def view(self, columns: int) -> tuple[int, int, int]:
        """
        What to show of the line in C{columns} columns: C{text[start:end]}, whole clusters, with the
        cursor at the returned column from its start. The last column is left free, for the cursor
        at the end of a full line.

        @return: C{(start, end, column)}
        """
        room = max(columns - 1, 1)
        bounds, cursor = self._clusters()
        widths = [_cluster_width(self.text[a:b]) for a, b in pairwise(bounds)]
        start, before = 0, sum(widths[:cursor])
        # Scroll until the cursor is in view: on its cluster, or on the free column past the end.
        if cursor < len(widths):
            need, fits = widths[cursor], room
        else:
            need, fits = 1, room + 1
        while before + need > fits and start < cursor:
            before -= widths[start]
            start += 1
        end, used = start, 0
        while end < len(widths) and used + widths[end] <= room:
            used += widths[end]
            end += 1
        return bounds[start], bounds[end], before

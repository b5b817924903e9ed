"""Tests for p2pchat.peer.lineedit: keys from terminal input, and what of a long line is shown."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from p2pchat.peer.lineedit import (
    BACKSPACE,
    DELETE,
    DOWN,
    END,
    ENTER,
    HOME,
    LEFT,
    RIGHT,
    UP,
    KeyDecoder,
    LineEditor,
    width,
)

FAMILY = "\U0001F468\u200d\U0001F469\u200d\U0001F467"  # one emoji: man, ZWJ, woman, ZWJ, girl
FLAG = "\U0001F1EB\U0001F1F7"  # two regional indicators: one flag


class KeyDecoderTests(unittest.SynchronousTestCase):
    def test_sequences_split_across_reads(self) -> None:
        """An escape sequence may arrive over several reads: it is still one key."""
        decoder = KeyDecoder()
        keys = [k for part in ("a\x1b", "[", "1;5", "C", "\x1b", "O", "Hb") for k in decoder.feed(part)]
        self.assertEqual(keys, ["a", RIGHT, HOME, "b"])

    def test_unknown_and_overlong_sequences_dropped(self) -> None:
        """A sequence of no use here, or one that never ends, is dropped and typing goes on."""
        decoder = KeyDecoder()
        self.assertEqual(list(decoder.feed("\x1b[15~x\x1b[" + "9" * 40 + "~y\x1b[A")), ["x", "y", UP])
        self.assertEqual(list(decoder.feed("\x1b[1\u00e9\x1b[D")), ["\u00e9", LEFT])  # not a sequence after all
        self.assertEqual(list(decoder.feed("\x1b[4~\x1b[8~\x1bOB\x07z")), [END, END, DOWN, "z"])

    def test_paste_is_text(self) -> None:
        """In a bracketed paste nothing is a key: line breaks and tabs are spaces (none for the break
        that ends it, however it is spelled), control characters and escape sequences are dropped;
        after it, keys are keys again. The markers may come split across reads."""
        decoder = KeyDecoder()
        parts = ("a\x1b[20", "0~b\r\n\nc\td\x1b[A\x04\x7f", "\r\n\x1b[201", "~\r\x1b[D")
        keys = [k for part in parts for k in decoder.feed(part)]
        self.assertEqual(keys, ["a", "b", " ", "c", " ", "d", ENTER, LEFT])
        self.assertEqual(list(decoder.feed("\x1b[200~\nx\x1b[201~\x1b[200~\x1b[201~y")), [" ", "x", "y"])


    def test_joiners_and_spaces_typed_and_pasted(self) -> None:
        """The joiners of emoji sequences and scripts, RTL marks and spaces of every kind are text,
        typed or pasted; what reorders the line or is a control character (C1 too) is not."""
        text = FAMILY + "\u0645\u06cc\u200c\u062e \u05dd\u200f\u00a0\u3000\U000E0067\U000E007F"
        decoder = KeyDecoder()
        self.assertEqual("".join(decoder.feed(text + "\u202e\u2066\u009b\u2028x")), text + "x")
        self.assertEqual("".join(decoder.feed(f"\x1b[200~{text}\u202e\u009bx\x1b[201~")), text + "x")


class ClusterTests(unittest.SynchronousTestCase):
    def typed(self, text: str) -> LineEditor:
        editor = LineEditor(100)
        for c in text:
            editor.key(c)
        return editor

    def test_cursor_moves_over_whole_clusters(self) -> None:
        """Left and right step over what shows as one character: an emoji sequence, a flag, a letter
        with its accent, a Devanagari syllable."""
        editor = self.typed("a" + FAMILY + FLAG + "e\u0301\u0938\u094d\u0924\u0947")
        stops = [editor.cursor]
        while editor.cursor:
            editor.key(LEFT)
            stops.append(editor.cursor)
        self.assertEqual(stops, [14, 10, 8, 6, 1, 0])
        for stop in reversed(stops[:-1]):
            editor.key(RIGHT)
            self.assertEqual(editor.cursor, stop)

    def test_backspace_and_delete_take_whole_clusters(self) -> None:
        editor = self.typed(f"a{FAMILY}{FLAG}e\u0301b")
        editor.key(LEFT)
        editor.key(BACKSPACE)
        self.assertEqual((editor.text, editor.cursor), (f"a{FAMILY}{FLAG}b", 8))
        editor.key(BACKSPACE)
        self.assertEqual((editor.text, editor.cursor), (f"a{FAMILY}b", 6))
        editor.key(HOME)
        editor.key(RIGHT)
        editor.key(DELETE)
        self.assertEqual((editor.text, editor.cursor), ("ab", 1))

    def test_emoji_sequence_takes_two_columns(self) -> None:
        """An emoji sequence is measured as the terminals that join it draw it: two columns."""
        editor = self.typed(f"{FAMILY}{FLAG}x")
        self.assertEqual(width(FAMILY), 2)
        self.assertEqual(editor.view(80), (0, len(editor.text), 5))
        editor.key(LEFT)
        editor.key(LEFT)
        self.assertEqual(editor.view(80), (0, len(editor.text), 2))
        self.assertEqual(editor.view(3), (5, 7, 0))  # scrolled: the flag shows whole, not half of it

    def test_joiner_typed_between_emoji_joins_them(self) -> None:
        """A ZWJ typed between two emoji makes them one: the cursor is after the whole, not inside."""
        editor = self.typed("\U0001F469\U0001F4BB")
        editor.key(LEFT)
        editor.key("\u200d")
        self.assertEqual(editor.view(80), (0, 3, 2))
        self.assertEqual(editor.cursor, 3)
        editor.key(BACKSPACE)
        self.assertEqual(editor.text, "")


class ViewTests(unittest.SynchronousTestCase):
    @given(
        st.text(st.sampled_from("ab 你👋\u0301é"), max_size=60),
        st.integers(min_value=2, max_value=30),
        st.data(),
    )
    def test_cursor_always_in_view(self, text: str, columns: int, data: st.DataObject) -> None:
        """Whatever the line and the width, what is shown fits in all but the last column, starts
        and ends on whole characters around the cursor, and the cursor's column is inside it."""
        editor = LineEditor(100)
        for c in text:
            editor.key(c)
        editor.cursor = data.draw(st.integers(min_value=0, max_value=len(text)))
        start, end, column = editor.view(columns)
        self.assertLessEqual(width(text[start:end]), columns - 1)
        self.assertLessEqual(column, columns - 1)
        self.assertTrue(0 <= start <= editor.cursor <= end <= len(text), (start, end, editor.cursor))
        self.assertEqual(column, width(text[start:editor.cursor]))
        if editor.cursor < len(text) and width(text[editor.cursor]) <= columns - 1:
            self.assertGreater(end, editor.cursor)  # the character under the cursor shows
        if end < len(text):
            self.assertGreater(width(text[start:end + 1]), columns - 1)  # as much as fits is shown

    def test_short_line_whole(self) -> None:
        """A line that fits is shown whole, from its start, wherever the cursor is."""
        editor = LineEditor(100)
        for c in "hello":
            editor.key(c)
        editor.key(LEFT)
        self.assertEqual(editor.view(10), (0, 5, 4))
        editor.key(RIGHT)
        editor.key(RIGHT)
        self.assertEqual(editor.view(6), (0, 5, 5))
        self.assertEqual(editor.view(5), (1, 5, 4))

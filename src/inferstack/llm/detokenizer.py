"""Incremental detokenization and stop strings.

Decoding token by token goes wrong for byte-level vocabularies (a character can
span tokens) and for tokenizers that merge spaces: the text of a new token is
the difference between decoding a short window with and without it, and is
only released once it no longer ends in an incomplete character (``\\ufffd``).

Stop strings are matched on the text; text that might be the beginning of a
stop string is held back until it is clear, so a stream never shows a client
part of a stop string that the final text does not contain.
"""

from __future__ import annotations

from typing import Any

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, honouring stop strings."""

    __slots__ = ("tokenizer", "ids", "prefix_offset", "read_offset", "text", "emitted", "stop", "max_stop",
                 "skip_ids")

    def __init__(self, tokenizer: Any, stop: list[str], skip_ids: frozenset[int] = frozenset()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        #: All text decoded so far (the final text once a stop string matched).
        self.text = ""
        #: How much of ``text`` has been handed out.
        self.emitted = 0
        self.stop = stop
        self.max_stop = max((len(s) for s in stop), default=0)
        self.skip_ids = skip_ids

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to release now, whether a stop string matched)."""
        if token in self.skip_ids:
            return "", False
        self.ids.append(token)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            new = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += new
            if self.stop:
                # Only a match that overlaps the new text can be new.
                window_start = max(0, len(self.text) - len(new) - self.max_stop + 1)
                found = -1
                for stop in self.stop:
                    index = self.text.find(stop, window_start)
                    if index != -1 and (found == -1 or index < found):
                        found = index
                if found != -1:
                    self.text = self.text[:found]
                    return self._release(len(self.text)), True
                return self._release(len(self.text) - self._held_back()), False
            return self._release(len(self.text)), False
        return "", False

    def _held_back(self) -> int:
        """Length of the longest end of ``text`` that starts some stop string."""
        longest = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta

    def flush(self) -> str:
        """Whatever is still held back (the sequence ended without a stop string)."""
        return self._release(len(self.text))

"""Incremental detokenisation with exact stop strings.

Text is released as soon as it is final: not while the last bytes form an incomplete character, and not
while its tail could still grow into a stop string. On a stop string the text is cut right before it.
"""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalText:
    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already counted
        self.read_offset = 0
        self.text = ""  # everything decoded so far (cut at a stop string)
        self.released = 0  # characters of `text` already handed out

    def add(self, token_id: int) -> bool:
        """Appends a token; returns True when a stop string has been reached."""
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # nothing final yet (e.g. half of a multi-byte character)
        before = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._cut_at_stop(before)

    def _cut_at_stop(self, before: int) -> bool:
        if not self.stop:
            return False
        longest = max(len(s) for s in self.stop)
        search_from = max(0, before - longest + 1)
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def release(self, final: bool) -> str:
        """The text that became final since the last call (all of it when `final`)."""
        end = len(self.text) if final else len(self.text) - self._held_back()
        end = max(end, self.released)
        out, self.released = self.text[self.released:end], end
        return out

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(max((len(s) for s in self.stop), default=1) - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0

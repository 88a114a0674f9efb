"""Text out of tokens as they come, and stop strings.

Each new token's text is the difference between decoding a short window of tokens with and
without it (the window starts a few tokens back, in the prompt at first, so a tokenizer that drops
a word's leading space at the start of a decode does not drop it here). A token that ends in the
middle of a multi-byte character adds no text until the character is whole. Text that could be
the start of a stop string is held back until it is clear that it is not; when a stop string
appears, the text ends before it.
"""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT_TOKENS = 5  # tokens of context before the first new one


class Detokenizer:
    """tokenizer: a `transformers` tokenizer; prompt_ids: the prompt, for context; stop: strings
    that end the output."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids)
        self._prefix = max(0, len(self._ids) - CONTEXT_TOKENS)
        self._read = len(self._ids)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.text = ""  # all the text of the new tokens so far
        self._sent = 0  # of which this much was handed out
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Take one new token; returns the text that can be handed out now ("" if none yet).
        After a stop string, `stopped` is true and nothing more is taken."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._prefix, self._read)
        now = self._decode(self._prefix, len(self._ids))
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.text += now[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The text still held back, once the output ends for another reason than a stop string."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = self._find_stop()
        if cut is not None:
            self.stopped, self.text = True, self.text[:cut]
            end = len(self.text)
        else:
            end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        out, self._sent = self.text[self._sent:end], max(self._sent, end)
        return out

    def _find_stop(self) -> int | None:
        if not self._stop:
            return None
        start = max(0, self._sent - self._hold)
        found = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

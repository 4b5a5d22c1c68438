"""Generated tokens -> text pieces for streaming, with stop strings held back until they cannot match.

Decoding token by token is wrong for byte-level and sentencepiece tokenizers (a character can span tokens,
a leading space depends on the previous token), so each step decodes a short window that starts a few
tokens back and emits only what it adds; an incomplete character (U+FFFD at the end) waits for the next
token. The concatenated pieces equal the decoding of all tokens after the prompt.
"""

from __future__ import annotations


class TextStream:
    """Text of one request's output, piece by piece, cut at the first stop string."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        context = list(prompt_ids[-4:])
        self.ids = context
        self.prefix = 0
        self.read = len(context)
        self.text = ""  # output text so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of self.text already handed out
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """Append a token; return the text that can be handed out now ("" while held back)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return self._extend(after[len(before):], final=False)
        return ""

    def finish(self) -> str:
        """The rest of the text at the end of generation (incomplete characters included)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        piece = after[len(before):] if len(after) > len(before) else ""
        self.prefix = self.read = len(self.ids)
        return self._extend(piece, final=True)

    def _extend(self, piece: str, final: bool) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        if self.stop:
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                final = True
        ready = len(self.text) if final or not self.stop else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent:ready]
        self.sent = ready
        return out


__all__ = ["TextStream"]

"""Stop sequences: strings that end the output where their first occurrence in the decoded text begins.

The check runs on the text of the committed tokens, so it is exact under speculation: a round that accepts
several tokens commits exactly the tokens plain decoding would have produced one by one, and the output is
cut at the first token whose text completes a stop string (plain decoding would have stopped there), its
text at the stop string's first character. The stop string itself is not part of the output (as OpenAI).
"""
from __future__ import annotations

MAX_STOPS = 4          # as OpenAI


def check_stops(stops) -> tuple[str, ...]:
    """`stops` (None, a string, or a list of at most MAX_STOPS non-empty strings) as a tuple; raises ValueError
    naming what is wrong. None, "" and [] mean none."""
    if stops is None or stops == "":
        return ()
    if isinstance(stops, str):
        return (stops,)
    if not isinstance(stops, (list, tuple)):
        raise ValueError("'stop' must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"'stop' takes at most {MAX_STOPS} strings, got {len(stops)}")
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("each 'stop' sequence must be a non-empty string")
    return tuple(stops)


def held_back(text: str, stops) -> int:
    """How many characters at the end of `text` could still become the start of a stop string (the longest
    suffix that is a proper prefix of one): a stream holds them back until the next tokens decide."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class StopStrings:
    """Stop strings over the decoded text of a growing output (Sequence.commit feeds it each round's tokens).

    `end` (None until a stop string matched) is the number of characters of the output's text
    (`tokenizer.decode(output, skip_special_tokens=True)`) before the stop; `matched` is the stop string."""

    def __init__(self, tokenizer, stops):
        self.tokenizer = tokenizer
        self.stops = check_stops(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.ids: list[int] = []
        self.end: int | None = None
        self.matched: str | None = None
        self._clean = 0      # characters of text searched without a match

    def __bool__(self) -> bool:
        return bool(self.stops)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _find(self, text: str, start: int):
        hits = [(p, s) for s in self.stops if (p := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def push(self, tokens: list[int]) -> int | None:
        """Add committed tokens; returns how many of them to keep when a stop string now matches (the output ends
        with the token that completed it), None while none does."""
        if self.end is not None:
            return 0
        base = len(self.ids)
        self.ids.extend(tokens)
        if not self.stops:
            return None
        text = self._decode(self.ids)
        # a match starting earlier would lie wholly inside text already searched
        start = max(0, self._clean - self.longest + 1)
        if self._find(text, start) is None:
            self._clean = len(text.rstrip("\ufffd"))    # an incomplete UTF-8 character may still change
            return None
        for k in range(1, len(tokens) + 1):             # the first token whose text completes a match
            hit = self._find(self._decode(self.ids[: base + k]), start)
            if hit is not None:
                break
        self.ids = self.ids[: base + k]
        self.end, self.matched = hit
        return k

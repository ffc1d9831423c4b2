"""One request's text side: thinker ids → text deltas, with ``stop`` strings and the Thinking models' reasoning span.

- Text deltas join to the final text exactly (``IncrementalDetokenizer``: a character spanning tokens is released
  once complete).
- ``stop`` strings (SamplingParams.stop): the reply ends before the first one. Text that could still be the start of a
  stop string is held back, and so are its tokens from the talker (``release``), so nothing past a stop string is
  ever shown or spoken. The token in which the stop string begins is the talker's terminator (``terminator``): the
  talker treats it as the thinker's last token, as it does <|im_end|>.
- Reasoning: ids between ``<think>`` and ``</think>`` (when the prompt opens a think span, or the reply starts with
  one) go to ``reasoning`` instead of ``text``; the think tags themselves go to neither. Token ids are untouched.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from ..tokenizer import IncrementalDetokenizer


@dataclasses.dataclass
class TextStep:
    text: str = ""
    reasoning: str = ""
    release: list = dataclasses.field(default_factory=list)   # thinker ids now settled (to the talker, in order)
    stopped: bool = False      # a stop string was found: the reply ends here
    finished: bool = False     # the released ids are the last ones (the last of them ends the talker's text)


class TextOutput:
    def __init__(self, tokenizer, stop: Sequence[str] | None = None, think_ids: tuple[int, int] | None = None,
                 in_reasoning: bool = False):
        self.content = IncrementalDetokenizer(tokenizer)
        self.reason = IncrementalDetokenizer(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        self.think_start, self.think_end = think_ids if think_ids else (None, None)
        self.in_reasoning = in_reasoning and think_ids is not None
        self.n = 0                  # ids pushed
        self.pending = ""           # content text held back (could begin a stop string)
        self.held: list[list] = []  # [token, end offset of its text in pending]
        self.done = False

    def push(self, token: int, final: bool = False) -> TextStep:
        """Feed one generated id; ``final``: the thinker stopped (stop id or length) with this id."""
        if self.done:
            return TextStep()
        first = self.n == 0
        self.n += 1
        step = TextStep()
        if self.think_start is not None:
            if first and token == self.think_start:
                self.in_reasoning = True
                return self._tokens_only(step, token, final)
            if self.in_reasoning:
                if token == self.think_end:
                    self.in_reasoning = False
                    step.reasoning = self.reason.push([], final=True)
                    return self._tokens_only(step, token, final)
                step.reasoning = self.reason.push([token], final=final)
                return self._tokens_only(step, token, final)
        delta = self.content.push([token], final=final)
        if not self.stop:
            step.text, step.release, step.finished = delta, [token], final
            self.done = final
            return step
        self.pending += delta
        self.held.append([token, len(self.pending)])
        hit = min(((i, s) for s in self.stop if (i := self.pending.find(s)) >= 0), default=None)
        if hit is not None:
            cut = hit[0]
            step.text = self.pending[:cut]
            k = sum(1 for _, end in self.held if end <= cut)
            # the id in which the stop string begins ends the talker's text (it is not spoken)
            step.release = [t for t, _ in self.held[:k + 1]]
            step.stopped = step.finished = self.done = True
            return step
        if final:
            step.text, step.release, step.finished = self.pending, [t for t, _ in self.held], True
            self.pending, self.held, self.done = "", [], True
            return step
        keep = max((k for s in self.stop for k in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        k = sum(1 for _, end in self.held if end <= cut)
        if keep == 0 and delta == "":  # an incomplete character: hold its id with the next one
            k = len(self.held) - 1 if self.held and self.held[-1][1] == cut else len(self.held)
        step.text, step.release = self.pending[:cut], [t for t, _ in self.held[:k]]
        self.pending = self.pending[cut:]
        self.held = [[t, end - cut] for t, end in self.held[k:]]
        return step

    def _tokens_only(self, step: TextStep, token: int, final: bool) -> TextStep:
        """A reasoning id (or a think tag): settled for the talker at once, no content text."""
        if final:
            step.reasoning += self.reason.push([], final=True) if self.in_reasoning else ""
            step.text = self.content.push([], final=True) + self.pending
            step.release = [t for t, _ in self.held] + [token]
            step.finished, self.done = True, True
            self.pending, self.held = "", []
        else:
            step.release = [token]
        return step

"""Per-request sampling settings and the token choice for one decode step (greedy rows in one argmax)."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    Attributes:
        max_tokens: tokens to generate at most.
        temperature: 0 picks the most likely token (greedy); > 0 samples from softmax(logits / temperature).
        top_p: sample only from the smallest set of tokens whose probability adds up to top_p (nucleus).
        seed: seeds this request's own generator, so its samples do not depend on other requests.
        stop: strings that end the output; they are not part of the returned text.
        ignore_eos: keep going past the end-of-sequence token (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) \
                or not 0 <= self.temperature <= 100:
            raise ConfigError(f"temperature must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stops):
            raise ConfigError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        seed = self.seed if self.seed is not None else secrets.randbits(63)
        return torch.Generator(device=device).manual_seed(seed % (2**63))


def sample_next(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (rows, vocab; fp32): one argmax for all rows, then the sampled rows."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators)):
        if not p.greedy:
            tokens[row] = _sample_row(logits[row], p, gen)
    return tokens


def _sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> int:
    probs = torch.softmax(logits.float() / p.temperature, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs = torch.where(before < p.top_p, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=gen).item())


__all__ = ["SamplingParams", "sample_next"]

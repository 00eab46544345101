"""Token sampling on the logits' device: repetition penalty, temperature, top-k, top-p.

Every step stays on the device and never synchronises with the host; the caller syncs once per
token when it reads the id (`Sampler.read`). The filters reproduce transformers'
`RepetitionPenaltyLogitsProcessor`, `TopKLogitsWarper` and `TopPLogitsWarper` (min_tokens_to_keep=1)
and are applied in transformers' order: penalty → temperature → top-k → top-p → sample.

Non-finite logits (NaN, +inf, or everything -inf) are detected without a sync: each step ORs a
device-side flag, and `Sampler.read(token)` fetches the token id and that flag in one transfer,
raising `GenerationError` if any step since the sampler was made went bad. The returned token
tensor is always a valid id in [0, V), so feeding it to the model before reading it is safe.
On the CPU, where reading is free, a greedy pick is made in NumPy (`greedy_pick_on_host`): the
same id, at a fraction of the eager reductions' fixed cost.

Log-probabilities (`SamplingParams.logprobs`, the server's OpenAI `logprobs`) are the model's own
distribution: log_softmax of the raw logits in float32, before the penalty, temperature and the
filters (as vLLM reports them by default). They are computed in `next_token`, while the logits are
still valid (a CUDA graph's output buffer is overwritten by the next step), and come back in the
same one transfer as the token id; when they are not asked for, nothing of this runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..engine.model import logprob_rows
from ..errors import GenerationError, UsageError
from ..settings import REPETITION_PENALTY_MAX, REPETITION_PENALTY_MIN, SEED_MAX, TEMPERATURE_MAX, Settings

LOGPROBS_MAX = 20  # alternatives per token, OpenAI's top_logprobs range
# A temperature below this samples the argmax, its limit: logits divided by 1e-45 overflow float32
# to inf (and the draw would fail as non-finite), and long before that the distribution is one-hot.
GREEDY_BELOW = 1e-5
NON_FINITE_MESSAGE = (
    "the model produced non-finite logits (NaN or inf), usually a numeric overflow in half precision; "
    "try --dtype float32 (or bfloat16)"
)
# in float32 a sound checkpoint does not overflow: the advice above would change nothing
NON_FINITE_IN_FLOAT32 = (
    "the model produced non-finite logits (NaN or inf) in float32, where a sound checkpoint does not overflow: "
    "its weights likely hold NaN or inf (a damaged file); re-download the checkpoint"
)


@dataclass
class SamplingParams:
    """How to pick each next token. temperature 0 (or below GREEDY_BELOW) means greedy; top_k 0 and
    top_p 1 mean off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 1024  # [generation] max_new_tokens (configs/default.toml)
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: not asked; k: the chosen token's log-probability and the k most likely

    def validate(self) -> SamplingParams:
        """Raise UsageError for an out-of-range value; return self so calls can chain."""
        if not _is_real(self.temperature) or not 0 <= self.temperature <= TEMPERATURE_MAX:
            raise UsageError(
                f"temperature must be a number from 0 to {TEMPERATURE_MAX:g} (0 means greedy), not {self.temperature!r}; "
                "try 0.7"
            )
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], not {self.top_p!r}; use 1 to turn it off or e.g. 0.9")
        if not is_int(self.top_k) or self.top_k < 0:
            raise UsageError(f"top_k must be an integer >= 0, not {self.top_k!r}; use 0 to turn it off or e.g. 50")
        low, high = REPETITION_PENALTY_MIN, REPETITION_PENALTY_MAX
        if not _is_real(self.repetition_penalty) or not low <= self.repetition_penalty <= high:
            raise UsageError(
                f"repetition_penalty must be a number from {low:g} to {high:g}, not {self.repetition_penalty!r}; "
                "use 1 to turn it off or e.g. 1.1"
            )
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be an integer >= 1, not {self.max_new_tokens!r}; try 512")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed <= SEED_MAX):
            raise UsageError(f"seed must be an integer from 0 to {SEED_MAX}, not {self.seed!r}; omit it for a random seed")
        if not all(is_int(t) and t >= 0 for t in self.stop_ids):
            raise UsageError(f"stop_ids must be token ids (integers >= 0), not {self.stop_ids!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= LOGPROBS_MAX):
            raise UsageError(f"logprobs must be an integer from 0 to {LOGPROBS_MAX} (alternatives per token), "
                             f"not {self.logprobs!r}")  # fmt: skip
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def params_from_settings(settings: Settings) -> SamplingParams:
    """The `[generation]` settings as validated SamplingParams (the app's and the server's defaults)."""
    g = settings.generation
    return SamplingParams(
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        repetition_penalty=g.repetition_penalty,
        max_new_tokens=g.max_new_tokens,
        seed=g.seed,
    ).validate()


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_int(x: object) -> bool:
    """An int that is not a bool (JSON and TOML give both)."""
    return isinstance(x, int) and not isinstance(x, bool)


def presence_mask(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A bool [vocab_size + 1] mask of the ids present; ids >= vocab_size land in the last slot."""
    mask = torch.zeros(vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    return mask.index_fill_(0, token_ids.reshape(-1).clamp(max=vocab_size), True)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor over the last dim of `logits` ([..., V]).

    `seen` is either a bool presence mask ([V], or [V + 1] as kept by `Sampler`) or a tensor of token
    ids (any shape; each id counts once, ids >= V are ignored as in transformers). Seen logits that are
    negative are multiplied by `penalty`, the others divided by it.
    """
    vocab = logits.shape[-1]
    if seen.dtype != torch.bool:
        seen = presence_mask(seen.to(logits.device), vocab)
    seen = seen[..., :vocab]
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """transformers' TopKLogitsWarper: keep every logit >= the k-th largest (ties at the edge stay)."""
    if k <= 0:
        return logits
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """transformers' TopPLogitsWarper (min_tokens_to_keep=1).

    Sort ascending, take the cumulative softmax, drop every token whose cumulative probability is
    <= 1 - p, but always keep the most likely one. p >= 1 is off (as transformers skips it).
    """
    if p >= 1:
        return logits
    sorted_logits, sorted_ids = torch.sort(logits, descending=False, dim=-1)
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum_probs <= (1 - p)
    drop_sorted[..., -1:].fill_(False)  # a scalar setitem would copy from the host and sync on CUDA
    drop = torch.zeros_like(drop_sorted).scatter_(-1, sorted_ids, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def greedy_pick_on_host(logits: np.ndarray, banned: frozenset[int]) -> tuple[int, bool]:
    """The greedy id of float logits [V] with the banned ids excluded, and whether its logit is finite.

    The same pick as `max()` over logits with the banned ids set to -inf: the first maximum, a NaN
    counting as the maximum (so it is reported as non-finite)."""
    best = int(logits.argmax())
    if best in banned:  # rare: only then is a masked copy worth making
        logits = logits.copy()
        logits[list(banned)] = -np.inf
        best = int(logits.argmax())
    return best, math.isfinite(logits[best])


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely tokens at its step (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def logprob_pack(logits: torch.Tensor, token: torch.Tensor, k: int) -> torch.Tensor:
    """On the logits' device, float64 [1 + 2k]: the chosen token's log-probability, then the k
    largest log-probabilities and their ids (exact in float64), so one copy reads them all (the
    one row of a prompt's scores, engine/model.py's logprob_rows)."""
    return logprob_rows(logits.reshape(1, -1), token.reshape(1).to(logits.device), k)[0]


def unpack_logprobs(token_id: int, values: list[float]) -> TokenLogprob:
    """The TokenLogprob of a `logprob_pack` read back as a list."""
    k = (len(values) - 1) // 2
    top = tuple(zip((int(i) for i in values[1 + k :]), values[1 : 1 + k]))
    return TokenLogprob(token_id, values[0], top)


class Sampler:
    """Picks next tokens for one answer; make a new one per answer (the non-finite flag is sticky).

    Usage by the generation loop:
        sampler = Sampler(params, vocab_size, device)
        sampler.observe(conversation_ids)       # prompt + earlier turns, for the repetition penalty
        tok = sampler.next_token(logits)        # LongTensor [1] on device; also observed
        ... model.forward(tok, ...)             # safe even before reading it
        tok_id = sampler.read(tok)              # the one host sync; raises GenerationError if bad
        sampler.last_logprob                    # with params.logprobs set: tok_id's TokenLogprob
    """

    def __init__(
        self,
        params: SamplingParams,
        vocab_size: int,
        device: torch.device | str,
        banned_ids: tuple[int, ...] | list[int] = (),
    ):
        self.params = params.validate()
        self.vocab_size = int(vocab_size)
        self.device = torch.device(device)
        # ids an answer must never hold (the image placeholders: an <IMG_CONTEXT> in an answer would
        # take a picture's feature slot in the next turn's prefill); None when there are none
        banned = sorted({int(t) for t in banned_ids if 0 <= int(t) < self.vocab_size})
        self._banned = torch.tensor(banned, dtype=torch.long, device=self.device) if banned else None
        self._banned_set = frozenset(banned)
        # On the CPU there is no sync to avoid, and a few eager reductions over the logits cost more
        # than a small model's whole compiled decode step: greedy picks run in NumPy there.
        self._greedy_on_host = self.device.type == "cpu"
        self._penalise = params.repetition_penalty != 1.0
        self._pack: torch.Tensor | None = None  # the last token's logprob_pack, until it is read
        self.last_logprob: TokenLogprob | None = None
        # slot vocab_size absorbs ids beyond the logits (e.g. embedding rows with no lm_head row)
        self._seen = torch.zeros(self.vocab_size + 1, dtype=torch.bool, device=self.device)
        self._bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.generator = torch.Generator(device=self.device)
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def observe(self, token_ids: torch.Tensor | list[int] | int) -> None:
        """Add ids to the repetition-penalty set (idempotent: a presence set, O(len(ids)) per call)."""
        if not self._penalise:
            return
        ids = torch.as_tensor(token_ids, dtype=torch.long).to(self.device, non_blocking=True)
        self._seen.index_fill_(0, ids.reshape(-1).clamp(max=self.vocab_size), True)

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        """Pick the next token from float logits [V] (or [1, V]); returns LongTensor [1] on device.

        The token is observed for the repetition penalty. The repetition penalty applies in greedy
        mode too, as in transformers' generate(do_sample=False, repetition_penalty=...).
        """
        logits = logits.reshape(-1)
        if logits.shape[0] != self.vocab_size:
            raise GenerationError(
                f"logits have {logits.shape[0]} entries but the sampler expects {self.vocab_size}; "
                "the checkpoint's vocab_size and lm_head disagree"
            )
        logits = logits.float()
        raw = logits
        params = self.params
        if self._penalise:
            logits = apply_repetition_penalty(logits, self._seen, params.repetition_penalty)
        if params.greedy and self._greedy_on_host:
            token_id, finite = greedy_pick_on_host(logits.numpy(), self._banned_set)
            if not finite:
                self._bad.fill_(True)
            token = torch.tensor([token_id])
        elif params.greedy:
            if self._banned is not None:
                logits = logits.index_fill(0, self._banned, float("-inf"))
            # max() gives the argmax and the value whose finiteness we check in one reduction;
            # NaN propagates, all -inf stays -inf
            best, token = logits.max(dim=-1, keepdim=True)
            self._bad.logical_or_(~torch.isfinite(best[0]))
        else:
            if self._banned is not None:
                logits = logits.index_fill(0, self._banned, float("-inf"))
            raw_max = logits.amax()
            logits = logits / params.temperature
            logits = filter_top_k(logits, params.top_k)
            logits = filter_top_p(logits, params.top_p)
            # a finite raw max and a finite scaled max make the softmax well defined
            self._bad.logical_or_(~torch.isfinite(raw_max + logits.amax()))
            token = self._draw(logits.softmax(dim=-1))
        if self._penalise:
            self._seen.index_fill_(0, token, True)
        if params.logprobs is not None:
            self._pack = logprob_pack(raw, token, params.logprobs)
        return token

    def _draw(self, probs: torch.Tensor) -> torch.Tensor:
        # The exponential race torch.multinomial(probs, 1) itself uses: argmax(p / q), q ~ Exp(1).
        # Done here directly because multinomial adds device-side asserts that would abort the
        # CUDA context on a NaN step instead of letting us report it.
        q = torch.empty_like(probs).exponential_(1.0, generator=self.generator)
        q.clamp_min_(torch.finfo(q.dtype).tiny)  # Exp(1) can return 0 on CPU; 0/0 would be NaN
        return torch.argmax(probs / q, dim=-1, keepdim=True)

    def read(self, token: torch.Tensor) -> int:
        """The token id as an int, fetched together with the non-finite flag in one transfer (and,
        when asked for, its log-probabilities: then `last_logprob`)."""
        if self._pack is not None:
            return self._read_with_logprobs(token)
        if self.device.type == "cpu":  # nothing to transfer: two plain reads cost less than a cat
            token_id, bad = int(token), bool(self._bad)
        else:
            token_id, bad = torch.cat([token.reshape(1), self._bad.reshape(1).long()]).tolist()
        if bad:
            raise GenerationError(NON_FINITE_MESSAGE)
        return int(token_id)

    def _read_with_logprobs(self, token: torch.Tensor) -> int:
        # ids and the flag are exact in float64: the same one transfer carries the pack
        values = torch.cat([token.reshape(1).double(), self._bad.reshape(1).double(), self._pack]).tolist()
        self._pack = None
        if values[1]:
            raise GenerationError(NON_FINITE_MESSAGE)
        token_id = int(values[0])
        self.last_logprob = unpack_logprobs(token_id, values[2:])
        return token_id

"""Sampling filters against transformers' own logits processors, plus the Sampler's behaviour."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from internvl_chat.chat.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    filter_top_k,
    filter_top_p,
    greedy_pick_on_host,
)
from internvl_chat.errors import GenerationError, UsageError

DUMMY_IDS = torch.zeros(1, 1, dtype=torch.long)


def random_logits(vocab: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, generator=g) * 3
    if ties:
        logits = torch.round(logits)  # many exact ties, also at the top-k / top-p boundaries
    return logits


# ---- filters vs transformers ------------------------------------------------------------


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 2, 5, 17, 64, 100])
def test_top_k_matches_transformers(k: int, ties: bool) -> None:
    for seed in range(5):
        logits = random_logits(64, seed, ties)
        expected = TopKLogitsWarper(top_k=k)(DUMMY_IDS, logits[None].clone())[0]
        assert torch.equal(filter_top_k(logits, k), expected)


def test_top_k_zero_is_off() -> None:
    logits = random_logits(16, 0, ties=False)
    assert torch.equal(filter_top_k(logits, 0), logits)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999])
def test_top_p_matches_transformers(p: float, ties: bool) -> None:
    for seed in range(5):
        logits = random_logits(64, seed, ties)
        expected = TopPLogitsWarper(top_p=p)(DUMMY_IDS, logits[None].clone())[0]
        assert torch.equal(filter_top_p(logits, p), expected)


def test_top_p_batched_matches_transformers() -> None:
    logits = torch.stack([random_logits(40, s, ties=True) for s in range(4)])
    expected = TopPLogitsWarper(top_p=0.7)(DUMMY_IDS, logits.clone())
    assert torch.equal(filter_top_p(logits, 0.7), expected)


def test_top_p_keeps_at_least_one_token() -> None:
    logits = torch.tensor([0.0, 10.0, 1.0])
    out = filter_top_p(logits, 1e-9)
    assert out.tolist() == [-math.inf, 10.0, -math.inf]


def test_top_p_boundary_by_hand() -> None:
    # probabilities 0.5, 0.25, 0.25 (log-space): ascending cumulative probs are 0.25, 0.5, 1.0.
    logits = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    # p = 0.5: drop where cum <= 0.5 → both 0.25 tokens go (the tie is dropped together)
    assert torch.isinf(filter_top_p(logits, 0.5)).tolist() == [False, True, True]
    # p = 0.8: drop where cum <= 0.2 → nothing goes
    assert torch.isinf(filter_top_p(logits, 0.8)).tolist() == [False, False, False]


# ---- repetition penalty ------------------------------------------------------------------


def test_repetition_penalty_by_hand() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0, -3.0, 4.0])
    seen = torch.tensor([0, 1, 1, 3, 99])  # duplicates count once; 99 is beyond the vocab
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [1.0, -2.0, 0.5, 0.0, -3.0, 4.0]
    # a penalty below 1 rewards instead
    out = apply_repetition_penalty(logits, seen, 0.5)
    assert out.tolist() == [4.0, -0.5, 0.5, 0.0, -3.0, 4.0]


def test_repetition_penalty_mask_equals_ids() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0, -3.0, 4.0])
    mask = torch.tensor([True, True, False, True, False, False])
    assert apply_repetition_penalty(logits, mask, 2.0).tolist() == [1.0, -2.0, 0.5, 0.0, -3.0, 4.0]


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    g = torch.Generator().manual_seed(1)
    for seed in range(5):
        logits = random_logits(50, seed, ties=False)
        ids = torch.randint(0, 50, (30,), generator=g)
        expected = RepetitionPenaltyLogitsProcessor(penalty=penalty)(ids[None], logits[None].clone())[0]
        assert torch.equal(apply_repetition_penalty(logits, ids, penalty), expected)


# ---- Sampler -----------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    sampler = Sampler(SamplingParams(), vocab_size=100, device="cpu")
    for seed in range(20):
        logits = random_logits(100, seed, ties=False)
        token = sampler.next_token(logits)
        assert token.shape == (1,) and token.dtype == torch.long
        assert sampler.read(token) == int(torch.argmax(logits))


def test_greedy_accepts_batch_of_one() -> None:
    sampler = Sampler(SamplingParams(), vocab_size=10, device="cpu")
    logits = random_logits(10, 3, ties=False)
    assert sampler.read(sampler.next_token(logits[None])) == int(torch.argmax(logits))


def test_greedy_with_repetition_penalty_observes_prompt_and_own_tokens() -> None:
    params = SamplingParams(repetition_penalty=2.0)
    sampler = Sampler(params, vocab_size=4, device="cpu")
    logits = torch.tensor([3.0, 2.0, 1.8, 1.0])
    sampler.observe(torch.tensor([0]))  # the prompt: 3.0 → 1.5, so 2.0 wins
    assert sampler.read(sampler.next_token(logits)) == 1
    # token 1 was observed by next_token itself: 2.0 → 1.0, so 1.8 wins
    assert sampler.read(sampler.next_token(logits)) == 2
    # all of 0, 1, 2 seen: 1.5, 1.0, 0.9, 1.0 → token 0
    assert sampler.read(sampler.next_token(logits)) == 0


def test_observe_ignores_ids_beyond_the_vocab() -> None:
    sampler = Sampler(SamplingParams(repetition_penalty=2.0), vocab_size=3, device="cpu")
    sampler.observe([5, 1000])
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert sampler.read(sampler.next_token(logits)) == 1


def reference_probs(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor) -> torch.Tensor:
    """The distribution transformers' generate(do_sample=True) would sample from."""
    scores = logits[None].clone()
    if params.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty)(seen[None], scores)
    scores = TemperatureLogitsWarper(params.temperature)(DUMMY_IDS, scores)
    if params.top_k:
        scores = TopKLogitsWarper(params.top_k)(DUMMY_IDS, scores)
    if params.top_p < 1:
        scores = TopPLogitsWarper(params.top_p)(DUMMY_IDS, scores)
    return scores.softmax(-1)[0]


def test_sampling_follows_the_filtered_distribution() -> None:
    logits = torch.tensor([2.0, 1.5, 1.4, 0.2, -0.5, -1.0, 0.9, 1.1])
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, repetition_penalty=1.5, seed=123)
    seen = torch.tensor([0, 7])
    probs = reference_probs(logits, params, seen)
    assert (probs == 0).sum() >= 3  # the filters really remove something

    # the penalty set must stay `seen` for every draw to have the same law, so the sampler gets
    # transformers-penalised logits and no penalty of its own (its penalty path is tested below)
    penalised = RepetitionPenaltyLogitsProcessor(penalty=1.5)(seen[None], logits[None].clone())[0]
    sampler = Sampler(SamplingParams(**{**params.__dict__, "repetition_penalty": 1.0}), vocab_size=8, device="cpu")
    n = 20000
    counts = torch.zeros(8)
    for _ in range(n):
        counts[sampler.read(sampler.next_token(penalised))] += 1
    freq = counts / n
    assert torch.all(freq[probs == 0] == 0)
    assert torch.allclose(freq, probs, atol=0.015), (freq, probs)


def test_sampling_penalty_path_matches_reference_support() -> None:
    # the Sampler's own penalty (not pre-applied) removes the same tokens as the reference
    logits = torch.tensor([2.0, 1.9, 0.0, -4.0, 1.0])
    params = SamplingParams(temperature=1.0, top_p=0.6, repetition_penalty=3.0, seed=0)
    seen = torch.tensor([0])
    allowed = set(torch.nonzero(reference_probs(logits, params, seen)).flatten().tolist())
    for seed in range(50):
        sampler = Sampler(SamplingParams(**{**params.__dict__, "seed": seed}), vocab_size=5, device="cpu")
        sampler.observe(seen)
        assert sampler.read(sampler.next_token(logits)) in allowed


def run_tokens(seed: int | None, steps: int = 200) -> list[int]:
    sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), vocab_size=50, device="cpu")
    return [sampler.read(sampler.next_token(random_logits(50, step, ties=False))) for step in range(steps)]


def test_same_seed_same_tokens() -> None:
    assert run_tokens(7) == run_tokens(7)


def test_different_seed_different_tokens() -> None:
    assert run_tokens(7) != run_tokens(8)


def test_no_seed_is_random() -> None:
    assert run_tokens(None) != run_tokens(None)


# ---- non-finite detection ----------------------------------------------------------------


def bad_logits(kind: str) -> torch.Tensor:
    logits = random_logits(20, 0, ties=False)
    if kind == "nan":
        logits[3] = math.nan
    elif kind == "posinf":
        logits[5] = math.inf
    elif kind == "all_neginf":
        logits[:] = -math.inf
    return logits


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("kind", ["nan", "posinf", "all_neginf"])
def test_non_finite_logits_raise_on_read(kind: str, temperature: float) -> None:
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=5, top_p=0.9, seed=0), vocab_size=20, device="cpu")
    token = sampler.next_token(bad_logits(kind))
    assert 0 <= int(token) < 20  # still a usable id: feeding it to the model cannot crash
    with pytest.raises(GenerationError, match="float32"):
        sampler.read(token)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_bad_step_is_sticky_until_read(temperature: float) -> None:
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0), vocab_size=20, device="cpu")
    sampler.next_token(bad_logits("nan"))
    good = sampler.next_token(bad_logits("none"))
    with pytest.raises(GenerationError):
        sampler.read(good)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_partly_masked_logits_are_fine(temperature: float) -> None:
    logits = random_logits(20, 0, ties=False)
    logits[torch.arange(20) != 4] = -math.inf
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0), vocab_size=20, device="cpu")
    assert sampler.read(sampler.next_token(logits)) == 4


def test_wrong_vocab_size_is_reported() -> None:
    sampler = Sampler(SamplingParams(), vocab_size=20, device="cpu")
    with pytest.raises(GenerationError, match="vocab"):
        sampler.next_token(torch.zeros(21))


def device_greedy_pick(logits: torch.Tensor, banned: list[int]) -> tuple[int, bool]:
    """The pick the sampler makes where the logits live on a GPU: banned ids to -inf, then max()."""
    if banned:
        logits = logits.index_fill(0, torch.tensor(banned), float("-inf"))
    best, token = logits.max(dim=-1)
    return int(token), bool(torch.isfinite(best))


def awkward_logits(seed: int) -> tuple[torch.Tensor, list[int]]:
    """Logits with ties, NaN, ±inf or everything -inf, and banned ids that often hold the maximum."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(torch.randint(1, 600, (1,), generator=g))
    logits = random_logits(vocab, seed, ties=seed % 2 == 0)
    kind = seed % 7
    if kind == 1:
        logits[torch.randint(vocab, (3,), generator=g)] = math.nan
    elif kind == 2:
        logits[torch.randint(vocab, (2,), generator=g)] = math.inf
    elif kind == 3:
        logits[:] = -math.inf
    elif kind == 4:
        logits[torch.rand(vocab, generator=g) < 0.5] = -math.inf
    banned = sorted(set(torch.randint(vocab, (int(seed % 4),), generator=g).tolist()))
    if banned and seed % 3 == 0:
        logits[banned[0]] = logits.max() + 1 if torch.isfinite(logits.max()) else math.nan  # a banned maximum
    return logits, banned


def test_greedy_pick_on_host_equals_the_device_pick() -> None:
    """The CPU's NumPy pick and the GPU's max() agree on the id and on finiteness, whatever the logits."""
    for seed in range(600):
        logits, banned = awkward_logits(seed)
        token, finite = greedy_pick_on_host(logits.numpy(), frozenset(banned))
        want_token, want_finite = device_greedy_pick(logits, banned)
        assert finite == want_finite, seed
        assert 0 <= token < logits.shape[0]
        if want_finite:  # after a NaN or all -inf the id only has to be valid: the answer is refused anyway
            assert token == want_token and token not in banned, seed


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_cpu_greedy_sampler_equals_its_device_path(penalty: float) -> None:
    """A whole greedy run on the CPU's host path picks the same ids and fails on the same step as the
    path a GPU takes (forced here on the CPU)."""
    for seed in range(40):
        params = SamplingParams(repetition_penalty=penalty)
        host = Sampler(params, vocab_size=50, device="cpu", banned_ids=(seed % 50, 7))
        device = Sampler(params, vocab_size=50, device="cpu", banned_ids=(seed % 50, 7))
        device._greedy_on_host = False
        host.observe([1, 2, 3]), device.observe([1, 2, 3])
        for step in range(12):
            logits = random_logits(50, seed * 100 + step, ties=True)
            if seed % 5 == 0 and step == 6:
                logits[11] = math.nan
            outcomes = []
            for sampler in (host, device):
                token = sampler.next_token(logits)
                try:
                    outcomes.append(sampler.read(token))
                except GenerationError:
                    outcomes.append("bad")
            assert outcomes[0] == outcomes[1], (seed, step)


# ---- log-probabilities -------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(logprobs=5),
        SamplingParams(repetition_penalty=1.3, logprobs=5),
        SamplingParams(temperature=1.7, top_k=4, top_p=0.6, repetition_penalty=1.2, seed=3, logprobs=5),
    ],
)
@pytest.mark.parametrize("on_host", [True, False])
def test_logprobs_are_the_raw_log_softmax(params: SamplingParams, on_host: bool) -> None:
    """The model's own distribution, whatever the penalty, temperature and filters do to the pick."""
    sampler = Sampler(params, vocab_size=50, device="cpu", banned_ids=(7,))
    sampler._greedy_on_host = on_host  # the CPU's NumPy pick and the path a GPU takes
    sampler.observe([1, 2, 3])
    for step in range(10):
        logits = random_logits(50, 500 + step, ties=False)
        token_id = sampler.read(sampler.next_token(logits))
        want = logits.float().log_softmax(-1)
        got = sampler.last_logprob
        assert got.token_id == token_id
        assert got.logprob == pytest.approx(float(want[token_id]), abs=1e-6)
        top = torch.topk(want, 5)
        assert [i for i, _ in got.top] == top.indices.tolist()
        assert [v for _, v in got.top] == pytest.approx(top.values.tolist(), abs=1e-6)
        if params.greedy and params.repetition_penalty == 1.0 and got.top[0][0] != 7:
            assert got.top[0] == (token_id, got.logprob)  # greedy: the chosen token is the most likely


def test_logprobs_list_at_most_the_vocabulary_and_zero_lists_none() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0])
    for k, listed in ((20, [1, 2, 0]), (0, [])):
        sampler = Sampler(SamplingParams(logprobs=k), vocab_size=3, device="cpu")
        assert sampler.read(sampler.next_token(logits)) == 1
        assert [i for i, _ in sampler.last_logprob.top] == listed
        assert sampler.last_logprob.logprob == pytest.approx(float(logits.log_softmax(-1)[1]))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_not_asked_for_cost_nothing(monkeypatch, temperature: float) -> None:
    import internvl_chat.chat.sampling as sampling

    def refuse(*_):
        raise AssertionError("log-probabilities were computed though not asked for")

    monkeypatch.setattr(sampling, "logprob_pack", refuse)
    sampler = Sampler(SamplingParams(temperature=temperature, seed=0), vocab_size=50, device="cpu")
    for step in range(3):
        sampler.read(sampler.next_token(random_logits(50, step, ties=False)))
    assert sampler.last_logprob is None


# ---- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.01),
        ("top_k", -1),
        ("top_k", 2.5),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("max_new_tokens", 0),
        ("seed", "abc"),
        ("seed", -1),
        ("seed", 2**63),  # beyond every torch generator: refused here, not at the first draw
        ("stop_ids", (1, -2)),
        ("logprobs", -1),
        ("logprobs", 21),  # OpenAI's top_logprobs range is 0-20
        ("logprobs", True),
    ],
)
def test_validate_rejects(field: str, value: object) -> None:
    with pytest.raises(UsageError, match=field):
        SamplingParams(**{field: value}).validate()


def test_banned_ids_are_never_picked() -> None:
    """Image placeholders must never appear in an answer, however much the model favours them."""
    logits = torch.zeros(10)
    logits[7], logits[3], logits[5] = 50.0, 40.0, 1.0
    greedy = Sampler(SamplingParams(), vocab_size=10, device="cpu", banned_ids=(7, 3, 99))
    assert greedy.read(greedy.next_token(logits)) == 5
    sampled = Sampler(SamplingParams(temperature=1.0, seed=0), vocab_size=10, device="cpu", banned_ids=[7, 3])
    drawn = {sampled.read(sampled.next_token(logits)) for _ in range(200)}
    assert drawn and not drawn & {3, 7}
    assert Sampler(SamplingParams(), vocab_size=10, device="cpu").read(Sampler(SamplingParams(), 10, "cpu").next_token(logits)) == 7


def test_validate_accepts_defaults_and_edges() -> None:
    SamplingParams().validate()
    SamplingParams(seed=2**63 - 1).validate()
    SamplingParams(temperature=0, top_p=1.0, top_k=0, repetition_penalty=0.5, max_new_tokens=1, seed=0).validate()
    with pytest.raises(UsageError):
        Sampler(SamplingParams(top_p=2.0), vocab_size=10, device="cpu")


# ---- CUDA: the decode step never synchronises with the host -------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.2),
        SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=0),
        SamplingParams(logprobs=5),
        SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.1, seed=0, logprobs=20),
    ],
)
def test_next_token_does_not_sync_on_cuda(params: SamplingParams) -> None:
    vocab = 151674
    sampler = Sampler(params, vocab_size=vocab, device="cuda")
    prompt = torch.randint(0, vocab, (300,), device="cuda")
    logits = torch.randn(vocab, device="cuda") * 4
    sampler.observe(prompt)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = [sampler.next_token(logits)]
        for _ in range(5):
            tokens.append(sampler.next_token(logits))
            sampler.observe(tokens[-1])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ids = [sampler.read(t) for t in tokens]
    assert all(0 <= i < vocab for i in ids)
    if params.greedy and params.repetition_penalty == 1.0:
        assert ids == [int(torch.argmax(logits.cpu()))] * 6

"""The sampler: the one-launch draw kernel (kernels.sorted_sample) against its reference under the interpreter,
the candidate path against the full-vocabulary path, the drawn distribution against the exact one, greedy ids,
batch independence, and the host-side choice of path."""
from __future__ import annotations

import math

import pytest
import torch

from omni_rt import sampling
from omni_rt.kernels import force_triton
from omni_rt.kernels.sorted_sample import counter_bits, gumbel_from_bits, sorted_sample, sorted_sample_ref
from omni_rt.request import SamplingParams


def _params(b, seed=0, vocab=1000):
    g = torch.Generator().manual_seed(seed)
    temp = torch.rand(b, generator=g) + 0.3
    temp[::5] = 0.0                                          # greedy rows mixed in
    top_k = torch.randint(0, vocab + 20, (b,), generator=g)  # 0 (off), in range, and above the vocabulary
    top_k[1::4] = torch.randint(1, 8, (len(top_k[1::4]),), generator=g)
    top_p = torch.rand(b, generator=g) * 0.95 + 0.05
    top_p[::3] = 1.0
    seeds = torch.randint(0, 2**62, (b,), generator=g)
    steps = torch.randint(0, 2**31, (b,), generator=g)
    return temp, top_k, top_p, seeds, steps


def _sorted(scores):
    vals, idx = scores.sort(dim=-1, descending=True)
    return vals, idx, scores


@pytest.mark.parametrize("b,n", [(1, 1), (3, 37), (6, 256), (5, 1500)])
def test_kernel_equals_reference(b, n):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(b, n, generator=g) * 4
    if n > 3:
        scores[0, 2:n // 2] = float("-inf")                  # suppressed ids
    vals, idx, _ = _sorted(scores)
    temp, top_k, top_p, seeds, steps = _params(b, seed=n, vocab=max(n, 1))
    want = sorted_sample_ref(vals, idx, scores, temp, top_k, top_p, seeds, steps, 3)
    with force_triton():
        got = sorted_sample(vals, idx, scores, temp, top_k, top_p, seeds, steps, 3)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    assert torch.equal(got[temp == 0], scores.argmax(-1)[temp == 0])


def test_kernel_strided_inputs_and_dead_rows():
    g = torch.Generator().manual_seed(7)
    big = torch.randn(4, 2 * 300, generator=g)
    scores = big[:, ::2]                                     # strided along the candidates: copied by the launcher
    scores[2] = float("-inf")                                # nothing drawable: the greedy id comes back
    vals_c, idx_c = scores.sort(dim=-1, descending=True)
    vals = torch.empty(4, 400)[:, :300]                      # strided along the batch
    vals.copy_(vals_c)
    idx = idx_c
    temp = torch.tensor([0.7, 1.0, 1.3, 0.0])
    top_k, top_p = torch.tensor([0, 50, 3, 0]), torch.tensor([0.9, 1.0, 0.5, 1.0])
    seeds, steps = torch.tensor([1, 2, 3, 4]), torch.tensor([9, 9, 9, 9])
    want = sorted_sample_ref(vals, idx, scores, temp, top_k, top_p, seeds, steps)
    with force_triton():
        got = sorted_sample(vals, idx, scores, temp, top_k, top_p, seeds, steps)
    assert torch.equal(got, want)
    assert got[2] == 0 and got[3] == scores[3].argmax()   # all -inf: torch.argmax's 0


@pytest.mark.parametrize("forced", [False, True], ids=["torch", "triton-interpreter"])
def test_greedy_ties_take_the_first_id_even_past_the_candidates(forced):
    """torch.argmax's first index among ties: from the candidates when the tie run is shorter than them, from a
    scan of the scores row when it fills them (all equal logits; topk picks arbitrary tied ids)."""
    scores = torch.zeros(3, 600)
    scores[0, [400, 20, 555]] = 2.0                       # a 3-way tie inside the candidates
    scores[1, :] = 1.0                                    # a 600-way tie: topk's 64 candidates miss id 0 maybe
    scores[2, 300:] = 5.0                                 # a 300-way tie starting at 300
    # the top 64 with tied ids in the worst order topk could give them (descending id)
    idx = (scores + torch.arange(600) / 1000).topk(64).indices
    vals = scores.gather(1, idx)
    z = torch.zeros(3)
    args = (z, torch.zeros(3, dtype=torch.long), torch.ones(3), torch.zeros(3, dtype=torch.long),
            torch.zeros(3, dtype=torch.long))
    with force_triton(forced):
        got = sorted_sample(vals, idx, scores, *args)
    assert got.tolist() == [20, 0, 300]


def test_gumbel_noise_is_float32_and_standard():
    seeds, steps = torch.tensor([11, 2**40 + 3]), torch.tensor([0, 5])
    h = counter_bits(seeds, steps, torch.arange(200_000).expand(2, -1))
    g = gumbel_from_bits(h)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    # Gumbel(0, 1): mean = Euler-Mascheroni 0.5772, variance pi^2/6; 4e5 draws, tolerances ~6 sigma
    assert abs(g.mean().item() - 0.5772) < 6 * 1.28 / math.sqrt(g.numel())
    assert abs(g.var().item() - math.pi ** 2 / 6) < 0.03
    # the hash is the counter_uniform one: the same (seed, step, column) → the same noise at any batch size
    assert torch.equal(counter_bits(seeds[1:], steps[1:], torch.arange(7)[None]), h[1:, :7])


def _exact_distribution(logits, temp, top_k, top_p):
    """transformers' warpers on one row in float64 (the test's truth, not runtime code)."""
    x = logits.double() / temp
    if top_k:
        kth = x.sort(descending=True).values[top_k - 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1:
        asc, order = x.sort()
        cum = asc.softmax(0).cumsum(0)
        remove = cum <= 1 - top_p
        remove[-1] = False
        x = x.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return x.softmax(0)


@pytest.mark.parametrize("temp,top_k,top_p", [(1.0, 0, 1.0), (0.7, 12, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.6)])
def test_drawn_distribution_matches_the_exact_one(temp, top_k, top_p):
    """20,000 draws (one seed, steps 0..N-1) of a fixed 40-token row against the exact distribution: a chi-square
    below its 1e-6 quantile, no draw outside the support. A sampler that ignored the temperature, top-k or top-p
    (or drew uniformly among the kept ids) would exceed the bound by orders of magnitude."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, generator=g) * 2
    n = 20_000
    scores = logits.expand(n, -1)
    vals, idx = scores.topk(sampling.CANDIDATES if 40 > sampling.CANDIDATES else 40, dim=-1)
    full = lambda v: torch.full((n,), v)  # noqa: E731
    ids = sorted_sample_ref(vals, idx, scores, full(temp), full(top_k), full(top_p), full(12345),
                            torch.arange(n))
    probs = _exact_distribution(logits, temp, top_k, top_p)
    counts = torch.bincount(ids, minlength=40).double()
    assert counts[probs == 0].sum() == 0, "drew an id outside the kept set"
    support = probs > 0
    expected = probs[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum().item()
    dof = int(support.sum()) - 1
    z = 4.753  # one-sided 1e-6 normal quantile; Wilson-Hilferty approximation of the chi-square quantile
    bound = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3 if dof > 0 else 0.0
    assert chi2 <= bound, (chi2, bound, dof)
    # and the bound has teeth: the same counts against a 50% hotter, unfiltered softmax fail it by far
    wrong = (logits.double() / (1.5 * temp)).softmax(0)
    chi2_wrong = ((counts - wrong * n) ** 2 / (wrong * n)).sum().item()
    assert chi2_wrong > 3 * bound


def _st(temp, top_k, top_p, seeds, steps, **kw):
    return sampling.SamplingTensors(temperature=temp, top_k=top_k, top_p=top_p,
                                    repetition_penalty=torch.ones_like(temp), seeds=seeds, steps=steps, **kw)


def test_candidate_path_equals_the_full_vocabulary_path():
    """Rows with 1 <= top_k <= CANDIDATES draw the same ids from the top CANDIDATES as from the whole sorted
    vocabulary: the same survivors, the same noise per token id. (Summation order may differ, so a top-p
    boundary within an ulp could flip: allow a handful over 400 draws.)"""
    b, vocab = 400, 3000
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(b, vocab, generator=g) * 3
    temp, _, top_p, seeds, steps = _params(b, seed=5, vocab=vocab)
    top_k = torch.randint(1, sampling.CANDIDATES + 1, (b,), generator=g)
    cand = sampling.sample(logits, _st(temp, top_k, top_p, seeds, steps, within_cap=True))
    full = sampling.sample(logits, _st(temp, top_k, top_p, seeds, steps))
    assert (cand != full).sum() <= 2
    with force_triton():
        cand_triton = sampling.sample(logits[:24], _st(temp[:24], top_k[:24], top_p[:24], seeds[:24], steps[:24],
                                                       within_cap=True))
    assert torch.equal(cand_triton, cand[:24])


def test_greedy_rows_take_the_first_argmax_and_samples_ignore_batch_mates():
    logits = torch.zeros(3, 500)
    logits[0, [7, 300]] = 5.0                                 # a tie: the first index wins, as torch.argmax
    logits[1, 499] = 1.0
    logits[2] = torch.randn(500)
    temp = torch.tensor([0.0, 0.0, 0.8])
    top_k, top_p = torch.tensor([0, 5, 40]), torch.tensor([1.0, 0.5, 0.9])
    seeds, steps = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    for within in (None, True):
        ids = sampling.sample(logits, _st(temp, top_k, top_p, seeds, steps, within_cap=within))
        assert ids[:2].tolist() == [7, 499]
        alone = sampling.sample(logits[2:], _st(temp[2:], top_k[2:], top_p[2:], seeds[2:], steps[2:],
                                                within_cap=within))
        assert ids[2] == alone[0]
    st = sampling.SamplingTensors.build([SamplingParams(temperature=0.0, top_k=0, top_p=1.0,
                                                        repetition_penalty=1.0)] * 3, [0] * 3, [0] * 3, "cpu")
    assert st.all_greedy and torch.equal(sampling.sample(logits, st)[:2], ids[:2])


def test_repetition_penalty_and_suppression_still_apply():
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5]])
    seen = torch.tensor([[True, False, True, False]])
    suppress = torch.tensor([False, True, False, False])
    st = _st(torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1), torch.zeros(1, dtype=torch.long),
             torch.zeros(1, dtype=torch.long))
    st.repetition_penalty = torch.tensor([10.0])
    # 3.0 → 0.3 (seen), 2.9 suppressed, -1 → -10 (seen): the argmax is id 3
    assert sampling.sample(logits, st, seen, suppress).tolist() == [3]
    st.temperature = torch.ones(1)
    for step in range(20):           # sampled: the suppressed id never comes out
        st.steps = torch.tensor([step])
        assert sampling.sample(logits, st, seen, suppress).item() != 1


def test_path_choice_is_host_side():
    p = lambda t, k: SamplingParams(temperature=t, top_k=k, top_p=1.0, repetition_penalty=1.0)  # noqa: E731
    cap = sampling.CANDIDATES
    assert sampling.params_within_cap([p(0.7, 50), p(0.0, 0), p(1.0, cap)])
    assert not sampling.params_within_cap([p(0.7, 50), p(0.7, 0)])
    assert not sampling.params_within_cap([p(0.7, cap + 1)])
    st = sampling.SamplingTensors.build([p(0.7, 0)], [0], [0], "cpu")
    assert st.within_cap is False and st.all_greedy is False


@pytest.mark.gpu
def test_gpu_kernel_equals_reference_at_the_thinker_vocabulary():
    b, vocab = 8, 151936
    scores = torch.randn(b, vocab, device="cuda") * 4
    temp, top_k, top_p, seeds, steps = (t.cuda() for t in _params(b, vocab=vocab))
    for vals, idx in (scores.topk(sampling.CANDIDATES), scores.sort(descending=True)):
        got = sorted_sample(vals, idx, scores, temp, top_k.clamp(max=vals.shape[1]), top_p, seeds, steps)
        want = sorted_sample_ref(vals, idx, scores, temp, top_k.clamp(max=vals.shape[1]), top_p, seeds, steps)
        assert (got != want).sum() <= 1   # fp32 exp/log on the device may round a near-tie differently


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,n", [(1, 1), (3, 1031), (2, 2048)])
def test_logits_process_kernel_equals_reference(dtype, b, n):
    from omni_rt.kernels.logits_process import logits_process, logits_process_ref

    g = torch.Generator().manual_seed(n)
    logits = (torch.randn(b, n + 5, generator=g) * 3).to(dtype)[:, 2:2 + n]      # strided rows
    seen = torch.rand(b, n, generator=g) < 0.3
    penalty = torch.rand(b, generator=g) + 1.0
    suppress = torch.rand(n, generator=g) < 0.1
    for args in ((seen, penalty, None), (None, None, suppress), (seen, penalty, suppress), (None, None, None)):
        want = logits_process_ref(logits, *args)
        with force_triton():
            got = logits_process(logits, *args)
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_half_precision_candidates_draw_as_their_fp32_cast():
    """The code predictor's bf16 logits go to topk and the draw kernel as they are: the same ids as fp32."""
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(5, 700, generator=g) * 3).to(torch.bfloat16)
    temp, top_k, top_p, seeds, steps = _params(5, seed=11, vocab=700)
    top_k = top_k.clamp(1, 200)
    for lg in (logits, logits.float()):
        vals, idx = lg.topk(256)
        want = sorted_sample_ref(vals.float(), idx, lg.float(), temp, top_k, top_p, seeds, steps)
        with force_triton():
            got = sorted_sample(vals, idx, lg, temp, top_k, top_p, seeds, steps)
        assert torch.equal(got, want)
    st = _st(temp, top_k, top_p, seeds, steps, within_cap=True)
    assert torch.equal(sampling.sample(logits, st), sampling.sample(logits.float(), st))


@pytest.mark.gpu
def test_gpu_logits_process_equals_reference():
    from omni_rt.kernels.logits_process import logits_process, logits_process_ref

    logits = torch.randn(4, 151936, device="cuda").to(torch.bfloat16)
    seen = torch.rand(4, 151936, device="cuda") < 0.05
    penalty = torch.tensor([1.0, 1.05, 1.3, 2.0], device="cuda")
    suppress = torch.rand(151936, device="cuda") < 0.01
    assert torch.equal(logits_process(logits, seen, penalty, suppress),
                       logits_process_ref(logits, seen, penalty, suppress))

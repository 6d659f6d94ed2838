"""Kappa rules in isolation."""
import pytest
import torch

from superdiff_protein.core.kappa import AndRule, AverageRule, OrRule, SingleRule, make_rule


def _rand(b=8, m=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, m, 5, generator=g, dtype=torch.float64)
    A = 0.01 * s @ s.transpose(-1, -2)
    return torch.randn(b, m, generator=g, dtype=torch.float64), A, torch.randn(b, m, generator=g, dtype=torch.float64)


def test_or_is_tempered_biased_softmax():
    logq, A, b = _rand()
    k = OrRule(temperature=2.0, bias=[0.0, 1.0, -1.0])(logq, A, b, 0.01)
    ref = torch.softmax(2 * logq + torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64), -1)
    assert torch.allclose(k, ref)
    hot = OrRule(temperature=1e6)(logq, A, b, 0.01)
    assert torch.equal(hot.argmax(-1), logq.argmax(-1)) and torch.allclose(hot.max(-1).values, torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("m", [2, 3, 5])
def test_and_solves_equal_increments(m):
    logq, A, b = _rand(m=m, seed=m)
    l = torch.linspace(-1, 1, m, dtype=torch.float64)
    k = AndRule(bias=l.tolist())(logq, A, b, 0.25)
    assert torch.allclose(k.sum(-1), torch.ones(8, dtype=torch.float64), atol=1e-10)
    d = (A @ k[..., None]).squeeze(-1) + b
    assert torch.allclose(d - d[:, :1], (l - l[0]) * 0.25, atol=1e-6)


def test_and_degenerate_scores_stay_finite():
    logq = torch.zeros(2, 2, dtype=torch.float64)
    A = torch.ones(2, 2, 2, dtype=torch.float64)  # identical scores
    b = torch.zeros(2, 2, dtype=torch.float64)
    k = AndRule()(logq, A, b, 0.1)
    assert torch.isfinite(k).all() and torch.allclose(k, torch.full_like(k, 0.5))


def test_average_single_and_errors():
    logq, A, b = _rand()
    assert torch.allclose(AverageRule()(logq, A, b, 0.1), torch.full((8, 3), 1 / 3, dtype=torch.float64))
    assert torch.allclose(AverageRule([0.2, 0.3, 0.5])(logq, A, b, 0.1)[0], torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    assert SingleRule(2)(logq, A, b, 0.1)[:, 2].eq(1).all()
    with pytest.raises(ValueError):
        SingleRule(5)(logq, A, b, 0.1)
    with pytest.raises(ValueError):
        OrRule(temperature=0.0)
    with pytest.raises(ValueError):
        OrRule(bias=[1.0])(logq, A, b, 0.1)
    with pytest.raises(ValueError):
        make_rule("xor")
    assert isinstance(make_rule("AND"), AndRule)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 3.7])
def test_or_bias_conventions_shift_the_odds_exactly(T):
    """The odds kappa_j / kappa_i of OR at bias l against l = 0: e^{l_j - l_i} with Algorithm 1's
    softmax(T log q + l), e^{T (l_j - l_i)} with the official code's softmax(T (log q + l)). Exact identities of
    the softmax, checked in float64 to rounding."""
    logq, A, b = _rand(b=16, m=3, seed=3)
    logq = 40.0 * logq                                         # separated models: kappa far from uniform
    l = torch.tensor([0.0, 0.7, -1.3], dtype=torch.float64)
    base = OrRule(temperature=T)(logq, A, b, 0.1)
    for conv, factor in (("algorithm1", 1.0), ("official", T)):
        k = make_rule("or", temperature=T, bias=l.tolist(), bias_convention=conv)(logq, A, b, 0.1)
        shift = (k.log() - k[:, :1].log()) - (base.log() - base[:, :1].log())       # log odds vs model 1
        torch.testing.assert_close(shift, (factor * (l - l[0])).expand_as(shift), rtol=0, atol=1e-9)
        # and each convention is the formula it names
        ref = torch.softmax(T * logq + l, -1) if conv == "algorithm1" else torch.softmax(T * (logq + l), -1)
        torch.testing.assert_close(k, ref, rtol=0, atol=0)
    # without a bias, or at T = 1, the two conventions are the same rule
    a1 = make_rule("or", temperature=T, bias=None, bias_convention="algorithm1")(logq, A, b, 0.1)
    assert torch.equal(a1, make_rule("or", temperature=T, bias=None, bias_convention="official")(logq, A, b, 0.1))
    if T == 1.0:
        torch.testing.assert_close(make_rule("or", bias=l.tolist(), bias_convention="official")(logq, A, b, 0.1),
                                   make_rule("or", bias=l.tolist())(logq, A, b, 0.1), rtol=0, atol=1e-15)


def test_or_bias_convention_is_validated_and_described():
    with pytest.raises(ValueError, match="bias_convention"):
        OrRule(bias_convention="inside")
    assert "bias_convention" not in OrRule().describe()                     # default runs describe as before
    assert OrRule(bias_convention="official").describe()["bias_convention"] == "official"
    assert make_rule("or").bias_convention == "algorithm1"

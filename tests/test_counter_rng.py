"""rng="counter" (core/counter_rng.py): noise as a hash of (seed, step, stream, element), drawn for the batch at
once. It must be standard normal, independent across samples, steps and streams, batch-size independent, and
sample the right distribution through the sampler."""
import math

import pytest
import torch

from models.analytic import frame_mixture_model, gaussian_mixture_model
from superdiff_protein.core.counter_rng import counter_normal, seeds_tensor
from superdiff_protein.core.fkc import ProductRule
from superdiff_protein.core.igso3 import sample_uniform_so3
from superdiff_protein.core.kappa import OrRule, SingleRule
from superdiff_protein.core.sampler import SamplerConfig, superpose
from superdiff_protein.core.smc import SMCConfig


def test_moments_and_independence():
    s = seeds_tensor(range(2000), "cpu")
    z = counter_normal(s, 7, 0, (50, 3))
    n = z.numel()
    se = 1 / math.sqrt(n)
    assert abs(float(z.mean())) < 5 * se
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2) * se
    assert abs(float((z ** 4).mean()) - 3) < 5 * math.sqrt(96) * se            # var(z^4) = 105 - 9
    for other in (counter_normal(s, 8, 0, (50, 3)), counter_normal(s, 7, 1, (50, 3)),
                  torch.roll(z, 1, 0), torch.roll(z.flatten(1), 1, 1).reshape(z.shape)):
        assert abs(float((z * other).mean())) < 5 * se
    # Kolmogorov-Smirnov against N(0, 1) at the 0.1 % level
    x = torch.sort(z.flatten())[0]
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    ks = float((cdf - torch.arange(1, n + 1, dtype=torch.float64) / n).abs().max())
    assert ks < 1.95 / math.sqrt(n)


def test_rows_depend_only_on_their_seed():
    s = seeds_tensor([5, 2**62 + 3, 17, 2**63 - 1], "cpu")
    full = counter_normal(s, 3, 2, (4, 3))
    for b in range(4):
        assert torch.equal(counter_normal(s[b:b + 1], 3, 2, (4, 3))[0], full[b])
    assert counter_normal(s, torch.tensor(3), 2, (4, 3)).equal(full)           # the step as a 0-d tensor


def _frames():
    g = torch.Generator().manual_seed(0)
    return [frame_mixture_model(sample_uniform_so3((2, 4), generator=g),
                                torch.randn(2, 4, 3, generator=g, dtype=torch.float64), 0.05, name=f"f{i}")
            for i in range(2)]


@pytest.mark.parametrize("estimator", ["ito", "hutchinson"])
def test_sampler_is_batch_size_independent_and_deterministic(estimator):
    f1, f2 = _frames()
    cfg = SamplerConfig(num_steps=15, min_t=0.01, rng="counter", estimator=estimator, noise_scale=0.5)
    sh = {"rot": (4,), "trans": (4, 3)}
    seeds = list(range(6))
    with _quiet():
        whole = superpose(f1.space, [f1, f2], OrRule(), cfg, seeds, sh)
        part = superpose(f1.space, [f1, f2], OrRule(), cfg, seeds[2:5], sh)
        again = superpose(f1.space, [f1, f2], OrRule(), cfg, seeds, sh)
    # batched float64 rotation algebra rounds differently by batch size (a few ulp; the generator streams
    # show the same), so equality is to 1e-12 across batch sizes and exact for a rerun
    for k in sh:
        assert torch.allclose(whole.x[k][2:5], part.x[k], atol=1e-12, rtol=0) and torch.equal(whole.x[k], again.x[k])
    assert torch.allclose(whole.logq[2:5], part.logq, atol=1e-9, rtol=0)
    stream = superpose(f1.space, [f1, f2], OrRule(), SamplerConfig(num_steps=15, min_t=0.01, estimator=estimator,
                                                                   noise_scale=0.5), seeds, sh)
    assert not torch.equal(stream.x["trans"], whole.x["trans"])                  # another stream, other samples


class _quiet:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *a):
        return self._w.__exit__(*a)


def test_sampler_with_counter_noise_hits_the_data_variance():
    """One exact Gaussian N(0.3, 0.5): samples at min_t have variance 0.5 (+ sigma(min_t)^2) within 4 SE."""
    m = gaussian_mixture_model([[0.3]], 0.5)
    seeds = list(range(3000))
    r = superpose(m.space, [m], SingleRule(), SamplerConfig(num_steps=200, min_t=1e-3, rng="counter"), seeds,
                  {"x": (1,)})
    x = r.x["x"][:, 0]
    target = 0.5
    se = target * math.sqrt(2 / len(seeds))
    assert abs(float(x.var()) - target) < 4 * se + 0.02, float(x.var())   # 0.02: Euler bias at 200 steps
    assert abs(float(x.mean()) - 0.3) < 4 * math.sqrt(target / len(seeds)) + 0.01


def test_fkc_resampling_with_counter_noise_is_deterministic():
    f1, f2 = _frames()
    cfg = SamplerConfig(num_steps=10, min_t=0.01, rng="counter")
    sh = {"rot": (4,), "trans": (4, 3)}
    a = superpose(f1.space, [f1, f2], ProductRule(), cfg, list(range(8)), sh, smc=SMCConfig(group_size=4,
                                                                                            ess_threshold=1.0))
    b = superpose(f1.space, [f1, f2], ProductRule(), cfg, list(range(4, 8)), sh, smc=SMCConfig(group_size=4,
                                                                                               ess_threshold=1.0))
    assert torch.allclose(a.x["trans"][4:], b.x["trans"], atol=1e-12, rtol=0)
    assert torch.equal(a.ancestor[4:] - 4, b.ancestor)


def test_bad_rng_name():
    with pytest.raises(ValueError, match="rng"):
        SamplerConfig(rng="philox").validate()


def test_generate_backbones_rng_counter_pdbs_do_not_depend_on_batch_size(tmp_path):
    from superdiff_protein.frames.generation import generate
    pdbs = {}
    for bs in (2, 4):
        out = tmp_path / f"bs{bs}"
        generate(models=["exact-helix", "exact-strand"], rng="counter", lengths=[12], samples_per_length=4,
                 batch_size=bs, num_steps=8, out_dir=str(out), progress=False, plots=False, device="cpu")
        pdbs[bs] = [(out / "length_12" / f"sample_{i}.pdb").read_bytes() for i in range(4)]
    assert pdbs[2] == pdbs[4]

"""The exact frame models' own log-densities (``log_density``, the hook behind ``init_logq=model``), issue 13:
on the centred translation space they are densities w.r.t. the same measure as the space's prior, so the
Itô-tracked log-density started from them ends at the exact value (error shrinking with the step count)."""
import math

import torch

from models.exact_frames import load_exact_model
from superdiff_protein.core.kappa import SingleRule
from superdiff_protein.core.sampler import SamplerConfig, superpose


def test_components_add_up_to_the_centred_joint():
    m = load_exact_model("exact-helix")
    x = m.space.sample_prior(3, {"rot": (6,), "trans": (6, 3)}, None)
    t = torch.full((3,), 0.4, dtype=torch.float64)
    ld = m.log_density(x, t)
    var = m._terms(x, t)[5].reshape(-1)
    joint = m.log_prob(x, t) + 1.5 * torch.log(2 * math.pi * var)     # the centre's 3-d Gaussian removed
    assert torch.allclose(ld["rot"] + ld["trans"], joint, atol=1e-9 * (1 + float(joint.abs().max())), rtol=0)


def test_tracked_log_density_from_the_exact_start_reaches_the_exact_end():
    """Without the centred-subspace normalisation the mean error would sit near 1.5 log(var(1)/var(min_t))
    (about 5 nats here); with it the mean error falls towards 0 as the steps grow."""
    m = load_exact_model("exact-helix")
    seeds, N, min_t = list(range(12)), 6, 0.05
    t_end = torch.full((len(seeds),), min_t, dtype=torch.float64)
    v1 = float(m._terms(m.space.sample_prior(1, {"rot": (N,), "trans": (N, 3)}, None),
                        torch.ones(1, dtype=torch.float64))[5].reshape(-1)[0])
    errs = []
    for steps in (100, 800):
        r = superpose(m.space, [m], SingleRule(), SamplerConfig(num_steps=steps, min_t=min_t, init_logq="model"),
                      seeds, {"rot": (N,), "trans": (N, 3)})
        ld = m.log_density(r.x, t_end)
        errs.append(float((r.logq[:, :, 0].sum(1) - (ld["rot"] + ld["trans"])).mean()))
    offset = 1.5 * abs(math.log(v1 / float(m._terms(r.x, t_end)[5].reshape(-1)[0])))
    assert abs(errs[1]) < abs(errs[0]) and abs(errs[1]) < 0.5 * offset, (errs, offset)

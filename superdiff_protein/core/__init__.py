"""The manifold-agnostic core: state spaces, IGSO(3), kappa rules, the score-model protocol and the sampler."""

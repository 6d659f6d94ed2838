"""The protein side: the SE(3) diffuser, backbone geometry, PDB I/O, datasets, checkpoint loading, the model registry,
and a generation run (its options' schema, plan, model loading and batch loop: ``generation.generate``)."""

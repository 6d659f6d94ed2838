"""The protein side: the SE(3) diffuser, backbone geometry, PDB I/O, datasets, checkpoint loading, the model registry."""

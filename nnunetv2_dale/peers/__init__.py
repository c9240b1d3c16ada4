"""Published noisy-label losses (``losses``: SVLS, GCE, T-Loss) as nnU-Net trainers (``trainers``),
the peers DALE is benchmarked against."""

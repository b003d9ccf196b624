"""Models trained by the experiments; each maps a batch to unnormalized log-densities ``(N,)``."""

"""Training: the loop, what trains (trainables), the denoiser adapter, evaluation, the run folder."""

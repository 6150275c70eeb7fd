"""Loading Stable Diffusion checkpoints, the model families' table, and the text conditioning."""

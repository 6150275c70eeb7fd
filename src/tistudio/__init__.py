"""tistudio: learn a new word for Stable Diffusion from a few photos (textual inversion), then use it."""

import os

__version__ = "0.1.0"

# Bit-exact resume needs the same numbers from the same inputs in every process. Intel MKL (PyTorch's CPU matrix
# library) may pick its code path by the memory alignment of each array, so two runs of the same step can differ in
# the last bit; its Conditional Numerical Reproducibility mode fixes the path. MKL reads this when it starts (its
# first call), so it is set here, before anything tistudio does can call it; a value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO")

"""sdexplore: look inside Stable Diffusion."""

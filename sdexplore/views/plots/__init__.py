"""Matplotlib figures over sdexplore result objects (they never touch a pipeline)."""

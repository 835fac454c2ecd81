"""The views layer: HTML pages, notebook widgets, matplotlib figures and exports built from results."""

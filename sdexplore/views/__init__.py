"""The views layer: everything that shows a recorded run — nothing here captures one.

``render`` turns results into pictures (previews, decoded steps, heat-map overlays), ``plots`` draws matplotlib
figures, ``widgets`` holds the notebook explorers, ``export`` writes frames as GIF, MP4 and PNG files (and ``pages``
writes self-contained HTML pages). Views read result objects (:mod:`sdexplore.results`) and never reach into a
pipeline or the attachment; the command line (:mod:`sdexplore.cli`) sits beside them. This package imports nothing
on its own, so ``import sdexplore.views.export`` stays light.
"""

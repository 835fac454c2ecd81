"""Recording and steering: the attachment (the one owner of every change to a pipeline) and its subscribers.

- :mod:`.attach` — :class:`~.attach.Attachment`: hooks, wrappers and processor swaps, one run per top-level call;
- :mod:`.steps` — :class:`~.steps.StepRecorder` and :class:`~.steps.StepConfig`;
- :mod:`.attention` — :class:`~.attention.AttentionRecorder` and its capturing processor (:mod:`.processor`);
- :mod:`.steering` — prompt switches, guidance schedules, latent edits, early stops;
- :mod:`.control` — :class:`~.control.Control` and its attention edits (word swap, refinement, reweight, ablation, local
  blend), which
  change attention probabilities through the attachment's controlled processor (:mod:`.processor`);
- :mod:`.observe` — :func:`~.observe.observe`, all of them around one ``with`` block.

Recorders never patch anything themselves: they subscribe to the attachment with callables.
"""

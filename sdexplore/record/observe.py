"""observe(pipe, steps=..., attention=...): one context manager around the user's own call, all recorders."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from ..errors import InvalidArgumentError
from ..results.observation import Observation
from .steps import StepRecorder


class _Observe:
    """The context manager :func:`observe` returns: one attachment, its subscribers entered and left together."""

    def __init__(
        self,
        pipe: Any,
        steps: bool | dict,
        attention: bool | dict,
        options: dict[str, Any],
        control: Any = None,
    ) -> None:
        for name, value in (("steps", steps), ("attention", attention)):
            if not isinstance(value, (bool, dict)):
                raise InvalidArgumentError(
                    f"observe({name}=...) takes True, False or a dict of options, got {value!r}."
                )
        if not steps and not attention:
            raise InvalidArgumentError(
                "observe() needs steps=True and/or attention=True (or a dict of their options)."
            )
        if options and not steps:
            raise InvalidArgumentError(
                f"Step options {sorted(options)} given with steps=False; pass steps=True or drop them."
            )
        self._control = None
        if control is not None:
            from .control import Control  # lazily: only controls need it

            edits = list(control) if isinstance(control, (list, tuple)) else [control]
            self._control = Control(pipe, *edits)  # checks the family and the edits before any change
        step_opts = {**(steps if isinstance(steps, dict) else {}), **options}
        self._step_recorder = StepRecorder(pipe, **step_opts) if steps else None
        self._attention_recorder = None
        if attention:
            from .attention import AttentionRecorder  # lazily: steps work without the attention code

            self._attention_recorder = AttentionRecorder(
                pipe, **(attention if isinstance(attention, dict) else {})
            )
        self._stack: ExitStack | None = None
        self.observation = Observation(_attention_recorder=self._attention_recorder)

    def __enter__(self) -> Observation:
        if self._stack is not None:
            raise InvalidArgumentError(
                "This observe(...) block is already active; leave it before entering it again."
            )
        with ExitStack() as stack:
            if self._control is not None:
                stack.enter_context(self._control)
            if self._attention_recorder is not None:
                stack.enter_context(self._attention_recorder)
            if self._step_recorder is not None:
                stack.enter_context(self._step_recorder)
                self.observation.runs = self._step_recorder.traces
            self._stack = stack.pop_all()
        return self.observation

    def __exit__(self, *exc: Any) -> bool | None:
        assert self._stack is not None
        stack, self._stack = self._stack, None
        try:
            return stack.__exit__(*exc)
        finally:
            rec = self._attention_recorder
            if rec is not None:
                self.observation._attention = rec._maps  # the latest run's maps, or None without a run
                self.observation._attention_recorder = None


def observe(
    pipe: Any,
    steps: bool | dict = True,
    attention: bool | dict = False,
    *,
    control: Any = None,
    **options: Any,
) -> _Observe:
    """Observe the pipeline calls made inside a ``with`` block; yields an :class:`Observation`.

    ::

        with sdexplore.observe(pipe, steps=True, attention=True) as obs:
            image = pipe("a big red circle", generator=torch.Generator().manual_seed(0)).images[0]
        obs.steps[10].x0, obs.steps[-1].preview, obs.attention.word("circle")

    ``steps``: True or a dict of :class:`~sdexplore.record.steps.StepRecorder` options; extra keyword ``options`` go to
    the step recorder too (``quantities``, ``every``, ``on_step``, steering such as ``stop_at``...).
    ``attention``: True or a dict of ``sdexplore.record.attention.AttentionRecorder`` options.
    ``control``: an attention edit (:class:`~sdexplore.Reweight`, :class:`~sdexplore.WordSwap`) or a list of
    them, applied to every call in the block (as :class:`~sdexplore.Control` does); the recorded maps are then the
    edited probabilities.
    Each top-level ``pipe(...)`` call in the block is one run (``obs.runs``); ``pipe.encode_prompt``,
    ``sdexplore.inspect_prompt`` or ``sdexplore.set_scheduler`` inside the block never disturb what was
    recorded. The pipeline is restored exactly on exit, also after an exception or KeyboardInterrupt.
    """
    return _Observe(pipe, steps, attention, options, control)

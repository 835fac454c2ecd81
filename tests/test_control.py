"""Attention controls on the tiny random SD1 / SDXL pipelines: structure, not meaning (tests/test_edit.py has that).

A control at zero strength is the plain image bit for bit; a control changes only what it targets; the maps
recorded in the same block are the edited probabilities, whichever block was entered first; the pipeline is
restored exactly; bad input is refused before any work.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError, UnsupportedPipelineError, WordNotFoundError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.attach import attachment_of
from sdexplore.record.control import Control, Inject, LocalBlend, Refine, Reweight, WordSwap, token_alignment
from sdexplore.record.tokens import sequence_tokens

P = "a big red circle on a blue background"
Q = "a big blue circle on a blue background"
R = "a big red circle on a dark blue background"  # a refinement of P: one word added
RUN = dict(num_inference_steps=4, output_type="np")


@pytest.fixture(params=["sd1", "sdxl"])
def pipe(request):
    return tiny_pipeline(request.param)


def _latents(pipe, n: int = 1) -> torch.Tensor:
    """(n, C, h, w) noise as the pipeline's own first draw with seed 0."""
    den = pipe.unet
    size = den.config.sample_size
    return torch.randn((n, den.config.in_channels, size, size), generator=gen(0))


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in (images if isinstance(images, list) else [images])])


def test_zero_strength_controls_give_the_plain_images_bit_for_bit(pipe) -> None:
    x = _latents(pipe)
    both = torch.cat([x, x])
    plain = pipe([P, Q], latents=both, **RUN).images
    with Control(pipe, Reweight({"circle": 1.0}), WordSwap(cross_replace=0.0, self_replace=0.0)):
        out = pipe([P, Q], latents=both, **RUN).images
    assert np.array_equal(out, plain)
    # through edit(): the swap with nothing replaced is the plain generation of the target with the same latents
    res = sdx.edit(pipe, P, Q, cross_replace=0.0, self_replace=0.0, latents=x, num_inference_steps=4)
    ref = pipe([P, Q], latents=both, num_inference_steps=4).images
    assert np.array_equal(_arrays(res.source), _arrays(ref[0]))
    assert np.array_equal(_arrays(res.edited), _arrays(ref[1]))
    res = sdx.edit(pipe, P, reweight={"circle": 1.0}, generator=gen(0), num_inference_steps=4)
    assert np.array_equal(_arrays(res.edited), _arrays(res.source))
    # the generator draws the noise as the pipeline would: a plain call with the seed (batch 1, so equal up to
    # the kernels' batch-size rounding) is the source
    ref = pipe(P, generator=gen(0), num_inference_steps=4).images[0]
    diff = np.abs(_arrays(res.source).astype(int) - _arrays(ref).astype(int))
    assert diff.max() <= 2


def test_an_ablation_changes_the_image_and_its_recorded_map_is_zero_in_either_order(pipe) -> None:
    plain = pipe(P, generator=gen(0), **RUN).images
    with Control(pipe, Reweight({"circle": 0.0})), sdx.observe(pipe, steps=False, attention=True) as inner:
        first = pipe(P, generator=gen(0), **RUN).images
    with sdx.observe(pipe, steps=False, attention=True) as outer, Control(pipe, Reweight({"circle": 0.0})):
        second = pipe(P, generator=gen(0), **RUN).images
    assert np.array_equal(first, second) and not np.array_equal(first, plain)
    for obs in (inner, outer):
        assert float(obs.attention.word("circle").abs().max()) == 0.0
        assert float(obs.attention.word("red").min()) > 0.0


def test_observe_takes_the_control_itself(pipe) -> None:
    with sdx.observe(pipe, steps=True, attention=True, control=Reweight({"circle": 0.0})) as obs:
        pipe(P, generator=gen(0), **RUN)
    assert float(obs.attention.word("circle").abs().max()) == 0.0 and len(obs.steps) == 4
    with pytest.raises(InvalidArgumentError):
        sdx.observe(pipe, attention=True, control="circle")


def test_edit_records_both_branches_and_the_edited_map_is_the_edited_probability(pipe) -> None:
    res = sdx.edit(pipe, P, reweight={"circle": 0.0}, generator=gen(0), num_inference_steps=4)
    assert res.source_maps.num_images == res.edited_maps.num_images == 1
    assert float(res.edited_maps.word("circle").abs().max()) == 0.0
    assert float(res.source_maps.word("circle").min()) > 0.0
    doubled = sdx.edit(
        pipe, P, reweight={"circle": 2.0}, generator=gen(0), num_inference_steps=4, steps=(0, 0.25)
    )
    first = doubled.edited_maps.steps[0] / doubled.source_maps.steps[0]  # step 0: same inputs, circle × 2
    pos = doubled.edited_maps.token_lists[0].positions("circle")
    torch.testing.assert_close(first[0, pos], torch.full_like(first[0, pos], 2.0), rtol=1e-2, atol=0)


def test_a_full_swap_gives_the_target_the_sources_cross_attention(pipe) -> None:
    res = sdx.edit(pipe, P, Q, cross_replace=1.0, self_replace=1.0, generator=gen(0), num_inference_steps=4)
    torch.testing.assert_close(res.edited_maps.aggregate, res.source_maps.aggregate, rtol=0, atol=0)
    assert res.edited_maps.token_lists[0].prompt == Q and res.source_maps.token_lists[0].prompt == P
    assert not np.array_equal(_arrays(res.source), _arrays(res.edited))  # the values still come from "blue"


class _Spy(Reweight):
    """A reweight that keeps, per call, the probabilities before and after its edit."""

    seen: list

    def edit(self, call, probs):
        before = probs.clone()
        rows = super().edit(call, probs)
        self.seen.append((call, before, probs.clone(), rows))
        return rows


def test_a_reweight_changes_only_its_words_column_in_its_rows_at_every_layer_and_step(pipe) -> None:
    spy = _Spy({"circle": 0.5}, steps=(0.25, 0.75))
    spy.seen = []
    with Control(pipe, spy):
        pipe([P, Q], generator=gen(0), **RUN)
    pos = sequence_tokens(pipe, P).positions("circle")  # the same positions in Q
    assert {c.step for c, *_ in spy.seen} == {1, 2}  # steps 1 and 2 of 4: [0.25·4, 0.75·4)
    layers = {c.layer for c, *_ in spy.seen}
    assert layers == {n.removesuffix(".processor") for n in pipe.unet.attn_processors if "attn2" in n}
    for call, before, after, rows in spy.seen:
        assert call.cross and rows == [call.cond.start, call.cond.start + 1]
        other = [t for t in range(before.shape[-1]) if t not in pos]
        assert torch.equal(after[..., other], before[..., other])  # other tokens: untouched, not renormalised
        assert torch.equal(after[: call.cond.start], before[: call.cond.start])  # the unconditional half
        torch.testing.assert_close(after[rows][..., pos], before[rows][..., pos] * 0.5)


def test_a_mask_puts_the_words_attention_where_it_says() -> None:
    pipe = tiny_pipeline("sd1")
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[:4, :4] = 1.0  # the top left quarter
    res = sdx.edit(pipe, P, masks={"circle": mask}, generator=gen(0), num_inference_steps=4)
    m = res.edited_maps.word("circle")  # (h, w) at latent resolution
    h, w = m.shape
    top_left = float(m[: h // 2, : w // 2].sum())
    assert (
        top_left > 0.8 * float(m.sum()) > 0
    )  # most of it in the masked quarter (coarse layers blur the edge)
    assert float(m[h // 2 :, w // 2 :].sum()) < 0.01 * float(m.sum())  # next to none in the opposite quarter
    src = res.source_maps.word("circle")
    assert float(src[: h // 2, : w // 2].sum()) < 0.5 * float(src.sum())


@pytest.mark.parametrize("fault", [None, RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("control_first", [True, False])
def test_the_pipeline_is_restored_exactly(fault, control_first) -> None:
    pipe = tiny_pipeline("sd1")
    before = pipeline_state(pipe)
    self_layers = [n for n in pipe.unet.attn_processors if "attn1" in n]

    def explode(p, i, t, kwargs):
        if fault is not None and i == 2:
            raise fault("stop here")
        return kwargs

    def blocks():
        control = Control(pipe, WordSwap(0.5, 0.5), Reweight({"circle": 0.0}), LocalBlend(["circle"]))
        observing = sdx.observe(pipe, steps=True, attention=True)
        return (control, observing) if control_first else (observing, control)

    a, b = blocks()
    raised = None
    try:
        with a, b:
            procs = pipe.unet.attn_processors
            assert all(type(procs[n]).__name__ == "ControlledAttnProcessor" for n in self_layers)
            pipe([P, Q], generator=gen(0), callback_on_step_end=explode, **RUN)
    except BaseException as e:  # noqa: BLE001 - the faults under test
        raised = e
    assert (raised is None) == (fault is None) and (fault is None or isinstance(raised, fault))
    assert_restored(pipe, before)
    # a reweight alone swaps cross-attention only: self-attention keeps its processor objects
    with Control(pipe, Reweight({"circle": 0.0})):
        procs = pipe.unet.attn_processors
        assert all(procs[n] is before["procs"][n] for n in self_layers)
    assert_restored(pipe, before)


@pytest.mark.parametrize(
    ("args", "kwargs", "error"),
    [
        ((P, "a big light blue circle on a blue background"), {"mode": "replace"}, InvalidArgumentError),
        ((P, "one two three"), {}, InvalidArgumentError),  # nothing aligns: neither a swap nor a refinement
        ((P, R), {"mode": "refine", "cross_replace": 2.0}, InvalidArgumentError),
        ((P, Q), {"mode": "swap"}, InvalidArgumentError),
        ((P, Q), {"blend": ["square"]}, WordNotFoundError),  # in neither prompt
        ((P, Q), {"blend": "circle"}, InvalidArgumentError),  # a list of words
        ((P, Q), {"blend": ["circle"], "blend_threshold": 1.5}, InvalidArgumentError),
        ((P, Q), {"cross_replace": 1.5}, InvalidArgumentError),
        ((P, Q), {"self_replace": -0.1}, InvalidArgumentError),
        ((P,), {"reweight": {"circle": math.nan}}, InvalidArgumentError),
        ((P,), {"reweight": {"circle": -1.0}}, InvalidArgumentError),
        ((P,), {"reweight": {"square": 0.0}}, WordNotFoundError),
        ((P, Q), {"reweight": {"red": 0.0}}, WordNotFoundError),  # looked up in the target
        ((P,), {}, InvalidArgumentError),  # nothing to edit
        ((P,), {"masks": {"circle": np.zeros((4, 4))}}, InvalidArgumentError),  # an empty mask
        ((P,), {"reweight": {"circle": 0.0}, "steps": (0.8, 0.2)}, InvalidArgumentError),
    ],
)
def test_bad_input_is_refused_before_any_work(args, kwargs, error) -> None:
    pipe = tiny_pipeline("sd1")
    before = pipeline_state(pipe)
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(error):
            sdx.edit(pipe, *args, generator=gen(0), num_inference_steps=2, **kwargs)
    finally:
        hook.remove()
    assert not calls
    assert_restored(pipe, before)


def test_misaligned_word_tokens_are_named() -> None:
    pipe = tiny_pipeline("sd1")
    with pytest.raises(InvalidArgumentError, match="token"):
        sdx.edit(pipe, "a red circle", "a reddishness circle", mode="replace", num_inference_steps=2)


def test_injection_is_refused_on_the_unet_families_naming_the_families_that_can() -> None:
    pipe = tiny_pipeline("sd1")  # every family takes the word edits; Inject needs joint attention
    with pytest.raises(UnsupportedPipelineError, match=r"Stable Diffusion 3 / 3\.5, Flux\.1 and Flux\.2\."):
        Control(pipe, Inject())
    assert attachment_of(pipe) is None


def test_a_refinement_aligns_the_tokens_around_an_added_word() -> None:
    pipe = tiny_pipeline("sd1")
    src, tgt = token_alignment(pipe, P, R)
    a, b = sequence_tokens(pipe, P), sequence_tokens(pipe, R)
    dark = b.positions("dark")
    assert not set(dark) & set(tgt)  # the new word is aligned with nothing: it keeps its own attention
    assert all(a.ids[i] == b.ids[j] for i, j in zip(src, tgt, strict=True))
    assert [b.positions(w)[0] for w in ("circle", "blue", "background")] == [
        tgt[src.index(a.positions(w)[0])] for w in ("circle", "blue", "background")
    ]  # the words after the insertion are shifted by one
    # a word removed: the same alignment read the other way round
    assert token_alignment(pipe, R, P) == (tgt, src)


def test_refine_is_chosen_for_added_words_and_is_the_plain_target_at_zero_strength(pipe) -> None:
    x = _latents(pipe)
    res = sdx.edit(pipe, P, R, cross_replace=0.0, self_replace=0.0, latents=x, num_inference_steps=4)
    assert res.settings["mode"] == "refine"
    ref = pipe([P, R], latents=torch.cat([x, x]), num_inference_steps=4).images
    assert np.array_equal(_arrays(res.edited), _arrays(ref[1]))
    assert sdx.edit(pipe, P, Q, latents=x, num_inference_steps=2).settings["mode"] == "replace"


def test_a_full_refinement_gives_aligned_tokens_the_sources_maps_and_new_ones_their_own(pipe) -> None:
    res = sdx.edit(pipe, P, R, cross_replace=1.0, self_replace=0.0, generator=gen(0), num_inference_steps=4)
    src, tgt = token_alignment(pipe, P, R)
    s0, e0 = res.source_maps.steps[0, 0], res.edited_maps.steps[0, 0]  # (T, h, w) at step 0
    torch.testing.assert_close(e0[tgt], s0[src], rtol=1e-6, atol=0)
    assert float(e0[sequence_tokens(pipe, R).positions("dark")].sum()) > 0  # its own map, not zeroed
    assert not np.array_equal(_arrays(res.source), _arrays(res.edited))
    # the Refine control itself, without edit(): the same pairs
    with Control(pipe, Refine(1.0, 0.0)), sdx.observe(pipe, steps=False, attention=True) as obs:
        pipe([P, R], generator=gen(0), **RUN)
    steps = obs.attention.steps[0]  # (N, T, h, w)
    torch.testing.assert_close(steps[1][tgt], steps[0][src], rtol=1e-6, atol=0)


def test_a_local_blend_keeps_the_target_equal_to_the_source_outside_its_mask(pipe) -> None:
    # random weights attend almost uniformly (every normalised value above 0.9): a threshold from a first run's
    # own maps gives a mask of about half the image
    probe = LocalBlend(["circle"], threshold=0.0, start=0.25)
    with Control(pipe, WordSwap(0.5, 0.0), probe):
        pipe([P, Q], generator=gen(0), **RUN)
    first = probe._sum[:, None]  # (2, 1, h, w): the maps summed over the run
    dilated = torch.nn.functional.max_pool2d(first, 3, stride=1, padding=1).flatten(1)
    threshold = float((dilated / dilated.amax(1, keepdim=True)).quantile(0.7))
    blend = LocalBlend(["circle"], threshold=threshold, start=0.25)
    seen = []

    def keep(p, i, t, kwargs):
        seen.append((i, kwargs["latents"].clone(), None if blend.masks is None else blend.masks.clone()))
        return kwargs

    with Control(pipe, WordSwap(0.5, 0.0), blend):
        pipe([P, Q], generator=gen(0), callback_on_step_end=keep, **RUN)
    assert [m is None for _, _, m in seen] == [True, False, False, False]  # from step 1 of 4 (0.25·4)
    for _, latents, mask in seen[1:]:
        assert 0 < int(mask.sum()) < mask.numel()  # a mask, neither empty nor everything
        outside = ~mask[0]  # (h, w)
        assert torch.equal(latents[1][:, outside], latents[0][:, outside])  # exactly the source's
        assert not torch.equal(latents[1][:, mask[0]], latents[0][:, mask[0]])  # the edit inside


def test_a_blend_with_an_all_ones_mask_is_the_unblended_edit_bit_for_bit(pipe) -> None:
    x = _latents(pipe)
    plain = sdx.edit(pipe, P, Q, latents=x, num_inference_steps=4, attention=False)
    blended = sdx.edit(
        pipe, P, Q, blend=["circle"], blend_threshold=0.0, latents=x, num_inference_steps=4, attention=False
    )
    assert np.array_equal(_arrays(blended.edited), _arrays(plain.edited))
    assert np.array_equal(_arrays(blended.source), _arrays(plain.source))
    tight = sdx.edit(  # random weights: near-uniform maps, so a high threshold for a partial mask
        pipe,
        P,
        Q,
        blend=["red", "blue"],
        blend_threshold=0.99,
        latents=x,
        num_inference_steps=4,
        attention=False,
    )
    assert not np.array_equal(_arrays(tight.edited), _arrays(plain.edited))
    assert tight.settings["blend"] == ["red", "blue"]


def test_kept_probabilities_stay_in_step_order_when_a_control_edits_late(pipe) -> None:
    """A reweight of the last step only: the kept probabilities of the earlier steps are the plain run's (the
    edited calls are filed after the deferred ones, not before them), the last step's word column is doubled."""
    opts = dict(keep_probs=True)
    with sdx.observe(pipe, steps=False, attention=opts) as plain:
        pipe(P, generator=gen(0), **RUN)
    with sdx.observe(
        pipe, steps=False, attention=opts, control=Reweight({"circle": 2.0}, steps=(0.7, 1.0))
    ) as ed:
        pipe(P, generator=gen(0), **RUN)
    pos = sequence_tokens(pipe, P).positions("circle")
    a, b = plain.attention.probs, ed.attention.probs  # name → (S, B, heads, HW, T)
    for name in a:
        torch.testing.assert_close(b[name][:3], a[name][:3], rtol=1e-6, atol=1e-7)  # steps 0-2 of 4: plain
    first = next(iter(a))  # the first layer at the last step: the same inputs, the word's column doubled
    torch.testing.assert_close(b[first][3][..., pos], 2 * a[first][3][..., pos], rtol=1e-5, atol=1e-7)

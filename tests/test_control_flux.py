"""Attention controls on Flux.1 and Flux.2 (the tiny random fixtures): structure, not meaning.

Flux's joint sequence is text first, its queries and keys carry rotary embeddings, its single-stream blocks hold
text and image in one stream, and it has no CFG batch (Flux.2 [klein]'s CFG is a second, negative-prompt call per
step). The controls edit the image-query × text-key block of every block's softmax: zero strength is the plain
image bit for bit; a reweight changes only that word's column, in the probabilities and in the maps recorded in
the same block; a swap gives the target the source's block during the chosen steps; an injection gives the target
rows the source rows' image keys and values; the pipeline is restored exactly; bad input is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError, WordNotFoundError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.control import Control, Inject, LocalBlend, Refine, Reweight, WordSwap
from sdexplore.record.joint import FluxControlledProcessor, flux_output, flux_qkv
from sdexplore.record.tokens import sequence_tokens

P = "a big red circle on a blue background"
Q = "a big blue circle on a blue background"
R = "a big red circle on a dark blue background"
RUN = dict(num_inference_steps=3, height=64, width=64, output_type="np")
LAYERS = [
    "transformer_blocks.0.attn",
    "transformer_blocks.1.attn",
    "single_transformer_blocks.0.attn",
    "single_transformer_blocks.1.attn",
]


@pytest.fixture(params=["flux", "flux2"], scope="module")
def pipe(request):
    return tiny_pipeline(request.param)


def _latents(pipe) -> torch.Tensor:
    """Two copies of one image's initial noise, in the form the pipeline's latents= takes."""
    shape = (1, 16, 64) if type(pipe).__name__ == "FluxPipeline" else (1, 128, 4, 4)  # packed / patchified
    x = torch.randn(shape, generator=gen(0))
    return torch.cat([x, x])


def test_zero_strength_controls_give_the_plain_images_bit_for_bit(pipe) -> None:
    both = _latents(pipe)
    plain = pipe(prompt=[P, Q], latents=both, **RUN).images
    zero = (Reweight({"circle": 1.0}), WordSwap(0.0, 0.0), Inject(steps=(0.5, 0.5)), Inject(layers=[]))
    with Control(pipe, *zero):
        assert all(
            type(pipe.transformer.get_submodule(n).processor) is FluxControlledProcessor for n in LAYERS
        )
        out = pipe(prompt=[P, Q], latents=both, **RUN).images
    assert np.array_equal(out, plain)
    # a control that is active but changes nothing (a local blend that only reads the maps) runs the edited
    # path, RoPE, single-stream and Flux.2's fused blocks included: still the plain image bit for bit
    with Control(pipe, LocalBlend(["circle"], start=1.0)):
        out = pipe(prompt=[P, Q], latents=both, **RUN).images
    assert np.array_equal(out, plain)


class _Spy(Reweight):
    """A reweight that keeps, per call, the probabilities before and after its edit."""

    seen: list

    def edit(self, call, probs):
        before = probs.clone()
        rows = super().edit(call, probs)
        self.seen.append((call, before, probs.clone(), rows))
        return rows


def test_an_ablated_words_column_is_zero_in_every_block_and_nothing_else_changes(pipe) -> None:
    spy = _Spy({"circle": 0.0})
    spy.seen = []
    with Control(pipe, spy):
        edited = pipe(prompt=[P, Q], generator=gen(0), **RUN).images
    plain = pipe(prompt=[P, Q], generator=gen(0), **RUN).images
    assert not np.array_equal(edited, plain)
    pos = sequence_tokens(pipe, P).positions("circle")
    assert {c.layer for c, *_ in spy.seen} == set(LAYERS)  # double- and single-stream blocks
    assert {c.step for c, *_ in spy.seen} == {0, 1, 2}  # Flux.2's CFG: two calls per step, one step
    assert not any(c.uncond for c, *_ in spy.seen)  # the negative prompt's call is left alone
    assert len(spy.seen) == 3 * len(LAYERS)
    for _call, before, after, rows in spy.seen:
        assert rows == [0, 1]  # no CFG batch: every row is a prompt's row
        assert float(after[..., pos].abs().max()) == 0.0 and float(before[..., pos].min()) > 0
        other = [t for t in range(before.shape[-1]) if t not in pos]
        assert torch.equal(after[..., other], before[..., other])  # not renormalised
        assert float(before.sum(-1).max()) < 1.0  # the joint block: the rest of the mass is on image keys


def test_a_reweight_changes_only_its_words_column_of_the_recorded_maps(pipe) -> None:
    """Reweighted at the last step only: there, the first block's recorded joint maps are the plain ones with the
    word's column doubled; every earlier step is recorded exactly as without the control."""
    opts = dict(keep_probs=True)
    with sdx.observe(pipe, steps=False, attention=opts) as plain:
        pipe(prompt=P, generator=gen(0), **RUN)
    with sdx.observe(
        pipe, steps=False, attention=opts, control=Reweight({"circle": 2.0}, steps=(0.6, 1.0))
    ) as ed:
        pipe(prompt=P, generator=gen(0), **RUN)
    pos = sequence_tokens(pipe, P).positions("circle")
    a, b = plain.attention.probs, ed.attention.probs  # name → (S, B, heads, HW, T)
    for name in a:
        assert torch.equal(a[name][:2], b[name][:2]), name  # steps 0 and 1: not edited
    first_a, first_b = a[LAYERS[0]][2], b[LAYERS[0]][2]  # the last step, the first block: the same inputs
    other = [t for t in range(first_a.shape[-1]) if t not in pos]
    torch.testing.assert_close(first_b[..., other], first_a[..., other], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(first_b[..., pos], 2 * first_a[..., pos], rtol=1e-5, atol=1e-7)
    assert ed.attention.edited and not plain.attention.edited


def test_a_swap_gives_the_target_the_sources_block_during_the_chosen_steps(pipe) -> None:
    both = _latents(pipe)
    with sdx.observe(pipe, steps=False, attention=dict(keep_probs=True), control=WordSwap(0.5)) as obs:
        swapped = pipe(prompt=[P, Q], latents=both, num_inference_steps=4, height=64, width=64).images
    for name, probs in obs.attention.probs.items():  # (S, 2, heads, HW, T)
        assert torch.equal(probs[:2, 1], probs[:2, 0]), name  # steps 0, 1 of 4: the source's block
        assert not torch.equal(probs[2:, 1], probs[2:, 0]), name  # then the target's own
    plain = pipe(prompt=[P, Q], latents=both, num_inference_steps=4, height=64, width=64).images
    assert np.array_equal(
        np.asarray(swapped[0]), np.asarray(plain[0])
    )  # the source branch is the plain image
    assert not np.array_equal(np.asarray(swapped[1]), np.asarray(plain[1]))
    with Control(pipe, Refine(1.0)), sdx.observe(pipe, steps=False, attention=True) as obs:  # words added
        pipe(prompt=[P, R], latents=both, **RUN)
    maps = obs.attention
    torch.testing.assert_close(maps.word("circle", index=1), maps.word("circle", index=0), rtol=0, atol=0)


@pytest.mark.parametrize("single", [False, True])
def test_injection_gives_the_target_row_the_source_rows_image_keys_and_values(single) -> None:
    """One Flux block called directly (Flux.1's double-stream, Flux.2's fused single-stream block): the injected
    row's outputs are joint attention over its own queries and text keys and values and the source row's image
    keys and values (explicit float64 softmax); the source row is bitwise the original's."""
    pipe = tiny_pipeline("flux2" if single else "flux")
    block = (
        pipe.transformer.single_transformer_blocks[0] if single else pipe.transformer.transformer_blocks[0]
    )
    attn, original = block.attn, block.attn.processor
    torch.manual_seed(0)
    dim, txt, hw = 32 if single else attn.query_dim, 5, 16
    dim = attn.to_qkv_mlp_proj.in_features if single else attn.to_q.in_features
    hs = torch.randn(2, txt + hw if single else hw, dim)
    ehs = None if single else torch.randn(2, txt, attn.add_q_proj.in_features)
    proc = FluxControlledProcessor(
        "x", original, lambda *a: "call", lambda c, p: [], lambda c: [(1, 0)], lambda: txt
    )
    with torch.no_grad():
        args = (hs, None, None) if single else (hs, ehs, None, None)
        got, ref = proc(attn, *args), original(attn, *args)
        q, k, v, mlp = (t if t is None else t.double() for t in flux_qkv(attn, original, hs, ehs, None))
        k1 = torch.cat([k[1, :, :txt], k[0, :, txt:]], 1)  # (heads, T+HW, d): own text, the source's image
        v1 = torch.cat([v[1, :, :txt], v[0, :, txt:]], 1)
        o = (q[1] @ k1.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) @ v1  # (heads, T+HW, d)
        o = o.transpose(0, 1).flatten(1).float()[None]  # (1, T+HW, heads*d)
        expected = flux_output(attn, original, o, txt, not single, None if mlp is None else mlp[1:].float())
    if single:
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[1], expected[0], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[1], ref[1], rtol=1e-4, atol=1e-4)
    else:
        assert torch.equal(got[0][0], ref[0][0]) and torch.equal(got[1][0], ref[1][0])
        torch.testing.assert_close(got[0][1], expected[0][0], rtol=1e-5, atol=1e-5)  # image tokens
        torch.testing.assert_close(got[1][1], expected[1][0], rtol=1e-5, atol=1e-5)  # text tokens read it too
        assert not torch.allclose(got[0][1], ref[0][1], rtol=1e-4, atol=1e-4)


class _InjectSpy(Inject):
    calls: list

    def inject(self, call):
        pairs = super().inject(call)
        self.calls.append((call.layer, call.step, call.uncond, pairs))
        return pairs


def test_injection_acts_at_the_chosen_layers_and_steps_and_leaves_the_source_alone(pipe) -> None:
    both = _latents(pipe)
    plain = pipe(prompt=[P, Q], latents=both, **RUN).images
    spy = _InjectSpy(layers=[0, "single_transformer_blocks.1.attn"], steps=(0.0, 0.6))
    spy.calls = []
    with Control(pipe, spy):
        out = pipe(prompt=[P, Q], latents=both, **RUN).images
    assert {(layer, step) for layer, step, _, _ in spy.calls} == {
        (n, s) for n in (LAYERS[0], LAYERS[3]) for s in (0, 1)
    }
    assert all(pairs == [(1, 0)] for *_, pairs in spy.calls)
    cfg = type(pipe).__name__ != "FluxPipeline"  # Flux.2 [klein]'s negative call is injected too
    assert any(u for _, _, u, _ in spy.calls) == cfg
    assert np.array_equal(out[0], plain[0]) and not np.array_equal(out[1], plain[1])


def test_edit_runs_on_flux_and_the_pipeline_is_restored(pipe) -> None:
    kw = dict(num_inference_steps=3, height=64, width=64)
    pipe(prompt=P, **kw)  # the scheduler's own state after a call
    before = pipeline_state(pipe)
    res = sdx.edit(pipe, P, Q, generator=gen(0), **kw)
    ref = pipe(prompt=P, generator=gen(0), **kw).images[0]
    diff = np.abs(np.asarray(res.source).astype(int) - np.asarray(ref).astype(int))
    assert diff.max() <= 2  # the source is the plain image of the seed (batch-size rounding aside)
    torch.testing.assert_close(
        res.edited_maps.aggregate, res.source_maps.aggregate, rtol=0, atol=0
    )  # 0.8 of 3
    res = sdx.edit(pipe, P, reweight={"circle": 0.0}, generator=gen(0), **kw)
    assert float(res.edited_maps.word("circle").abs().max()) == 0.0
    assert float(res.source_maps.word("circle").min()) > 0.0
    assert_restored(pipe, before)


def test_bad_input_is_refused_before_any_work(pipe) -> None:
    with pytest.raises(WordNotFoundError):
        sdx.edit(pipe, P, reweight={"square": 0.0}, height=64, width=64)
    with pytest.raises(InvalidArgumentError, match="fraction"):
        Inject(steps=(0.0, 1.5))
    with pytest.raises(InvalidArgumentError, match="layer indices"):
        Inject(layers="transformer_blocks.0.attn")
    with pytest.raises(InvalidArgumentError, match="4 joint-attention layers"):
        Control(pipe, Inject(layers=[4]))
    with pytest.raises(InvalidArgumentError, match="not a joint-attention layer"):
        Control(pipe, Inject(layers=["transformer_blocks.9.attn"]))
    with pytest.raises(InvalidArgumentError, match="source prompts followed by"), Control(pipe, Inject()):
        pipe(prompt=P, **RUN)


@pytest.mark.parametrize("fault", [None, RuntimeError, KeyboardInterrupt])
def test_the_pipeline_is_restored_exactly(fault) -> None:
    pipe = tiny_pipeline("flux")

    def explode(p, i, t, kwargs):
        if fault is not None and i == 1:
            raise fault("stop here")
        return kwargs

    try:  # a plain (faulting) call first: the pipeline's own state after one
        pipe(prompt=P, callback_on_step_end=explode, **RUN)
    except BaseException:  # noqa: BLE001, S110 - the faults under test
        pass
    before = pipeline_state(pipe)

    raised = None
    try:
        with (
            Control(pipe, WordSwap(0.5), Reweight({"circle": 0.0}), Inject([1])),
            sdx.observe(pipe, attention=True),
        ):
            pipe(prompt=[P, Q], generator=gen(0), callback_on_step_end=explode, **RUN)
    except BaseException as e:  # noqa: BLE001 - the faults under test
        raised = e
    assert (raised is None) == (fault is None) and (fault is None or isinstance(raised, fault))
    assert_restored(pipe, before)


def test_a_mask_puts_the_words_attention_where_it_says_on_flux_tokens(pipe) -> None:
    """The mask is resized to the image tokens' grid (the 8×8 latent in 2×2 patches: 4×4) and keeps each head's
    mass of the word."""
    mask = np.zeros((8, 8), dtype=np.float32)
    mask[:4, :4] = 1.0  # the top-left quarter
    spy = _Spy(masks={"circle": mask})
    spy.seen = []
    with Control(pipe, spy):
        pipe(prompt=P, generator=gen(0), **RUN)
    pos = sequence_tokens(pipe, P).positions("circle")
    for _call, before, after, _rows in spy.seen:
        grid = after[0, :, :, pos].reshape(after.shape[1], 4, 4, len(pos))  # (heads, 4, 4, |pos|)
        assert float(grid[:, 2:].abs().max()) == 0.0 and float(grid[:, :, 2:].abs().max()) == 0.0
        assert float(grid[:, :2, :2].min()) > 0.0
        torch.testing.assert_close(after[0, :, :, pos].sum(1), before[0, :, :, pos].sum(1))  # the mass kept


def test_a_local_blend_keeps_the_source_outside_the_words_mask(pipe) -> None:
    from sdexplore.families import detect_family

    both = _latents(pipe)
    blend = LocalBlend(["circle"], threshold=0.99, start=0.0)  # random maps are flat: keep only their peaks
    with Control(pipe, WordSwap(0.5), blend):
        out = pipe(
            prompt=[P, Q], latents=both, num_inference_steps=3, height=64, width=64, output_type="latent"
        )
    fam = detect_family(pipe)
    lat = out.images
    if lat.ndim == 3:  # Flux.1's packed tokens (B, 16, 64)
        lat = fam.unpack_latents(lat, (8, 8))
    elif lat.shape[1] != fam.latent_channels:  # Flux.2's patchified latents (B, 128, 4, 4)
        lat = fam.unpack_latents(lat.flatten(2).transpose(1, 2), (8, 8))
    keep = blend.masks  # (1, 8, 8): the last mask applied
    assert keep is not None and keep.shape == (1, 8, 8) and 0 < int(keep.sum()) < 64
    outside = ~keep[0]
    assert torch.equal(lat[1][:, outside], lat[0][:, outside])
    assert not torch.equal(lat[1][:, keep[0]], lat[0][:, keep[0]])


def test_an_injection_alone_forms_no_probabilities_and_records_plain_joint_maps(pipe, monkeypatch) -> None:
    """Injection needs only the kernel: the image→text block (N, heads, HW, T) float32, large on a real Flux, is
    not formed; a recorder in the block still records the joint maps the injected keys gave (one softmax per
    pixel: unflagged)."""
    import sdexplore.record.joint as joint

    def refuse(*a, **k):
        raise AssertionError("the probabilities were formed")

    both = _latents(pipe)
    with sdx.observe(pipe, steps=False, attention=True) as obs, Control(pipe, Inject()):
        monkeypatch.setattr(joint, "text_block", refuse)
        out = pipe(prompt=[P, Q], latents=both, **RUN).images
        monkeypatch.undo()
    plain = pipe(prompt=[P, Q], latents=both, **RUN).images
    assert np.array_equal(out[0], plain[0]) and not np.array_equal(out[1], plain[1])
    assert not obs.attention.edited and float(obs.attention.word("circle", index=1).min()) > 0

"""Attention controls on SD3's joint attention: structure on the tiny random SD3 pipeline, meaning on the embedded
tiny-shapes-mmdit.

The controls edit the image-query × text-key block of each joint block's softmax through the same Control API as
the UNet families. Zero strength is the plain image bit for bit; an ablated word's column is zero in the
probabilities the output is computed from, and the output is the joint attention with that block edited; the
recorded "joint" maps are the edited ones; the pipeline is restored exactly; Flux is refused naming the families
that can.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state
from diffusers.models.attention_processor import AttnProcessor2_0

import sdexplore as sdx
from sdexplore.errors import RecorderStateError, UnsupportedPipelineError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.control import AttentionEdit, Control, Inject, Reweight, WordSwap
from sdexplore.record.joint import JointControlledProcessor, sd3_qkv
from sdexplore.record.tokens import sequence_tokens

P = "a big red circle on a blue background"
Q = "a big blue circle on a blue background"
RUN = dict(num_inference_steps=3, output_type="np")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd3")


def _latents(pipe) -> torch.Tensor:
    den = pipe.transformer
    size = den.config.sample_size
    return torch.randn((1, den.config.in_channels, size, size), generator=gen(0))


def _arrays(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in (images if isinstance(images, list) else [images])])


def test_zero_strength_controls_give_the_plain_images_bit_for_bit(pipe) -> None:
    x = _latents(pipe)
    both = torch.cat([x, x])
    plain = pipe([P, Q], latents=both, **RUN).images
    with Control(pipe, Reweight({"circle": 1.0}), WordSwap(cross_replace=0.0), Inject(steps=(0.5, 0.5))):
        assert type(pipe.transformer.transformer_blocks[0].attn.processor) is JointControlledProcessor
        out = pipe([P, Q], latents=both, **RUN).images
    assert np.array_equal(out, plain)
    res = sdx.edit(pipe, P, Q, cross_replace=0.0, latents=x, num_inference_steps=3)
    ref = pipe([P, Q], latents=both, num_inference_steps=3).images
    assert np.array_equal(_arrays(res.source), _arrays(ref[0]))
    assert np.array_equal(_arrays(res.edited), _arrays(ref[1]))
    res = sdx.edit(pipe, P, reweight={"circle": 1.0}, latents=x, num_inference_steps=3)
    assert np.array_equal(_arrays(res.edited), _arrays(res.source))


class _Spy(Reweight):
    """A reweight that keeps, per call, the probabilities before and after its edit."""

    seen: list

    def edit(self, call, probs):
        before = probs.clone()
        rows = super().edit(call, probs)
        self.seen.append((call, before, probs.clone(), rows))
        return rows


def test_an_ablated_words_column_is_zero_in_the_joint_block_and_nothing_else_changes(pipe) -> None:
    spy = _Spy({"circle": 0.0})
    spy.seen = []
    with Control(pipe, spy):
        edited = pipe([P, Q], generator=gen(0), **RUN).images
    plain = pipe([P, Q], generator=gen(0), **RUN).images
    assert not np.array_equal(edited, plain)
    pos = sequence_tokens(pipe, P).positions("circle")
    layers = {c.layer for c, *_ in spy.seen}
    assert layers == {f"transformer_blocks.{i}.attn" for i in range(len(pipe.transformer.transformer_blocks))}
    assert {c.step for c, *_ in spy.seen} == {0, 1, 2}
    for call, before, after, rows in spy.seen:
        assert rows == [call.cond.start, call.cond.start + 1]  # the conditional half of the CFG batch
        assert float(after[rows][..., pos].abs().max()) == 0.0 and float(before[rows][..., pos].min()) > 0
        other = [t for t in range(before.shape[-1]) if t not in pos]
        assert torch.equal(after[..., other], before[..., other])  # not renormalised
        assert torch.equal(after[: call.cond.start], before[: call.cond.start])
        assert float(before.sum(-1).max()) < 1.0  # the joint block: the rest of the mass is on image keys


def test_only_the_rows_the_edits_read_are_formed(pipe) -> None:
    """A reweight reads and edits the conditional rows only: the unconditional rows of its block are not formed
    (zero); an edit that does not say so gets every row; the images are the same either way."""

    class Reader(AttentionEdit):  # reads every row, changes nothing
        def __init__(self) -> None:
            self.seen: list = []

        def active(self, call):
            return True

        def edit(self, call, probs):
            self.seen.append((call, probs.clone()))
            return []

    spy, reader = _Spy({"circle": 0.0}), Reader()
    spy.seen = []
    with Control(pipe, spy):
        alone = pipe([P, Q], generator=gen(0), **RUN).images
    with Control(pipe, spy, reader):
        beside = pipe([P, Q], generator=gen(0), **RUN).images
    assert np.array_equal(alone, beside)
    for call, before, _, _ in spy.seen[: len(spy.seen) // 2]:  # the reweight alone
        assert float(before[: call.cond.start].abs().max()) == 0.0  # not formed
        assert float(before[call.cond].min()) > 0.0
    for _call, before, _, _ in spy.seen[len(spy.seen) // 2 :]:  # beside an edit that reads every row
        assert float(before.min()) > 0.0
    assert reader.seen and all(float(p[: c.cond.start].min()) > 0.0 for c, p in reader.seen)


def test_a_recorder_of_both_halves_records_formed_rows(pipe) -> None:
    """The rows a "joint" recorder files are formed even where the edits read fewer: with ``negative=True`` the
    unconditional maps under a reweight are the plain run's (to the drift the edited latents bring)."""
    both = {"negative": True}
    with Control(pipe, Reweight({"circle": 0.0})), sdx.observe(pipe, steps=False, attention=both) as obs:
        pipe(P, generator=gen(0), **RUN)
    with sdx.observe(pipe, steps=False, attention=both) as ref:
        pipe(P, generator=gen(0), **RUN)
    neg, ref_neg = obs.attention.negative.aggregate, ref.attention.negative.aggregate
    assert float(neg.abs().max()) > 0.0
    torch.testing.assert_close(neg, ref_neg, rtol=1e-3, atol=1e-5)  # the latents drift after step 0 only
    assert float(obs.attention.word("circle").abs().max()) == 0.0


def test_an_edit_that_changes_rows_it_did_not_declare_is_refused(pipe) -> None:
    class Stray(Reweight):  # declares the conditional rows, changes the first unconditional one
        def edit(self, call, probs):
            probs[0] *= 0.5
            return [0]

    with Control(pipe, Stray({"circle": 0.0})), pytest.raises(RecorderStateError, match="rows"):
        pipe(P, generator=gen(0), **RUN)


def test_the_edited_output_is_joint_attention_with_the_edited_block() -> None:
    """One joint block called directly: the changed row's image outputs equal an explicit float64 joint softmax
    whose image-query × text-key column is zeroed; the other row and the text outputs are bitwise the original's."""
    pipe = tiny_pipeline("sd3")
    attn = pipe.transformer.transformer_blocks[0].attn
    original = attn.processor
    torch.manual_seed(0)
    dim = attn.to_q.in_features
    hs, ehs = torch.randn(2, 16, dim), torch.randn(2, 7, attn.add_k_proj.in_features)

    def ablate(call, probs):
        probs[1, :, :, 3] = 0.0
        return [1]

    proc = JointControlledProcessor("x", original, lambda *a: "call", ablate)
    with torch.no_grad():
        img, txt = proc(attn, hs, ehs)
        ref_img, ref_txt = original(attn, hs, ehs)
        q, k, v = (t.double() for t in sd3_qkv(attn, hs, ehs))  # (2, heads, 16+7, d)
        p = (q[1, :, :16] @ k[1].transpose(-1, -2) * attn.scale).softmax(-1)  # (heads, 16, 23)
        p[:, :, 16 + 3] = 0.0
        o = (p @ v[1]).transpose(0, 1).reshape(16, -1).float()  # (16, heads*d)
        expected = attn.to_out[0](o)
    assert torch.equal(img[0], ref_img[0]) and torch.equal(txt, ref_txt)
    torch.testing.assert_close(img[1], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(img[1], ref_img[1], rtol=1e-4, atol=1e-4)


def test_injection_is_joint_attention_over_the_source_rows_image_keys_and_values() -> None:
    """One SD3 joint block called directly with an injection (row 1 takes row 0's image keys and values) and an
    ablation of one text key in row 1: row 1's image and text outputs equal an explicit float64 joint softmax over
    its own queries and text keys and values and row 0's image keys and values, the column zeroed for the image
    queries; row 0 is bitwise the original's."""
    pipe = tiny_pipeline("sd3")
    attn = pipe.transformer.transformer_blocks[0].attn
    original = attn.processor
    torch.manual_seed(0)
    hs, ehs = torch.randn(2, 16, attn.to_q.in_features), torch.randn(2, 7, attn.add_k_proj.in_features)

    def ablate(call, probs):
        probs[1, :, :, 3] = 0.0
        return [1]

    proc = JointControlledProcessor("x", original, lambda *a: "call", ablate, lambda call: [(1, 0)])
    with torch.no_grad():
        img, txt = proc(attn, hs, ehs)
        ref_img, ref_txt = original(attn, hs, ehs)
        q, k, v = (t.double() for t in sd3_qkv(attn, hs, ehs))  # (2, heads, 16+7, d)
        k1, v1 = torch.cat([k[0, :, :16], k[1, :, 16:]], 1), torch.cat([v[0, :, :16], v[1, :, 16:]], 1)
        p = (q[1] @ k1.transpose(-1, -2) * attn.scale).softmax(-1)  # (heads, 23, 23)
        p[:, :16, 16 + 3] = 0.0  # the image queries' column of text key 3
        o = (p @ v1).transpose(0, 1).reshape(23, -1).float()  # (23, heads*d)
        expected_img, expected_txt = attn.to_out[0](o[:16]), attn.to_add_out(o[16:])
    assert torch.equal(img[0], ref_img[0]) and torch.equal(txt[0], ref_txt[0])
    torch.testing.assert_close(img[1], expected_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt[1], expected_txt, rtol=1e-5, atol=1e-5)


def test_injection_runs_in_both_cfg_halves_and_leaves_the_source_alone(pipe) -> None:
    x = _latents(pipe)
    both = torch.cat([x, x])
    seen = []

    class Spy(Inject):
        def inject(self, call):
            pairs = super().inject(call)
            seen.append(pairs)
            return pairs

    plain = pipe([P, Q], latents=both, **RUN).images
    with Control(pipe, Spy(layers=[1])):
        out = pipe([P, Q], latents=both, **RUN).images
    assert seen == [[(2, 0), (3, 1)]] * 3 or seen == [[(1, 0), (3, 2)]] * 3  # one layer, three steps
    assert np.array_equal(out[0], plain[0]) and not np.array_equal(out[1], plain[1])


def test_recorded_joint_maps_are_the_edited_ones_in_either_order(pipe) -> None:
    with Control(pipe, Reweight({"circle": 0.0})), sdx.observe(pipe, steps=False, attention=True) as inner:
        first = pipe(P, generator=gen(0), **RUN).images
    with sdx.observe(pipe, steps=False, attention=True) as outer, Control(pipe, Reweight({"circle": 0.0})):
        second = pipe(P, generator=gen(0), **RUN).images
    assert np.array_equal(first, second)
    for obs in (inner, outer):
        assert float(obs.attention.word("circle").abs().max()) == 0.0
        assert float(obs.attention.word("red").min()) > 0.0
    res = sdx.edit(pipe, P, Q, cross_replace=1.0, generator=gen(0), num_inference_steps=3)
    # the edited rows' block is the source's, to float32 rounding: the source row's maps take the log-sum-exp the
    # CPU flash kernel returns (a412fe3), the replaced rows an explicit softmax over the same scores
    torch.testing.assert_close(res.edited_maps.aggregate, res.source_maps.aggregate, rtol=4 * 2**-23, atol=1e-9)
    assert not np.array_equal(_arrays(res.source), _arrays(res.edited))  # the values still come from "blue"


@pytest.mark.parametrize("fault", [None, RuntimeError, KeyboardInterrupt])
def test_the_pipeline_is_restored_exactly(fault) -> None:
    pipe = tiny_pipeline("sd3")
    pipe(P, **RUN)  # the scheduler's own state after a call (set_timesteps adds attributes)
    before = pipeline_state(pipe)

    def explode(p, i, t, kwargs):
        if fault is not None and i == 1:
            raise fault("stop here")
        return kwargs

    raised = None
    try:
        with Control(pipe, WordSwap(0.5), Reweight({"circle": 0.0})), sdx.observe(pipe, attention=True):
            pipe([P, Q], generator=gen(0), callback_on_step_end=explode, **RUN)
    except BaseException as e:  # noqa: BLE001 - the faults under test
        raised = e
    assert (raised is None) == (fault is None) and (fault is None or isinstance(raised, fault))
    assert_restored(pipe, before)


def test_unreproducible_processors_are_refused_naming_what_can() -> None:
    sd3 = tiny_pipeline("sd3")  # a joint block whose processor the control cannot reproduce
    sd3.transformer.transformer_blocks[0].attn.set_processor(AttnProcessor2_0())
    with pytest.raises(UnsupportedPipelineError, match="JointAttnProcessor2_0"):
        Control(sd3, Reweight({"circle": 0.0}))
    with pytest.raises(UnsupportedPipelineError, match="JointAttnProcessor2_0"):
        sdx.edit(sd3, P, reweight={"circle": 0.0})


@pytest.mark.slow
def test_a_colour_swap_on_the_embedded_mmdit_reads_as_the_new_colour_and_keeps_the_place() -> None:
    from sdexplore.embedded import scenes
    from sdexplore.embedded.model import MMDIT_GUIDANCE_SCALE, MMDIT_STEPS

    mmdit = sdx.load_pipeline("tiny-shapes-mmdit")
    kw = dict(num_inference_steps=MMDIT_STEPS, guidance_scale=MMDIT_GUIDANCE_SCALE, attention=False)
    for i, prompt in enumerate(scenes.validation_prompts()[4:8]):  # held out from training
        p = scenes.parse_prompt(prompt)
        colour = next(c for c in ("blue", "red", "green", "yellow") if c not in (p.colour, p.background))
        target = prompt.replace(f" {p.colour} {p.shape}", f" {colour} {p.shape}")
        res = sdx.edit(mmdit, prompt, target, generator=torch.Generator().manual_seed(i), **kw)
        source, edited = scenes.read_scene(np.asarray(res.source)), scenes.read_scene(np.asarray(res.edited))
        assert edited.colour == colour, (prompt, target, edited)
        assert edited.place == source.place and edited.background == source.background, (prompt, edited)


@pytest.mark.slow
def test_injecting_every_layer_makes_the_target_follow_the_source_on_the_embedded_mmdit() -> None:
    """Stable Flow's injection, every layer and step, on the trained embedded MMDiT: the target prompt (another
    shape, colour, place and background) then draws nearly the source's picture (measured: mean |target − source|
    0.92 without, 0.08 with; one layer alone changes the target by 0.01 to 0.08)."""
    from sdexplore.embedded.model import MMDIT_GUIDANCE_SCALE, MMDIT_STEPS

    mmdit = sdx.load_pipeline("tiny-shapes-mmdit")
    source = "a big red circle at the top left on a blue background"
    target = "a big green square at the bottom right on a yellow background"
    den = mmdit.transformer
    size = den.config.sample_size
    x = torch.randn((1, den.config.in_channels, size, size), generator=gen(0))
    kw = dict(num_inference_steps=MMDIT_STEPS, guidance_scale=MMDIT_GUIDANCE_SCALE, output_type="np")
    plain = mmdit([source, target], latents=torch.cat([x, x]), **kw).images
    with Control(mmdit, Inject()):
        injected = mmdit([source, target], latents=torch.cat([x, x]), **kw).images
    assert np.array_equal(injected[0], plain[0])
    before, after = np.abs(plain[1] - plain[0]).mean(), np.abs(injected[1] - injected[0]).mean()
    assert after < 0.25 * before, (before, after)

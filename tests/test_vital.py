"""Vital layers (Stable Flow, Avrahami et al. 2025): bypassing a block, scoring it, and editing by injection there.

Structure on the tiny random SD3, Flux.1 and Flux.2 fixtures (the bypass leaves the pipeline exactly as it was, a
block made an identity scores 0, the ranking is deterministic, double- and single-stream blocks are candidates,
bad input is refused before any generation); meaning on the embedded tiny-shapes-mmdit (the most vital block's
bypass changes the read scene where the least vital's does not).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

from sdexplore.errors import InvalidArgumentError, UnsupportedPipelineError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.vital import VitalLayers, bypassed, candidate_blocks, edit, injection_layers, vital_layers

P, Q = "a big red circle on a blue background", "a big red square on a blue background"
RUN = dict(num_inference_steps=2)
FLUX_RUN = dict(num_inference_steps=2, height=64, width=64)


@pytest.fixture(scope="module")
def sd3():
    return tiny_pipeline("sd3")


def _images(out) -> np.ndarray:
    return np.stack([np.asarray(im) for im in out.images])


def _block_hooks(pipe) -> int:
    den = pipe.transformer
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in den.modules())


def _calls(pipe) -> list[int]:
    """A counter of denoiser calls (a test's own hook, removed by the caller)."""
    seen: list[int] = []
    pipe._vital_test_hook = pipe.transformer.register_forward_pre_hook(lambda *a: seen.append(1))
    return seen


# ---- the bypass ----------------------------------------------------------------------------------------------
def test_a_bypass_changes_the_image_inside_and_leaves_the_pipeline_exactly_as_it_was(sd3) -> None:
    before = _images(sd3(P, generator=gen(0), **RUN))
    before_state = pipeline_state(sd3)  # after a first call, which sets the scheduler's own fields
    with bypassed(sd3, ["transformer_blocks.0"]):
        inside = _images(sd3(P, generator=gen(0), **RUN))
    after = _images(sd3(P, generator=gen(0), **RUN))
    assert not np.array_equal(inside, before)  # the block was skipped
    assert np.array_equal(after, before)  # bitwise the plain image again
    assert _block_hooks(sd3) == 0
    assert_restored(sd3, before_state)


def test_the_bypass_is_removed_after_an_exception(sd3) -> None:
    before = _images(sd3(P, generator=gen(0), **RUN))
    with pytest.raises(RuntimeError, match="stop"), bypassed(sd3, ["transformer_blocks.1"]):
        assert _block_hooks(sd3) == 1
        raise RuntimeError("stop")
    assert _block_hooks(sd3) == 0
    assert np.array_equal(_images(sd3(P, generator=gen(0), **RUN)), before)


def test_vital_layers_leaves_the_pipeline_unchanged(sd3) -> None:
    before = _images(sd3(P, generator=gen(3), **RUN))
    state = pipeline_state(sd3)
    vital_layers(sd3, [P], seeds=[0], **RUN)
    assert np.array_equal(_images(sd3(P, generator=gen(3), **RUN)), before)
    assert _block_hooks(sd3) == 0
    assert_restored(sd3, state)


def test_a_block_made_an_identity_scores_zero() -> None:
    pipe = tiny_pipeline("sd3")
    block = pipe.transformer.transformer_blocks[0]
    with (
        torch.no_grad()
    ):  # AdaLayerNormZero's modulation all zero: every gate 0, so the block returns its input
        for linear in (block.norm1.linear, block.norm1_context.linear):
            linear.weight.zero_()
            linear.bias.zero_()
    vl = vital_layers(pipe, [P, Q], seeds=[0, 1], **RUN)
    assert vl.blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    assert vl.score("transformer_blocks.0") == 0.0 and math.isinf(vl.psnr[0])
    assert vl.score("transformer_blocks.1") > 0.0 and math.isfinite(vl.psnr[1])
    assert vl.ranking == ["transformer_blocks.1", "transformer_blocks.0"]
    assert "transformer_blocks.0" not in vl.vital


def test_the_ranking_is_deterministic(sd3) -> None:
    a = vital_layers(sd3, [P, Q], seeds=[0], **RUN)
    b = vital_layers(sd3, [P, Q], seeds=[0], **RUN)
    assert a.scores == b.scores and a.psnr == b.psnr and a.ranking == b.ranking
    assert all(s > 0 for s in a.scores)
    tied = VitalLayers(["x.0", "x.1", "x.2"], [0.1, 0.3, 0.1], [20.0, 10.0, 20.0], None, 0.2)
    assert tied.ranking == ["x.1", "x.0", "x.2"]  # ties in the denoiser's order
    assert (
        tied.vital == ["x.1"] and tied.non_vital == ["x.0", "x.2"] and tied.least_vital(2) == ["x.0", "x.2"]
    )


def test_the_threshold_decides_which_blocks_are_vital(sd3) -> None:
    low = vital_layers(sd3, [P], seeds=[0], threshold=0.0, **RUN)
    high = vital_layers(sd3, [P], seeds=[0], threshold=1.0, **RUN)
    assert low.vital == low.blocks and high.vital == []
    assert low.scores == high.scores and "transformer_blocks.0" in low.table()


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_flux_double_and_single_stream_blocks_are_candidates_and_bypassable(family) -> None:
    pipe = tiny_pipeline(family)
    blocks = candidate_blocks(pipe)
    assert blocks == [
        "transformer_blocks.0",
        "transformer_blocks.1",
        "single_transformer_blocks.0",
        "single_transformer_blocks.1",
    ]
    before = _images(pipe(prompt=P, generator=gen(0), **FLUX_RUN))
    state = pipeline_state(pipe)
    vl = vital_layers(pipe, [P], seeds=[0], **FLUX_RUN)
    assert vl.blocks == blocks and all(s > 0 for s in vl.scores)  # every kind of block was really skipped
    assert np.array_equal(_images(pipe(prompt=P, generator=gen(0), **FLUX_RUN)), before)
    assert _block_hooks(pipe) == 0
    assert_restored(pipe, state)


# ---- bad input, refused before any generation ------------------------------------------------------------------
def test_a_unet_family_is_refused_naming_sd3_and_flux() -> None:
    pipe = tiny_pipeline("sd1")
    with pytest.raises(UnsupportedPipelineError, match=r"SD3.*Flux"):
        vital_layers(pipe, [P])
    with pytest.raises(UnsupportedPipelineError, match=r"SD3.*Flux"):
        with bypassed(pipe, ["down_blocks.0"]):
            pass
    with pytest.raises(UnsupportedPipelineError, match=r"SD3.*Flux"):
        edit(pipe, P, Q)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[""]), "prompts"),
        (dict(prompts=None), "prompts"),
        (dict(seeds=[]), "seeds"),
        (dict(seeds=[-1]), "seeds"),
        (dict(seeds="0"), "seeds"),
        (dict(threshold=math.nan), "threshold"),
        (dict(threshold=-0.1), "threshold"),
        (dict(blocks=["transformer_blocks.9"]), "transformer_blocks.0"),
        (dict(blocks=[]), "at least one block"),
        (dict(batch_size=0), "batch_size"),
        (dict(generator=gen(0)), "generator"),
        (dict(output_type="np"), "output_type"),
    ],
)
def test_bad_input_is_refused_before_any_generation(sd3, kwargs, match) -> None:
    args = dict(prompts=[P]) | kwargs
    seen = _calls(sd3)
    try:
        with pytest.raises(InvalidArgumentError, match=match):
            vital_layers(sd3, args.pop("prompts"), **args)
    finally:
        sd3._vital_test_hook.remove()
    assert seen == []


def test_edit_refuses_bad_input_before_any_generation(sd3) -> None:
    seen = _calls(sd3)
    try:
        with pytest.raises(InvalidArgumentError, match="vital_layers"):
            edit(sd3, P, Q, inject="vital")
        with pytest.raises(InvalidArgumentError, match="one target per source"):
            edit(sd3, [P, P], [Q])
        with pytest.raises(InvalidArgumentError, match="one torch.Generator per source"):
            edit(sd3, [P, P], [Q, Q], generator=gen(0))
        with pytest.raises(InvalidArgumentError, match="not both"):
            edit(sd3, P, Q, generator=gen(0), latents=torch.zeros(1, 16, 8, 8))
        with pytest.raises(InvalidArgumentError, match=r"\[0, 1\]"):
            edit(sd3, P, Q, steps=(0.0, 1.5))
        with pytest.raises(InvalidArgumentError, match="transformer_blocks.0"):
            edit(sd3, P, Q, inject=["nope.0"])
        other = VitalLayers(["single_transformer_blocks.0"], [0.2], [10.0], None, 0.1)
        with pytest.raises(InvalidArgumentError, match="measure them on this pipeline"):
            edit(sd3, P, Q, inject=other)
    finally:
        sd3._vital_test_hook.remove()
    assert seen == []


# ---- editing by injection ------------------------------------------------------------------------------------
def test_injection_layers_are_the_chosen_blocks_attention(sd3) -> None:
    vl = VitalLayers(["transformer_blocks.0", "transformer_blocks.1"], [0.3, 0.01], [9.0, 30.0], None, 0.05)
    assert injection_layers(sd3, vl) == ["transformer_blocks.0.attn"]
    assert injection_layers(sd3, "all") == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert injection_layers(sd3, "none") == []
    flux = tiny_pipeline("flux")
    assert injection_layers(flux, ["single_transformer_blocks.1"]) == ["single_transformer_blocks.1.attn"]


def test_no_injection_is_the_plain_batch_and_injection_changes_only_the_target(sd3) -> None:
    plain = _images(sd3(prompt=[P, Q], generator=[gen(0), gen(0)], **RUN))
    state = pipeline_state(sd3)
    none = edit(sd3, P, Q, inject="none", generator=gen(0), **RUN)
    assert np.array_equal(np.asarray(none.source), plain[0]) and np.array_equal(
        np.asarray(none.edited), plain[1]
    )
    vl = VitalLayers(["transformer_blocks.0", "transformer_blocks.1"], [0.3, 0.01], [9.0, 30.0], None, 0.05)
    injected = edit(sd3, P, Q, inject=vl, generator=gen(0), **RUN)
    assert np.array_equal(np.asarray(injected.source), plain[0])  # the source is the plain image
    assert not np.array_equal(np.asarray(injected.edited), plain[1])  # the target took the source's features
    assert injected.settings["method"] == "inject" and injected.settings["inject"] == ["transformer_blocks.0"]
    assert _block_hooks(sd3) == 0
    assert_restored(sd3, state)


@pytest.mark.parametrize("family", ["flux", "flux2"])
def test_injection_on_flux_changes_only_the_target_and_records_both_branches(family) -> None:
    pipe = tiny_pipeline(family)
    plain = _images(pipe(prompt=[P, Q], generator=[gen(0), gen(0)], **FLUX_RUN))
    none = edit(pipe, P, Q, inject="none", generator=gen(0), **FLUX_RUN)
    assert np.array_equal(np.asarray(none.source), plain[0]) and np.array_equal(
        np.asarray(none.edited), plain[1]
    )
    res = edit(
        pipe, P, Q, inject=["single_transformer_blocks.1"], generator=gen(0), attention=True, **FLUX_RUN
    )
    assert np.array_equal(np.asarray(res.source), plain[0])
    assert not np.array_equal(np.asarray(res.edited), plain[1])
    assert res.source_maps.word("circle").shape == res.edited_maps.word("square").shape == (8, 8)
    assert _block_hooks(pipe) == 0


# ---- the embedded tiny-shapes-mmdit: the measured vital set means something -------------------------------------
MMDIT_CALL = dict(num_inference_steps=20, guidance_scale=3.0)


@pytest.fixture(scope="module")
def mmdit():
    import sdexplore as sdx

    return sdx.load_pipeline("tiny-shapes-mmdit")


@pytest.fixture(scope="module")
def measured(mmdit) -> VitalLayers:
    from sdexplore import scenes

    return vital_layers(mmdit, scenes.validation_prompts()[20:24], seeds=[0], read_scenes=True, **MMDIT_CALL)


def test_the_most_vital_block_of_the_embedded_mmdit_changes_the_scene_and_the_least_vital_does_not(
    mmdit, measured
) -> None:
    from sdexplore import scenes

    vl = measured  # on 4 held-out prompts
    assert 0 < len(vl.vital) < len(vl.blocks)  # some blocks matter more than the threshold, some do not
    top, least = vl.ranking[0], vl.ranking[-1]
    assert least not in vl.vital
    # on other held-out prompts: bypassing the most vital block changes what the picture shows on most of them,
    # bypassing the least vital one on at most half, and changes the pixels far less
    prompts = scenes.validation_prompts()[28:32]
    check = vital_layers(mmdit, prompts, seeds=[1], blocks=[top, least], read_scenes=True, **MMDIT_CALL)
    assert check.scene_changed[0] >= 0.75 and check.scene_changed[1] <= 0.5
    assert check.scores[0] > 3 * check.scores[1] and check.psnr[1] > check.psnr[0] + 5


def test_injecting_at_the_vital_blocks_keeps_the_sources_shape_where_the_non_vital_blocks_let_it_change(
    mmdit, measured
) -> None:
    """Stable Flow's edit at every step: the vital blocks carry the shape on this model, so a kind swap
    (circle → square) injected there mostly keeps the circle (benchmarks/bench_vital.py: 2 of 6 read as squares),
    injected at the non-vital blocks it reads as the square (6 of 6); place and background are kept either way."""
    from sdexplore import scenes

    prompts = [p for i, p in enumerate(scenes.validation_prompts()) if i >= 40 and " circle " in p][:6]
    targets = [p.replace(" circle ", " square ") for p in prompts]
    squares = {}
    for name, inject in (("vital", measured), ("non-vital", measured.non_vital)):
        res = edit(mmdit, prompts, targets, inject=inject, generator=[gen(i) for i in range(6)], **MMDIT_CALL)
        read = [
            (scenes.read_scene(np.asarray(a)), scenes.read_scene(np.asarray(b)))
            for a, b in zip(res.source, res.edited, strict=True)
        ]
        assert all(b.place == a.place and b.background == a.background for a, b in read), name
        squares[name] = sum(b.shape == "square" for _, b in read)
    assert squares["vital"] <= 3 and squares["non-vital"] >= 5, squares


def test_edit_inject_runs_stable_flows_edit_and_the_result_saves_and_loads(tmp_path):
    """``sdexplore.edit(..., inject=...)`` is :func:`sdexplore.vital.edit`; its Edit (no word swap recorded: the
    prompts differ by the image stream's injection) saves and loads."""
    import sdexplore
    from sdexplore.results import Edit

    pipe = tiny_pipeline("sd3")
    kw = dict(num_inference_steps=2, height=64, width=64)
    res = sdexplore.edit(
        pipe, "a red circle", "a red square", inject="all", generator=torch.Generator().manual_seed(0), **kw
    )
    direct = sdexplore.vital.edit(pipe, "a red circle", "a red square", inject="all",
                                  generator=torch.Generator().manual_seed(0), **kw)  # fmt: skip
    assert np.array_equal(np.asarray(res.edited), np.asarray(direct.edited))
    res.save(tmp_path / "inject.safetensors")
    loaded = Edit.load(tmp_path / "inject.safetensors")
    assert loaded.settings["method"] == "inject"
    assert loaded.settings["inject"] == ["transformer_blocks.0", "transformer_blocks.1"]
    with pytest.raises(InvalidArgumentError, match="runs on its own"):
        sdexplore.edit(pipe, "a red circle", "a red square", inject="all", reweight={"red": 2.0}, **kw)

"""tiny-shapes-mmdit's code: the flow-matching pair, the training sigmas against SD3's scheduler, the collapsed
zero-T5 attention against the pipeline's, the text the training sees against what the pipeline builds, and the
folder that diffusers and load_pipeline load."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline  # noqa: E402

import sdexplore as sdx  # noqa: E402
from sdexplore.embedded import mmdit  # noqa: E402
from sdexplore.embedded.config import TrainConfig  # noqa: E402
from sdexplore.embedded.losses import flow_matching_pair, sample_flow_sigmas  # noqa: E402
from sdexplore.embedded.model import EMBEDDED_MODEL_DIR, MMDIT_MODEL_DIR, embedded_model_available  # noqa: E402
from sdexplore.errors import TrainingConfigError  # noqa: E402

needs_tiny_shapes = pytest.mark.skipif(
    not embedded_model_available(), reason="tiny-shapes (the MMDiT's VAE and first text encoder) not shipped"
)
PROMPT = "a big red circle at the top left on a blue background"


def test_flow_matching_pair_is_the_straight_path_and_its_velocity() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 16, 16, generator=g), torch.randn(3, 4, 16, 16, generator=g)
    s = torch.tensor([0.0, 0.3, 1.0])
    xs, v = flow_matching_pair(x0, eps, s)
    torch.testing.assert_close(xs[0], x0[0])
    torch.testing.assert_close(xs[2], eps[2])
    torch.testing.assert_close(v, eps - x0)
    # the Euler sampler's step x <- x + (s_next - s) v walks the path exactly from s = 0.3 to 0
    torch.testing.assert_close(xs[1] + (0.0 - 0.3) * v[1], x0[1])


def test_training_sigmas_are_shifted_like_the_schedulers() -> None:
    shift = 3.0
    g = torch.Generator().manual_seed(0)
    shifted = sample_flow_sigmas(4096, shift, 0.0, 1.0, torch.device("cpu"), g)
    raw = torch.sigmoid(torch.randn(4096, generator=torch.Generator().manual_seed(0)))
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    # the scheduler's own sigmas are its unshifted linspace through the same map
    unshifted = torch.linspace(1, 1 / 1000, 1000)
    torch.testing.assert_close(sched.sigmas, shift * unshifted / (1 + (shift - 1) * unshifted))
    torch.testing.assert_close(shifted, shift * raw / (1 + (shift - 1) * raw))
    assert shifted.min() > 0 and shifted.max() < 1 and shifted.median() > 0.6  # shift 3 moves mass to noise


@needs_tiny_shapes
def test_collapsed_zero_rows_attend_exactly_like_the_pipelines_256() -> None:
    torch.manual_seed(0)
    tr = mmdit.build_transformer()
    with torch.no_grad():  # SD3 zero-initialises its output layers: perturb every weight so errors show
        for p in tr.parameters():
            p += 0.05 * torch.randn_like(p)
    te1, te2 = mmdit.text_encoder_1_from(), mmdit.build_text_encoder_2()
    ids = torch.randint(0, 49406, (2, 77))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([250.0, 900.0])
    with torch.no_grad():
        full_ctx, pooled = mmdit.encode_text(te1, te2, ids)  # (2, 333, 80)
        full = tr(
            hidden_states=x, encoder_hidden_states=full_ctx, pooled_projections=pooled, timestep=t
        ).sample
        tr.set_attn_processor(mmdit.CollapsedZerosProcessor(mmdit.MAX_SEQUENCE_LENGTH))
        ctx, pooled2 = mmdit.encode_text_collapsed(te1, te2, ids)  # (2, 78, 80)
        collapsed = tr(
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled2, timestep=t
        ).sample
        tr.set_attn_processor(mmdit.CollapsedZerosProcessor(1))  # a wrong multiplicity must show
        wrong = tr(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled2, timestep=t).sample
    assert full_ctx.shape == (2, 77 + 256, 80) and ctx.shape == (2, 78, 80)
    torch.testing.assert_close(collapsed, full, atol=1e-5, rtol=1e-4)
    assert (wrong - full).abs().max() > 1e-3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A fresh (untrained) tiny-shapes-mmdit folder written by the export code."""
    if not embedded_model_available():
        pytest.skip("tiny-shapes not shipped")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("mmdit") / "model"
    vae = mmdit.load_vae()
    mmdit.set_shift(vae, n=64)
    mmdit.save_mmdit_pipeline(
        folder, vae, mmdit.text_encoder_1_from(), mmdit.build_text_encoder_2(), mmdit.build_transformer()
    )
    return folder


def test_folder_loads_with_plain_diffusers_and_load_pipeline(saved) -> None:
    plain = StableDiffusion3Pipeline.from_pretrained(saved, text_encoder_3=None, tokenizer_3=None)
    pipe = sdx.load_pipeline(saved, device="cpu")
    assert type(pipe) is StableDiffusion3Pipeline and pipe.text_encoder_3 is None
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.shift_factor == plain.vae.config.shift_factor != 0
    assert (
        isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
        and pipe.scheduler.config.shift == mmdit.SHIFT
    )
    image = pipe(PROMPT, num_inference_steps=2, guidance_scale=4.0, output_type="np").images
    assert image.shape == (1, 64, 64, 3)  # the default size is 64×64: sample_size 16 × the VAE's factor 4
    weights = sum(p.stat().st_size for p in saved.rglob("*.safetensors")) / 1e6
    assert weights <= 25.0


def test_training_text_is_what_the_pipeline_builds(saved) -> None:
    from sdexplore.tokenizer import clip_tokenizer

    pipe = StableDiffusion3Pipeline.from_pretrained(saved, text_encoder_3=None, tokenizer_3=None)
    ids = clip_tokenizer()([PROMPT, ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx, pooled = mmdit.encode_text(pipe.text_encoder, pipe.text_encoder_2, ids)
        embeds, _, pooled_p, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT, do_classifier_free_guidance=False)
        empty, _, pooled_e, _ = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False)
    torch.testing.assert_close(ctx[:1], embeds)
    torch.testing.assert_close(pooled[:1], pooled_p)
    torch.testing.assert_close(ctx[1:], empty)
    torch.testing.assert_close(pooled[1:], pooled_e)


def test_mmdit_runs_never_write_over_tiny_shapes() -> None:
    assert TrainConfig(model="mmdit").out == str(MMDIT_MODEL_DIR)
    assert TrainConfig(model="mmdit", out="/tmp/x").out == "/tmp/x"
    assert TrainConfig().out == str(EMBEDDED_MODEL_DIR)
    with pytest.raises(TrainingConfigError, match="'unet' or 'mmdit'"):
        TrainConfig(model="dit")
    with pytest.raises(TrainingConfigError, match="--init-from"):
        TrainConfig(model="mmdit", init_from="x")
    with pytest.raises(TrainingConfigError, match="--steps"):
        TrainConfig(model="mmdit", steps=-1)


def test_patch_and_flow_shift_are_mmdit_settings_checked_up_front() -> None:
    config = TrainConfig(model="mmdit", patch=1, flow_shift=1.0)
    assert "--patch 1" in config.recorded_command() and "--flow-shift 1.0" in config.recorded_command()
    with pytest.raises(TrainingConfigError, match="--model mmdit"):
        TrainConfig(patch=1)  # a UNet run has no patches
    with pytest.raises(TrainingConfigError, match="1, 2 or 4"):
        TrainConfig(model="mmdit", patch=3)
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(TrainingConfigError, match="--flow-shift"):
            TrainConfig(model="mmdit", flow_shift=bad)
    tr = mmdit.build_transformer(patch=1)
    # 1×1 patches: one token per latent pixel, so the joint-attention grid is the latent's 16×16
    assert tr.config.patch_size == 1 and tr.pos_embed.height == tr.pos_embed.width == 16


def test_no_pooled_and_attention_weight_are_mmdit_settings_checked_up_front() -> None:
    config = TrainConfig(model="mmdit", no_pooled=True, attention_weight=0.05)
    assert (
        "--no-pooled" in config.recorded_command() and "--attention-weight 0.05" in config.recorded_command()
    )
    for unet_only in ({"no_pooled": True}, {"attention_weight": 0.1}):
        with pytest.raises(TrainingConfigError, match="--model mmdit"):
            TrainConfig(**unet_only)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(TrainingConfigError, match="--attention-weight"):
            TrainConfig(model="mmdit", attention_weight=bad)


def test_square_boost_and_pixel_weight_are_mmdit_settings_checked_up_front() -> None:
    config = TrainConfig(model="mmdit", square_boost=2.0, pixel_weight=20.0)
    assert "--square-boost 2.0" in config.recorded_command()
    assert "--pixel-weight 20.0" in config.recorded_command()
    for unet_only in ({"square_boost": 2.0}, {"pixel_weight": 1.0}):
        with pytest.raises(TrainingConfigError, match="--model mmdit"):
            TrainConfig(**unet_only)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(TrainingConfigError, match="--square-boost"):
            TrainConfig(model="mmdit", square_boost=bad)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(TrainingConfigError, match="--pixel-weight"):
            TrainConfig(model="mmdit", pixel_weight=bad)


def test_square_boost_weights_exactly_the_pools_squares() -> None:
    from sdexplore.embedded import scenes

    table = scenes.prompt_table()
    index = torch.arange(0, len(table), 7)  # (n,) a spread of prompt indices, every kind, size and place
    weights = mmdit._pick_weights(index, 3.0)
    squares = torch.tensor(["square" in table[i] for i in index.tolist()])
    assert squares.any() and not squares.all()
    assert torch.equal(weights, torch.where(squares, 3.0, 1.0))
    assert mmdit._pick_weights(index, 1.0) is None  # uniform: batches drawn as before the flag


@needs_tiny_shapes
def test_pixel_term_is_zero_for_a_perfect_prediction_and_reads_only_the_least_noisy_quarter() -> None:
    vae = mmdit.load_vae().requires_grad_(False)
    mmdit.set_shift(vae, n=64)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 16, 16, generator=gen)
    noise = torch.randn(8, 4, 16, 16, generator=gen)
    # the least noisy quarter: images 1 and 6
    sigmas = torch.tensor([0.9, 0.05, 0.8, 0.7, 0.6, 0.5, 0.1, 0.95])
    noisy, velocity = flow_matching_pair(x0, noise, sigmas)
    coverage = torch.zeros(8, 1, 16, 16)
    coverage[:, :, 5:9, 5:9] = 1
    exact = mmdit._pixel_term(vae, noisy, velocity, x0, sigmas, coverage, 10.0)
    assert float(exact) < 1e-10
    pred = (velocity + 0.3 * torch.randn(8, 4, 16, 16, generator=gen)).requires_grad_(True)
    wrong = mmdit._pixel_term(vae, noisy, pred, x0, sigmas, coverage, 10.0)
    wrong.backward()
    touched = pred.grad.flatten(1).abs().sum(dim=1) > 0  # (8,)
    assert wrong.item() > 1e-4 and touched.tolist() == [i in (1, 6) for i in range(8)]


def test_pixel_loss_charges_an_error_on_the_shape_more_than_on_the_background() -> None:
    from sdexplore.embedded.losses import pixel_loss

    coverage = torch.zeros(1, 1, 16, 16)
    coverage[:, :, 6:10, 6:10] = 1
    target = torch.zeros(1, 3, 64, 64)
    on_shape, off_shape = target.clone(), target.clone()
    on_shape[..., 24:28, 24:28] = 1  # a corner's worth of pixels, on the shape
    off_shape[..., 0:4, 0:4] = 1  # the same error in the image's corner, on the background
    assert pixel_loss(on_shape, target, coverage, 0.0) == pixel_loss(off_shape, target, coverage, 0.0)
    assert pixel_loss(on_shape, target, coverage, 10.0) > 5 * pixel_loss(off_shape, target, coverage, 10.0)


def test_ignore_pooled_makes_the_output_independent_of_the_pooled_vector_only() -> None:
    torch.manual_seed(0)
    tr = mmdit.build_transformer(patch=2)
    with torch.no_grad():  # SD3 zero-initialises its output layers: perturb every weight so changes show
        for p in tr.parameters():
            p += 0.05 * torch.randn_like(p)
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 10, 80), torch.tensor([300.0, 800.0])
    pooled = torch.randn(2, 80)

    def run(pooled, ctx=ctx):
        with torch.no_grad():
            return tr(
                hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t
            ).sample

    assert (run(pooled) - run(3 * pooled + 1)).abs().max() > 1e-3  # before: the pooled vector counts
    mmdit.ignore_pooled(tr)
    torch.testing.assert_close(run(pooled), run(3 * pooled + 1), atol=0, rtol=0)
    assert (run(pooled) - run(pooled, ctx=torch.randn_like(ctx))).abs().max() > 1e-3  # the text still counts
    weight = tr.time_text_embed.text_embedder.linear_1.weight
    assert not weight.requires_grad and not weight.any()


def test_kept_text_probabilities_are_the_pipelines_joint_softmax() -> None:
    """The attention loss reads the first images' image-query probabilities on the text keys; they must be the
    softmax the pipeline computes over 77 CLIP tokens and 256 zero-T5 tokens (the collapsed key holding the
    256 copies' total), while the block's output stays SDPA's."""
    torch.manual_seed(0)
    tr = mmdit.build_transformer(patch=1)
    with torch.no_grad():
        for p in tr.parameters():
            p += 0.05 * torch.randn_like(p)
    attn = tr.transformer_blocks[1].attn
    img, ctx = torch.randn(3, 256, 96), torch.randn(3, 78, 96)  # (B, N_img, width), (B, 77 + 1, width)
    keeper = mmdit.CollapsedZerosProcessor(mmdit.MAX_SEQUENCE_LENGTH, keep_text_probs=2)
    with torch.no_grad():
        out_img, out_ctx = keeper(attn, img, ctx)
        plain_img, plain_ctx = mmdit.CollapsedZerosProcessor(mmdit.MAX_SEQUENCE_LENGTH)(attn, img, ctx)
        full_ctx = torch.cat([ctx[:, :77], ctx[:, 77:].expand(3, 256, 96)], dim=1)  # (B, 333, width)

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(3, -1, attn.heads, 16).transpose(1, 2)  # (B, heads, L, 16)

        def norm(layer, x: torch.Tensor) -> torch.Tensor:
            return x if layer is None else layer(x)

        q = norm(attn.norm_q, heads(attn.to_q(img)))
        k = torch.cat(
            [
                norm(attn.norm_k, heads(attn.to_k(img))),
                norm(attn.norm_added_k, heads(attn.add_k_proj(full_ctx))),
            ],
            2,
        )
        probs = ((q @ k.transpose(-1, -2)) / 4.0).softmax(-1)[..., 256:]  # (B, heads, N_img, 333): text keys
    (kept,) = keeper.text_probs
    assert kept.shape == (2, attn.heads, 256, 78)  # only the first two images are kept
    torch.testing.assert_close(kept[..., :77], probs[:2, ..., :77], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(kept[..., 77], probs[:2, ..., 77:].sum(-1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(out_img, plain_img, atol=0, rtol=0)  # keeping changes nothing the step uses
    torch.testing.assert_close(out_ctx, plain_ctx, atol=0, rtol=0)


def test_attention_localisation_loss_is_zero_on_the_shape_and_large_off_it() -> None:
    from sdexplore.embedded.losses import attention_localisation_loss

    coverage = torch.zeros(2, 1, 16, 16)
    coverage[0, :, 2:6, 3:7] = 1
    coverage[1, :, 10:14, 9:12] = 1
    word = torch.tensor([5, 7])

    def probs_on(masks: torch.Tensor) -> list[torch.Tensor]:
        p = torch.full((2, 3, 256, 78), 1e-3)  # (B, heads, N, T)
        for b in range(2):
            p[b, :, :, word[b]] = masks[b].flatten() + 1e-6
        return [p, p]

    right = attention_localisation_loss(probs_on(coverage[:, 0]), word, coverage)
    swapped = attention_localisation_loss(probs_on(coverage[:, 0].flip(0)), word, coverage)
    uniform = attention_localisation_loss(probs_on(torch.ones(2, 16, 16)), word, coverage)
    assert right < 1e-3 < uniform < swapped
    # a caption without a shape word (dropped for CFG) does not count; none at all gives 0
    only_first = attention_localisation_loss(
        probs_on(coverage[:, 0].flip(0)), torch.tensor([5, -1]), coverage
    )
    first_alone = attention_localisation_loss(
        [p[:1] for p in probs_on(coverage[:, 0].flip(0))], word[:1], coverage[:1]
    )
    torch.testing.assert_close(only_first, first_alone)
    assert attention_localisation_loss(probs_on(coverage[:, 0]), torch.tensor([-1, -1]), coverage) == 0


def test_shape_words_are_one_clip_token_each() -> None:
    from sdexplore.embedded.scenes import SHAPES
    from sdexplore.tokenizer import clip_tokenizer

    ids = mmdit.shape_token_ids(torch.device("cpu"))
    assert ids.shape == (3,) and len(set(ids.tolist())) == 3
    tokenizer = clip_tokenizer()
    assert [tokenizer.decode([i]).strip() for i in ids.tolist()] == list(SHAPES)


def test_saved_sampler_has_the_runs_shift(tmp_path) -> None:
    if not embedded_model_available():
        pytest.skip("tiny-shapes not shipped")
    vae = mmdit.load_vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=1.0)
    pipe = mmdit.save_mmdit_pipeline(
        tmp_path / "m",
        vae,
        mmdit.text_encoder_1_from(),
        mmdit.build_text_encoder_2(),
        mmdit.build_transformer(patch=2),
        shift=1.25,
    )
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "m", text_encoder_3=None, tokenizer_3=None)
    assert pipe.scheduler.config.shift == loaded.scheduler.config.shift == 1.25
    assert loaded.transformer.config.patch_size == 2


def test_the_card_writer_reproduces_the_shipped_mmdit_card_from_its_numbers() -> None:
    """The shipped MODEL_CARD.md is what mmdit_model_card writes from the shipped eval.json and training.json:
    nothing on the card (its "What was tried" table included) is hand-edited, so a re-run of the eval keeps it."""
    import json

    from sdexplore.embedded.mmdit_card import mmdit_model_card

    shipped = (MMDIT_MODEL_DIR / "MODEL_CARD.md").read_text()
    written = mmdit_model_card(MMDIT_MODEL_DIR, json.loads((MMDIT_MODEL_DIR / "eval.json").read_text()))
    assert written == shipped


# ---- meaning: the trained model (shipped in sdexplore/models/tiny-shapes-mmdit) ----------------------------
import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sdexplore.embedded import scenes  # noqa: E402
from sdexplore.embedded.evaluate import attention_iou, shape_token_index, shape_word_maps  # noqa: E402
from sdexplore.embedded.model import MMDIT_GUIDANCE_SCALE, MMDIT_STEPS  # noqa: E402

CALL = dict(num_inference_steps=MMDIT_STEPS, guidance_scale=MMDIT_GUIDANCE_SCALE)
ATTN_PROMPTS = [
    "a big red circle at the top left on a white background",
    "a big blue square at the bottom right on a yellow background",
    "a big green triangle at the top right on a black background",
    "a big orange circle at the bottom left on a blue background",
]


@pytest.fixture(scope="module")
def mm():
    torch.set_num_threads(1)
    return sdx.load_pipeline("tiny-shapes-mmdit", device="cpu")


def _np(images) -> list[np.ndarray]:
    return [(im * 255).round().astype(np.uint8) for im in images]


def _attend(mm, kind: str):
    """The four prompts (seed i for prompt i) recorded with ``kind`` maps and the three shapes as concepts: their
    images, the shape-word maps (4, 64, 64) and the concept maps (4, 3, 64, 64), upsampled to the image."""
    gens = [torch.Generator().manual_seed(i) for i in range(len(ATTN_PROMPTS))]
    with sdx.AttentionRecorder(mm, kind=kind, step_resolution=None, concepts=list(scenes.SHAPES)) as rec:
        out = mm(ATTN_PROMPTS, generator=gens, output_type="np", **CALL).images
    assert rec.maps.kind == kind
    index = [shape_token_index(mm, p) for p in ATTN_PROMPTS]
    maps = shape_word_maps(rec.maps, index).numpy()  # (4, 64, 64)
    concepts = F.interpolate(
        rec.maps.concept_aggregate.float(), size=scenes.IMAGE_SIZE, mode="bilinear", align_corners=False
    ).numpy()  # (4, 3, h, w) -> (4, 3, 64, 64)
    return _np(out), maps, concepts


@pytest.fixture(scope="module")
def attended(mm):
    """The four prompts' images, readings, shape-word joint-attention maps and shape-concept maps."""
    images, maps, concepts = _attend(mm, "joint")
    return images, [scenes.read_scene(im) for im in images], maps, concepts


def _concept_ious(concepts: np.ndarray, readings) -> tuple[list[float], list[float]]:
    """Per prompt: IoU of the depicted shape's concept map, and the mean IoU of the two absent shapes' maps."""
    present, absent = [], []
    for i, prompt in enumerate(ATTN_PROMPTS):
        shape = scenes.SHAPES.index(scenes.parse_prompt(prompt).shape)
        ious = [attention_iou(concepts[i, c], readings[i].mask) for c in range(len(scenes.SHAPES))]
        present.append(ious[shape])
        absent.append(float(np.mean([v for c, v in enumerate(ious) if c != shape])))
    return present, absent


def test_shape_word_joint_attention_sits_on_the_drawn_shape(attended) -> None:
    images, readings, maps, _ = attended
    for prompt, reading in zip(ATTN_PROMPTS, readings, strict=True):
        assert reading.place == scenes.parse_prompt(prompt).place  # drawn where asked
    right = [attention_iou(maps[i], readings[i].mask) for i in range(4)]
    # wrong pairing: each map against the shape of another image (all four places differ)
    wrong = [attention_iou(maps[i], readings[(i + 1) % 4].mask) for i in range(4)]
    assert np.mean(right) >= 0.45, right
    assert min(r - w for r, w in zip(right, wrong, strict=True)) >= 0.2, (right, wrong)


def test_output_maps_do_not_localise_on_this_model(mm, attended) -> None:
    """The documented limit (docs/embedded_model.md): ConceptAttention's attention-output maps (``kind="output"``)
    carry no place on tiny-shapes-mmdit. Its text tokens' attention outputs are alike (mean cosine 0.56) and point
    away from the shape, so every word's map and every concept's map peaks on the background: shape-word IoU 0.12
    for ``output`` against 0.68 for ``joint`` over 24 prompts, no layer alone above 0.14; concept maps 0.00.
    If this test fails because ``output`` maps began to localise, rewrite that limit."""
    images, readings, joint, _ = attended
    out_images, maps, concepts = _attend(mm, "output")
    assert all((a == b).all() for a, b in zip(images, out_images, strict=True))  # recording changes nothing
    joint_iou = [attention_iou(joint[i], readings[i].mask) for i in range(4)]
    output_iou = [attention_iou(maps[i], readings[i].mask) for i in range(4)]
    assert np.mean(joint_iou) >= 0.45 and max(output_iou) < 0.2, (joint_iou, output_iou)
    present, absent = _concept_ious(concepts, readings)
    assert max(present + absent) < 0.2, (present, absent)


def test_shape_concepts_mark_the_foreground_not_the_word(attended) -> None:
    """The documented limit of concept maps on this model: a shape word encoded alone is text the encoder never
    saw alone, and its joint-attention concept map marks the drawn shape whichever shape it names (24 prompts:
    depicted shape 0.47, absent shapes 0.43, paired difference +0.04 ± 0.12). If the depicted shape's concept
    starts to win clearly, the limit is gone: rewrite it."""
    _, readings, _, concepts = attended
    present, absent = _concept_ious(concepts, readings)
    assert np.mean(absent) >= 0.3, absent  # the absent shapes' concepts sit on the drawn shape too
    assert np.mean(present) - np.mean(absent) < 0.2, (present, absent)


def _shape_rgb(image: np.ndarray) -> np.ndarray:
    mask = scenes.read_scene(image).mask
    assert mask.sum() > 20, "no shape read"
    return image[mask].astype(float).mean(axis=0)  # (3,) mean RGB on the shape


def test_red_to_blue_walk_turns_the_colour_monotonically(mm) -> None:
    red = "a big red circle at the center on a white background"
    blue = red.replace("red", "blue")
    with torch.no_grad():
        e_r, n, p_r, n_p = mm.encode_prompt(red, red, None, do_classifier_free_guidance=True, device="cpu")
        e_b, _, p_b, _ = mm.encode_prompt(blue, blue, None, do_classifier_free_guidance=True, device="cpu")
    blueness = []
    for a in np.linspace(0, 1, 5):
        out = mm(
            prompt_embeds=torch.lerp(e_r, e_b, float(a)),
            pooled_prompt_embeds=torch.lerp(p_r, p_b, float(a)),
            negative_prompt_embeds=n,
            negative_pooled_prompt_embeds=n_p,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **CALL,
        ).images
        rgb = _shape_rgb(_np(out)[0])
        blueness.append(rgb[2] - rgb[0])  # blue minus red on the shape
    assert scenes.read_scene(_np(out)[0]).colour == "blue"
    assert all(b2 >= b1 - 8 for b1, b2 in zip(blueness[:-1], blueness[1:], strict=True)), blueness  # 8/255
    assert blueness[-1] - blueness[0] > 200, blueness


def test_prompt_switch_at_step_k_changes_what_the_steps_after_k_decide(mm) -> None:
    from sdexplore.record.steering import PromptSwitch
    from sdexplore.record.steps import StepRecorder

    a = "a big red circle at the top left on a white background"
    moved = "a big blue circle at the bottom right on a white background"
    recoloured = "a big blue circle at the top left on a white background"

    def run(switch=None) -> scenes.SceneReading:
        with StepRecorder(mm, switch_prompt=switch):
            out = mm(a, generator=torch.Generator().manual_seed(0), output_type="np", **CALL).images
        return scenes.read_scene(_np(out)[0])

    plain = run()
    assert (plain.place, plain.colour) == ("top left", "red")
    start = run(PromptSwitch(0, moved))
    assert (start.place, start.colour) == ("bottom right", "blue")  # from step 0: the other prompt's image
    mid = run(PromptSwitch(MMDIT_STEPS // 2, recoloured))
    assert (mid.place, mid.colour) == ("top left", "blue")  # half-way: the same shape takes the new colour
    last = run(PromptSwitch(MMDIT_STEPS - 1, moved))
    assert (last.place, last.colour) == ("top left", "red")  # the last step only refines

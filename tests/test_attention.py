"""AttentionRecorder on tiny SD1/SD2/SDXL, SD3 and Flux pipelines: exactness, reference agreement, restore, labels, sizes."""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import gen
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from sdexplore.errors import (
    InvalidArgumentError,
    RecorderStateError,
    UnsupportedPipelineError,
    WordNotFoundError,
)
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.attention import AttentionRecorder
from sdexplore.results.attention_maps import AttentionMaps

PROMPT = "a big red circle at the top left on a blue background"
RUN = dict(num_inference_steps=3, height=64, width=64, output_type="pt")


def _state(pipe):
    """Everything a recorder may touch, by identity."""
    return (
        dict(pipe.unet.attn_processors),
        dict(pipe.unet._forward_pre_hooks),
        dict(pipe.unet._forward_hooks),
        "encode_prompt" in pipe.__dict__,
    )


def _assert_restored(pipe, before):
    procs, pre, post, own_encode = _state(pipe)
    assert procs.keys() == before[0].keys()
    assert all(procs[k] is before[0][k] for k in procs), "a processor object was not restored"
    assert pre.keys() == before[1].keys() and post.keys() == before[2].keys(), "a hook was left behind"
    assert own_encode == before[3], "pipe.encode_prompt was left wrapped"


def test_capture_never_changes_image(any_pipe):
    plain = any_pipe(PROMPT, generator=gen(0), **RUN).images
    with AttentionRecorder(any_pipe, per_head=True, negative=True, keep_probs=True) as rec:
        seen = any_pipe(PROMPT, generator=gen(0), **RUN).images
    assert (plain - seen).abs().max().item() <= 1e-5
    assert rec.maps.num_steps == 3


def test_classic_processor_also_unchanged(sd1_pipe):
    sd1_pipe.unet.set_attn_processor(AttnProcessor())
    plain = sd1_pipe(PROMPT, generator=gen(1), **RUN).images
    with AttentionRecorder(sd1_pipe, keep_probs=True) as rec:
        seen = sd1_pipe(PROMPT, generator=gen(1), **RUN).images
    assert (plain - seen).abs().max().item() <= 1e-5
    p = next(iter(rec.maps.probs.values()))
    assert torch.allclose(p.float().sum(-1), torch.ones(()), atol=1e-5)


def test_distributions_sum_to_one(any_pipe):
    with AttentionRecorder(any_pipe, keep_probs=True, negative=True) as rec:
        any_pipe(PROMPT, generator=gen(0), **RUN)
    maps = rec.maps
    for part in (maps, maps.negative):
        for probs in part.probs.values():  # (S, B, heads, HW, T)
            assert probs.shape[-1] == 77
            assert torch.allclose(probs.float().sum(-1), torch.ones(()), atol=1e-5)
        # reductions keep it: every pixel's maps over the 77 tokens sum to 1
        assert torch.allclose(part.aggregate.sum(1), torch.ones(()), atol=1e-5)
        assert torch.allclose(part.steps.sum(2), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_agrees_with_independent_reference(family):
    """Explicit attention from the layer weights and the hidden states a forward hook saw."""
    pipe = tiny_pipeline(family)
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    handles = []
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2"):

            def hook(mod, args, kwargs, name=name):
                seen.setdefault(name, []).append(
                    (args[0].detach().clone(), kwargs["encoder_hidden_states"].clone())
                )

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with AttentionRecorder(pipe, keep_probs=True) as rec:
            pipe(PROMPT, generator=gen(2), **RUN)
    finally:
        for h in handles:
            h.remove()
    maps = rec.maps
    H, W = maps.latent_size
    modules = dict(pipe.unet.named_modules())
    ref_layers = {}
    ref_steps = []
    for name, calls in seen.items():
        attn = modules[name]
        per_step = []
        for hidden, context in calls:
            q, k = attn.to_q(hidden), attn.to_k(context)  # (N, HW, C), (N, T, C)
            n, L, C = q.shape
            d = C // attn.heads
            q = q.reshape(n, L, attn.heads, d).permute(0, 2, 1, 3)  # (N, heads, HW, d)
            k = k.reshape(n, -1, attn.heads, d).permute(0, 2, 1, 3)  # (N, heads, T, d)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)[n // 2 :]  # (B, heads, HW, T)
            per_step.append(p)
        probs = torch.stack(per_step)  # (S, B, heads, HW, T)
        assert torch.allclose(maps.probs[name].float(), probs, atol=1e-5)
        side = int(math.isqrt(probs.shape[3]))
        layer = probs.mean(2).mean(0).transpose(1, 2).reshape(1, 77, side, side)  # (B, T, h, w)
        assert torch.allclose(maps.layers[name], layer, atol=1e-5)
        ref_layers[name] = layer
        ref_steps.append(
            probs.mean(2).transpose(2, 3).reshape(len(per_step), 1, 77, side, side)
        )  # (S, B, T, h, w)
    agg = torch.stack([F.interpolate(m, size=(H, W), mode="bilinear") for m in ref_layers.values()]).mean(0)
    assert torch.allclose(maps.aggregate, agg, atol=1e-5)
    steps = torch.stack(
        [torch.stack([F.interpolate(s, size=(H, W), mode="bilinear") for s in r]) for r in ref_steps]
    )
    assert torch.allclose(maps.steps, steps.mean(0), atol=1e-5)
    w = maps.word("red circle")
    assert torch.allclose(w, agg[0, 3:5].sum(0), atol=1e-5)  # "red" and "circle" are tokens 3 and 4


def test_step_maps_average_to_aggregate(sd2_pipe):
    with AttentionRecorder(sd2_pipe) as rec:  # step maps capped at the 8×8 latent: same grid as the aggregate
        sd2_pipe(PROMPT, generator=gen(0), **RUN)
    maps = rec.maps
    assert maps.steps.shape == (3, 1, 77, 8, 8)
    assert torch.allclose(maps.steps.mean(0), maps.aggregate, atol=1e-6)
    assert torch.allclose(maps.word("circle", step=range(3)), maps.word("circle"), atol=1e-6)
    assert not torch.allclose(maps.word("circle", step=0), maps.word("circle", step=-1))
    assert maps.timesteps.tolist() == sorted(maps.timesteps.tolist(), reverse=True)


@pytest.mark.parametrize("how", ["success", "exception", "interrupt"])
def test_restores_pipeline(sdxl_pipe, how):
    before = _state(sdxl_pipe)

    def boom(pipe, i, t, kwargs):
        if i == 1:
            raise KeyboardInterrupt if how == "interrupt" else ValueError("user callback failed")
        return kwargs

    rec = AttentionRecorder(sdxl_pipe)
    if how == "success":
        with rec:
            sdxl_pipe(PROMPT, generator=gen(0), **RUN)
    else:
        with pytest.raises(KeyboardInterrupt if how == "interrupt" else ValueError):
            with rec:
                sdxl_pipe(PROMPT, generator=gen(0), callback_on_step_end=boom, **RUN)
        assert rec.maps.num_steps == 2  # what ran before the interruption is kept
    _assert_restored(sdxl_pipe, before)
    # and the pipeline still gives the plain result afterwards
    fresh = tiny_pipeline("sdxl")
    a = fresh(PROMPT, generator=gen(3), **RUN).images
    b = sdxl_pipe(PROMPT, generator=gen(3), **RUN).images
    assert torch.equal(a, b)


def test_double_entry_refused(sd1_pipe):
    before = _state(sd1_pipe)
    with AttentionRecorder(sd1_pipe) as rec:
        inside = _state(sd1_pipe)
        with pytest.raises(RecorderStateError, match="already attached"):
            with AttentionRecorder(sd1_pipe):
                pass
        with pytest.raises(RecorderStateError, match="already active"):
            with rec:
                pass
        _assert_restored(sd1_pipe, inside)  # the refused entries changed nothing
        sd1_pipe(PROMPT, generator=gen(0), **RUN)
    _assert_restored(sd1_pipe, before)
    with AttentionRecorder(sd1_pipe) as again:  # usable again after exit
        sd1_pipe(PROMPT, generator=gen(0), **RUN)
    assert again.maps.num_steps == 3


def test_maps_before_any_call_is_clear_error(sd1_pipe):
    rec = AttentionRecorder(sd1_pipe)
    with pytest.raises(RecorderStateError, match="with AttentionRecorder"):
        _ = rec.maps
    with rec:
        pass
    with pytest.raises(RecorderStateError, match="call the pipeline"):
        _ = rec.maps


@pytest.mark.parametrize("height,width", [(64, 96), (96, 64)])
def test_non_square_sizes(sdxl_pipe, height, width):
    with AttentionRecorder(sdxl_pipe, step_resolution=4) as rec:
        img = sdxl_pipe(PROMPT, generator=gen(0), **{**RUN, "height": height, "width": width}).images
    maps = rec.maps
    H, W = height // 8, width // 8
    assert img.shape[-2:] == (height, width)
    assert maps.latent_size == (H, W) and maps.image_size == (height, width)
    assert maps.aggregate.shape == (1, 77, H, W)
    assert all(m.shape[-2:] == (H // 2, W // 2) for m in maps.layers.values())
    assert maps.steps.shape[-2:] == ((4, 3) if H > W else (3, 4))  # longer side 4, aspect kept
    assert maps.word("circle").shape == (H, W)


def test_word_errors_and_subword_merge(sd1_pipe):
    prompt = "an image of Angkor with a sunset sky."
    with AttentionRecorder(sd1_pipe) as rec:
        sd1_pipe(prompt, generator=gen(0), **RUN)
    maps = rec.maps
    assert maps.token_lists[0].ids[:12] == [
        49406,
        550,
        2867,
        539,
        883,
        24175,
        593,
        320,
        3424,
        2390,
        269,
        49407,
    ]
    assert maps.tokens[0] == "<|startoftext|>" and maps.tokens[11] == "<|endoftext|>"
    assert maps.token_lists[0].kinds[12:] == ["pad"] * 65
    assert "angkor" in maps.words and "." in maps.words
    assert torch.allclose(maps.word("Angkor"), maps.token(4) + maps.token(5))
    assert torch.allclose(maps.word("a"), maps.token(7))
    with pytest.raises(WordNotFoundError) as err:
        maps.word("dog")
    assert "angkor" in str(err.value) and "sunset" in str(err.value)


def test_long_prompt_truncation_reported(sd1_pipe):
    words = [f"w{i}" for i in range(90)]  # "w12" is one or two tokens: well over 75 either way
    prompt = "a red circle " + " ".join(words) + " zebra"
    with pytest.warns(UserWarning, match="longer than 77 tokens"):
        with AttentionRecorder(sd1_pipe) as rec:
            sd1_pipe(prompt, generator=gen(0), **RUN)
    maps = rec.maps
    tl = maps.token_lists[0]
    full = sd1_pipe.tokenizer(prompt).input_ids
    assert tl.ids == full[:76] + [49407]  # exactly what the text encoder saw
    assert len(maps.truncated) == len(full) - 77 and maps.truncated[-1] == "zebra</w>"
    maps.word("circle")
    with pytest.raises(WordNotFoundError, match="cut off"):
        maps.word("zebra")


def test_labels_match_the_pipeline_tokenizer(any_pipe):
    with AttentionRecorder(any_pipe) as rec:
        any_pipe(PROMPT, generator=gen(0), **RUN)
    ids = any_pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert rec.maps.token_lists[0].ids == ids
    assert rec.maps.family == {"StableDiffusionXLPipeline": "sdxl"}.get(
        type(any_pipe).__name__, rec.maps.family
    )


def test_batch_prompts_and_negative(sd1_pipe):
    prompts = ["a red circle", "a blue square on a green background"]
    with AttentionRecorder(sd1_pipe, negative=True) as rec:
        sd1_pipe(
            prompts, negative_prompt=["a dog", "a cat"], num_images_per_prompt=2, generator=gen(0), **RUN
        )
    maps = rec.maps
    assert maps.num_images == 4
    assert [tl.prompt for tl in maps.token_lists] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert maps.word("square", index=2).shape == (8, 8)
    with pytest.raises(WordNotFoundError):
        maps.word("square", index=0)
    assert maps.negative.num_images == 4
    assert [tl.prompt for tl in maps.negative.token_lists] == ["a dog", "a dog", "a cat", "a cat"]
    assert maps.negative.word("cat", index=2).shape == (8, 8)
    assert maps.negative.words == ["a", "dog"] and maps.negative.token_lists[3].words == ["a", "cat"]
    assert not torch.allclose(maps.negative.aggregate, maps.aggregate)


def test_no_negative_by_default_and_without_cfg(sd1_pipe):
    with AttentionRecorder(sd1_pipe) as rec:
        sd1_pipe(PROMPT, generator=gen(0), **RUN)
    assert rec.maps.negative is None
    with AttentionRecorder(sd1_pipe, negative=True) as rec:
        sd1_pipe(PROMPT, generator=gen(0), guidance_scale=1.0, **RUN)  # no CFG: the batch is the prompt only
    assert rec.maps.negative is None and rec.maps.num_images == 1


class UserProcessor(AttnProcessor2_0):
    """Stands for a user's own processor (IP-Adapter, an editing method...) sdexplore must not replace."""


def test_leaves_foreign_processors_and_says_so(sd2_pipe):
    names = [n for n in sd2_pipe.unet.attn_processors if n.endswith("attn2.processor")]
    mine = UserProcessor()
    procs = dict(sd2_pipe.unet.attn_processors)
    procs[names[0]] = mine
    sd2_pipe.unet.set_attn_processor(dict(procs))
    before = _state(sd2_pipe)
    with pytest.warns(UserWarning, match="untouched"):
        with AttentionRecorder(sd2_pipe) as rec:
            assert sd2_pipe.unet.attn_processors[names[0]] is mine
            sd2_pipe(PROMPT, generator=gen(0), **RUN)
    assert rec.skipped_layers == [names[0].removesuffix(".processor")]
    assert rec.maps.skipped_layers == rec.skipped_layers
    assert set(rec.maps.layer_names) == {n.removesuffix(".processor") for n in names[1:]}
    _assert_restored(sd2_pipe, before)
    sd2_pipe.unet.set_attn_processor({n: (UserProcessor() if n in names else p) for n, p in procs.items()})
    with pytest.raises(UnsupportedPipelineError, match="UserProcessor"):
        with AttentionRecorder(sd2_pipe):
            pass


def test_layer_and_scale_selection(sdxl_pipe):
    with pytest.raises(ValueError, match="matches no cross-attention layer"):
        AttentionRecorder(sdxl_pipe, layers="nowhere")
    with AttentionRecorder(sdxl_pipe, layers="up_blocks", per_head=True) as rec:
        sdxl_pipe(PROMPT, generator=gen(0), **RUN)
    maps = rec.maps
    assert maps.layer_names and all("up_blocks" in n for n in maps.layer_names)
    for name, heads in maps.layer_heads.items():  # (B, heads, T, h, w); their mean is the layer map
        assert heads.shape[1] > 1
        assert torch.allclose(heads.mean(1), maps.layers[name], atol=1e-6)
    assert maps.word("circle", layer="up_blocks.0.attentions.1.transformer_blocks.0").shape == (4, 4)
    assert maps.word("circle", layer="up_blocks.0.attentions.1").shape == (8, 8)  # two layers: latent size
    with pytest.raises(ValueError, match="keep_probs"):
        maps.word("circle", layer="up_blocks", step=0)
    before = _state(sdxl_pipe)
    with AttentionRecorder(sdxl_pipe, scales=[1]) as rec:  # no layer works at full latent resolution here
        # said after the first step, naming the scales there are, not after the whole run or never
        with pytest.raises(RecorderStateError, match=r"scales=\[1\].*at scales 2"):
            sdxl_pipe(PROMPT, generator=gen(0), **RUN)
    _assert_restored(sdxl_pipe, before)
    with pytest.raises(RecorderStateError, match="scales"):
        _ = rec.maps
    with AttentionRecorder(sdxl_pipe, scales=[2]) as rec:
        sdxl_pipe(PROMPT, generator=gen(0), **RUN)
    assert len(rec.maps.layer_names) == 8


def test_refuses_unet_without_cross_attention(sd1_pipe):
    from diffusers import UNet2DModel

    sd1_pipe.unet = UNet2DModel(
        block_out_channels=(32, 32),
        norm_num_groups=8,
        sample_size=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    with pytest.raises(UnsupportedPipelineError):
        AttentionRecorder(sd1_pipe)


def test_two_calls_keep_the_latest_and_prompt_embeds_unlabelled(sd1_pipe):
    with AttentionRecorder(sd1_pipe) as rec:
        sd1_pipe("a red circle", generator=gen(0), **RUN)
        first = rec.maps
        sd1_pipe("a blue square", generator=gen(0), **{**RUN, "num_inference_steps": 2})
    assert first.words[-1] == "circle"
    assert rec.maps.words[-1] == "square" and rec.maps.num_steps == 2
    embeds, _ = sd1_pipe.encode_prompt("a red circle", "cpu", 1, False)
    with AttentionRecorder(sd1_pipe) as rec:
        sd1_pipe(prompt_embeds=embeds, guidance_scale=1.0, generator=gen(0), **RUN)
    with pytest.raises(WordNotFoundError, match="not seen"):
        rec.maps.word("circle")
    assert rec.maps.token(4).shape == (8, 8)


def test_save_load_roundtrip_and_bad_files(sd1_pipe, tmp_path):
    from sdexplore.errors import ResultFileError

    with AttentionRecorder(sd1_pipe, negative=True, keep_probs=True, per_head=True) as rec:
        sd1_pipe(PROMPT, generator=gen(0), **RUN)
    maps = rec.maps
    path = maps.save(tmp_path / "maps")
    assert path.suffix == ".safetensors"
    back = AttentionMaps.load(path)
    assert back.tokens == maps.tokens and back.words == maps.words and back.latent_size == maps.latent_size
    for a, b in ((back, maps), (back.negative, maps.negative)):
        assert torch.equal(a.aggregate, b.aggregate) and torch.equal(a.steps, b.steps)
        assert all(torch.equal(a.probs[n], b.probs[n]) for n in b.probs)
        assert all(torch.equal(a.layer_heads[n], b.layer_heads[n]) for n in b.layer_heads)
    assert torch.equal(back.word("circle", step=1, layer="up"), maps.word("circle", step=1, layer="up"))
    raw = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ResultFileError, match="truncated"):
        AttentionMaps.load(cut)
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(ResultFileError, match="not AttentionMaps"):
        AttentionMaps.load(other)
    with pytest.raises(ResultFileError, match="No AttentionMaps"):
        AttentionMaps.load(tmp_path / "missing.safetensors")


def test_no_warning_in_the_plain_case(sd1_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with AttentionRecorder(sd1_pipe) as rec:
            sd1_pipe(PROMPT, generator=gen(0), **RUN)
    assert rec.skipped_layers == []


def test_observe_builds_the_recorder(sd1_pipe):
    from sdexplore.record.observe import observe

    before = _state(sd1_pipe)
    with observe(sd1_pipe, steps=False, attention=dict(negative=True, step_resolution=4)) as obs:
        sd1_pipe(PROMPT, generator=gen(0), **RUN)
    _assert_restored(sd1_pipe, before)
    assert obs.attention.word("circle").shape == (8, 8)
    assert obs.attention.steps.shape == (3, 1, 77, 4, 4)
    negative = obs.attention.negative  # the unconditional half: the empty negative prompt's maps
    assert [tl.prompt for tl in negative.token_lists] == [""] and negative.steps.shape == (3, 1, 77, 4, 4)
    assert not torch.equal(negative.aggregate, obs.attention.aggregate)


def test_fp16_keep_probs_dtype_and_step_maps_shrink(sd1_pipe):
    """Kept probabilities are stored in the UNet's dtype; groups larger than the step maps are shrunk."""
    with AttentionRecorder(sd1_pipe, keep_probs=True, step_resolution=2) as rec:
        sd1_pipe(PROMPT, generator=gen(0), **RUN)
    maps = rec.maps
    assert all(p.dtype == sd1_pipe.unet.dtype for p in maps.probs.values())
    assert maps.steps.shape == (3, 1, 77, 2, 2)
    assert torch.allclose(maps.steps.sum(2), torch.ones(()), atol=1e-5)
    layers = torch.stack(list(maps.layers.values())).mean(0)  # (B, T, 4, 4): every layer sits at 4×4 here
    shrunk = F.interpolate(layers, size=(2, 2), mode="bilinear", antialias=True)  # resizing is linear
    assert torch.allclose(maps.steps.mean(0), shrunk, atol=1e-5)


def test_sliced_attention_is_captured_too(sd1_pipe):
    sd1_pipe.enable_attention_slicing(1)  # SlicedAttnProcessor everywhere: reproduced by the explicit path
    plain = sd1_pipe(PROMPT, generator=gen(0), **RUN).images
    with AttentionRecorder(sd1_pipe) as rec:
        seen = sd1_pipe(PROMPT, generator=gen(0), **RUN).images
    assert rec.skipped_layers == [] and rec.maps.num_steps == 3
    assert (plain - seen).abs().max().item() <= 1e-5


# ---- the same API on the MMDiT fixtures (SD3: CLIP 77 + T5 positions, a CFG batch; Flux: T5 only, no CFG batch) --
MMDIT_T5 = 32  # max_sequence_length of every MMDiT call here: SD3 keys 77 + 32, Flux keys 32
MMDIT_RUN = dict(num_inference_steps=2, height=64, width=64, output_type="pt", max_sequence_length=MMDIT_T5)
MMDIT_KEYS = {"sd3": 77 + MMDIT_T5, "flux": MMDIT_T5}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def mmdit(request):
    """(family, pipeline) of each MMDiT fixture family, shared by this module's MMDiT tests."""
    return request.param, tiny_pipeline(request.param)


@pytest.fixture(scope="module")
def mmdit_recorded(mmdit):
    """A plain call and the same call recorded with every option: (family, pipe, plain image, recorded image, maps)."""
    family, pipe = mmdit
    plain = pipe(PROMPT, generator=gen(0), **MMDIT_RUN).images
    with AttentionRecorder(pipe, per_head=True, negative=family == "sd3", keep_probs=True) as rec:
        seen = pipe(PROMPT, generator=gen(0), **MMDIT_RUN).images
    return family, pipe, plain, seen, rec.maps


def test_mmdit_capture_never_changes_image(mmdit_recorded):
    family, _, plain, seen, maps = mmdit_recorded
    assert torch.equal(plain, seen)  # the output still comes from the original kernel: bitwise
    assert maps.num_steps == 2 and maps.family == family and maps.kind == "joint"
    assert maps.latent_size == (8, 8) and maps.image_size == (64, 64)


def test_mmdit_distributions_joint_below_one_text_sums_to_one(mmdit_recorded):
    family, pipe, _, _, maps = mmdit_recorded
    T = MMDIT_KEYS[family]
    parts = [maps] + ([maps.negative] if family == "sd3" else [])  # Flux has no CFG batch: no negative half
    assert (maps.negative is None) == (family == "flux")
    for part in parts:
        for probs in part.probs.values():  # (S, B, heads, HW, T): the text block of the joint softmax
            assert probs.shape[-1] == T and probs.shape[-2] == 16  # 8×8 latent in 2×2 patches
            mass = probs.float().sum(-1)
            assert float(mass.min()) > 0 and float(mass.max()) < 1 - 1e-3  # the rest went to image keys
        assert float(part.aggregate.sum(1).max()) < 1 - 1e-3
    with AttentionRecorder(
        pipe, kind="text", negative=family == "sd3"
    ) as rec:  # softmax over the text keys only
        pipe(PROMPT, generator=gen(0), **MMDIT_RUN)
    for part in [rec.maps] + ([rec.maps.negative] if family == "sd3" else []):
        assert part.kind == "text" and part.aggregate.shape[1] == T
        assert torch.allclose(part.aggregate.sum(1), torch.ones(()), atol=1e-5)
        assert torch.allclose(part.steps.sum(2), torch.ones(()), atol=1e-5)


def test_mmdit_word_token_step_and_layer(mmdit_recorded):
    family, _, _, _, maps = mmdit_recorded
    tl = maps.token_lists[0]
    assert maps.words == PROMPT.split()
    t5 = tl.positions("circle", segment="t5")  # the tiny T5 tokenizer splits it: "▁cir", "cle"
    assert [tl.pieces[p] for p in t5] == ["▁cir", "cle"]
    every = tl.positions("circle")  # SD3: CLIP's "circle</w>" too
    assert every == (tl.positions("circle", segment="clip") + t5 if family == "sd3" else t5)
    assert torch.allclose(maps.word("circle"), sum(maps.token(p) for p in every), atol=1e-6)
    # steps: their mean is the whole run; steps differ; timesteps fall
    assert maps.steps.shape == (2, 1, MMDIT_KEYS[family], 8, 8)
    assert torch.allclose(maps.steps.mean(0), maps.aggregate, atol=1e-6)
    assert torch.allclose(maps.word("circle", step=range(2)), maps.word("circle"), atol=1e-6)
    assert not torch.allclose(maps.word("circle", step=0), maps.word("circle", step=-1))
    assert maps.timesteps.tolist() == sorted(maps.timesteps.tolist(), reverse=True)
    # layers: native 4×4 (2×2 patches of the 8×8 latent); a group of layers is averaged at the latent size
    blocks = ["transformer_blocks"] + (["single_transformer_blocks"] if family == "flux" else [])
    assert {n.split(".")[0] for n in maps.layer_names} == set(blocks)
    first = maps.layer_names[0]
    assert maps.word("circle", layer=first).shape == (4, 4)
    assert maps.word("circle", layer=first, step=1).shape == (4, 4)  # keep_probs=True: per step and layer
    assert maps.word("circle", layer="transformer_blocks.").shape == (8, 8)
    for name, heads in maps.layer_heads.items():  # (B, heads, T, h, w); their mean is the layer map
        assert heads.shape[:3] == (1, 4, MMDIT_KEYS[family])
        assert torch.allclose(heads.mean(1), maps.layers[name], atol=1e-6)
    assert list(maps.word_maps()) == list(dict.fromkeys(PROMPT.split()))
    with pytest.raises(WordNotFoundError) as err:
        maps.word("dog")
    assert "circle" in str(err.value)


def test_mmdit_labels_match_the_pipeline_tokenizers(mmdit_recorded):
    family, pipe, _, _, maps = mmdit_recorded
    t5_tok = pipe.tokenizer_3 if family == "sd3" else pipe.tokenizer_2
    t5 = t5_tok(PROMPT, padding="max_length", max_length=MMDIT_T5, truncation=True).input_ids
    tl = maps.token_lists[0]
    if family == "sd3":  # CLIP's 77 positions, then T5's: the joint sequence the transformer sees
        clip = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
        assert tl.ids == clip + t5
        assert [(s.name, s.start, s.stop) for s in tl.segments] == [
            ("clip", 0, 77),
            ("t5", 77, 77 + MMDIT_T5),
        ]
    else:
        assert tl.ids == t5 and [s.name for s in tl.segments] == ["t5"]
    assert maps.truncated == []


@pytest.mark.parametrize("how", ["success", "exception", "interrupt"])
def test_mmdit_restores_pipeline_and_keeps_what_ran(mmdit, how):
    from conftest import assert_restored, pipeline_state

    family, pipe = mmdit
    fault = {"exception": ValueError, "interrupt": KeyboardInterrupt}.get(how)

    def boom(pipe, i, t, kwargs):
        raise fault("user callback failed")

    call = dict(MMDIT_RUN, callback_on_step_end=boom) if fault else MMDIT_RUN
    # first the same call without sdexplore: diffusers' own per-call attributes as that call leaves them
    # (a faulting FluxPipeline call leaves its _current_timestep set)
    with pytest.raises(fault) if fault else contextlib.nullcontext():
        pipe(PROMPT, generator=gen(0), **call)
    before = pipeline_state(pipe)
    rec = AttentionRecorder(pipe)
    with pytest.raises(fault) if fault else contextlib.nullcontext():
        with rec:
            pipe(PROMPT, generator=gen(0), **call)
    assert rec.maps.num_steps == (1 if fault else 2)  # what ran before the interruption is kept
    assert_restored(pipe, before)
    fresh = tiny_pipeline(family)  # and the pipeline still gives the plain result afterwards
    assert torch.equal(
        fresh(PROMPT, generator=gen(3), **MMDIT_RUN).images,
        pipe(PROMPT, generator=gen(3), **MMDIT_RUN).images,
    )


def test_mmdit_double_entry_refused_and_maps_before_a_call(mmdit):
    _, pipe = mmdit
    rec = AttentionRecorder(pipe)
    with pytest.raises(RecorderStateError, match="with AttentionRecorder"):
        _ = rec.maps
    with rec:
        with pytest.raises(RecorderStateError, match="already attached"):
            with AttentionRecorder(pipe):
                pass
        with pytest.raises(RecorderStateError, match="call the pipeline"):
            _ = rec.maps


@pytest.mark.parametrize("height,width", [(64, 96), (96, 64)])
def test_mmdit_non_square_sizes(mmdit, height, width):
    """Flux's packed tokens and SD3's patches are placed on the right grid when the image is not square."""
    _, pipe = mmdit
    with AttentionRecorder(pipe, step_resolution=4) as rec:
        img = pipe(PROMPT, generator=gen(0), **{**MMDIT_RUN, "height": height, "width": width}).images
    maps = rec.maps
    H, W = height // 8, width // 8
    assert img.shape[-2:] == (height, width)
    assert maps.latent_size == (H, W) and maps.image_size == (height, width)
    assert maps.aggregate.shape[-2:] == (H, W)
    assert all(m.shape[-2:] == (H // 2, W // 2) for m in maps.layers.values())
    assert maps.steps.shape[-2:] == ((4, 3) if H > W else (3, 4))  # longer side 4, aspect kept
    assert maps.word("circle").shape == (H, W)


def test_mmdit_long_prompt_t5_sees_past_clips_77():
    """SD3: words CLIP cut off at 77 still have a map from T5's positions; past T5's window, the error says so."""
    pipe = tiny_pipeline("sd3")
    prompt = "a red circle " + "on a blue square " * 20 + "zebra"  # > 77 CLIP tokens, < 128 T5 pieces
    with AttentionRecorder(pipe) as rec:
        pipe(prompt, generator=gen(0), **{**MMDIT_RUN, "max_sequence_length": 128})
    tl = rec.maps.token_lists[0]
    assert len(pipe.tokenizer(prompt).input_ids) > 77 and tl.truncated == []
    assert tl.positions("zebra") == tl.positions("zebra", segment="t5") and min(tl.positions("zebra")) >= 77
    assert rec.maps.word("zebra").shape == (8, 8)
    with pytest.warns(UserWarning, match="longer than"):
        with AttentionRecorder(pipe) as rec:
            pipe(prompt, generator=gen(0), **MMDIT_RUN)  # T5 window of 32: "zebra" seen by neither
    with pytest.raises(WordNotFoundError, match="cut off"):
        rec.maps.word("zebra")


def test_mmdit_batch_prompts_and_negative(mmdit):
    family, pipe = mmdit
    prompts = ["a red circle", "a blue square on a green background"]
    if family == "flux":  # one prompt per row, true CFG a separate call: no unconditional half to record
        with pytest.raises(InvalidArgumentError, match="negative=True"):
            AttentionRecorder(pipe, negative=True)
    with AttentionRecorder(pipe, negative=family == "sd3") as rec:
        pipe(prompts, negative_prompt=["a dog", "a cat"] if family == "sd3" else None, num_images_per_prompt=2,
             generator=gen(0), **MMDIT_RUN)  # fmt: skip
    maps = rec.maps
    assert maps.num_images == 4
    assert [tl.prompt for tl in maps.token_lists] == [prompts[0]] * 2 + [prompts[1]] * 2
    assert maps.word("square", index=2).shape == (8, 8)
    with pytest.raises(WordNotFoundError):
        maps.word("square", index=0)
    if family == "flux":
        assert maps.negative is None
        return
    assert [tl.prompt for tl in maps.negative.token_lists] == ["a dog", "a dog", "a cat", "a cat"]
    assert maps.negative.words == ["a", "dog"] and maps.negative.token_lists[3].words == ["a", "cat"]
    assert maps.negative.word("cat", index=2).shape == (8, 8)
    assert not torch.allclose(maps.negative.aggregate, maps.aggregate)
    with AttentionRecorder(pipe, negative=True) as rec:
        pipe(
            PROMPT, generator=gen(0), guidance_scale=1.0, **MMDIT_RUN
        )  # no CFG: the batch is the prompt only
    assert rec.maps.negative is None and rec.maps.num_images == 1


def test_mmdit_leaves_foreign_processors_and_says_so(mmdit):
    from conftest import assert_restored, pipeline_state

    _, pipe = mmdit
    den = pipe.transformer
    names = [n for n in den.attn_processors if n.endswith("attn.processor")]
    procs = dict(den.attn_processors)
    mine = type("UserProcessor", (type(procs[names[0]]),), {})()  # a user's own processor of the same kind
    den.set_attn_processor({**procs, names[0]: mine})
    try:
        pipe(PROMPT, generator=gen(0), **MMDIT_RUN)  # diffusers' per-call attributes as this call sets them
        before = pipeline_state(pipe)
        with pytest.warns(UserWarning, match="untouched"):
            with AttentionRecorder(pipe) as rec:
                assert den.attn_processors[names[0]] is mine
                pipe(PROMPT, generator=gen(0), **MMDIT_RUN)
        assert rec.skipped_layers == [names[0].removesuffix(".processor")] == rec.maps.skipped_layers
        assert set(rec.maps.layer_names) == {n.removesuffix(".processor") for n in names[1:]}
        assert_restored(pipe, before)
    finally:
        den.set_attn_processor(procs)


def test_mmdit_layer_and_scale_selection(mmdit):
    family, pipe = mmdit
    with pytest.raises(ValueError, match="matches no"):
        AttentionRecorder(pipe, layers="nowhere")
    chosen = "single_transformer_blocks" if family == "flux" else "transformer_blocks.1"
    with AttentionRecorder(pipe, layers=chosen) as rec:
        pipe(PROMPT, generator=gen(0), **MMDIT_RUN)
    assert rec.maps.layer_names and all(n.startswith(chosen) for n in rec.maps.layer_names)
    with AttentionRecorder(pipe, scales=[1]) as rec:  # 2×2 patches: every layer is at scale 2
        with pytest.raises(RecorderStateError, match=r"scales=\[1\].*at scales 2"):
            pipe(PROMPT, generator=gen(0), **MMDIT_RUN)
    with AttentionRecorder(pipe, scales=[2]) as rec:
        pipe(PROMPT, generator=gen(0), **MMDIT_RUN)
    assert len(rec.maps.layer_names) == (4 if family == "flux" else 2)


def test_mmdit_prompt_embeds_unlabelled(mmdit):
    family, pipe = mmdit
    run = {k: v for k, v in MMDIT_RUN.items() if k != "max_sequence_length"}
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            "a red circle", None, None, do_classifier_free_guidance=False, max_sequence_length=MMDIT_T5
        )
        run["guidance_scale"] = 1.0
    else:
        embeds, pooled, _ = pipe.encode_prompt("a red circle", None, max_sequence_length=MMDIT_T5)
    with AttentionRecorder(pipe) as rec:
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=gen(0), **run)
    assert rec.maps.aggregate.shape[1] == MMDIT_KEYS[family]
    with pytest.raises(WordNotFoundError, match="not seen"):
        rec.maps.word("circle")
    assert rec.maps.token(4).shape == (8, 8)


def test_mmdit_save_load_roundtrip(mmdit_recorded, tmp_path):
    family, _, _, _, maps = mmdit_recorded
    back = AttentionMaps.load(maps.save(tmp_path / "maps"))
    assert back.kind == "joint" and back.family == family
    assert back.tokens == maps.tokens and back.words == maps.words and back.latent_size == maps.latent_size
    assert [s.to_json() for s in back.token_lists[0].segments] == [
        s.to_json() for s in maps.token_lists[0].segments
    ]
    for a, b in ((back, maps), (back.negative, maps.negative)):
        if b is None:
            assert a is None
            continue
        assert torch.equal(a.aggregate, b.aggregate) and torch.equal(a.steps, b.steps)
        assert all(torch.equal(a.probs[n], b.probs[n]) for n in b.probs)
        assert all(torch.equal(a.layer_heads[n], b.layer_heads[n]) for n in b.layer_heads)
    assert torch.equal(back.word("circle", step=1, layer="transformer_blocks.0"),
                       maps.word("circle", step=1, layer="transformer_blocks.0"))  # fmt: skip
    assert back.token_lists[0].positions("circle", segment="t5") == maps.token_lists[0].positions(
        "circle", segment="t5"
    )


def test_mmdit_observe_builds_the_recorder(mmdit):
    from conftest import assert_restored, pipeline_state

    from sdexplore.record.observe import observe

    family, pipe = mmdit
    pipe(PROMPT, generator=gen(0), **MMDIT_RUN)  # diffusers' per-call attributes as this call sets them
    before = pipeline_state(pipe)
    with observe(pipe, steps=False, attention=dict(negative=family == "sd3", step_resolution=4)) as obs:
        pipe(PROMPT, generator=gen(0), **MMDIT_RUN)
    assert_restored(pipe, before)
    assert obs.attention.word("circle").shape == (8, 8) and obs.attention.steps.shape[-2:] == (4, 4)
    if family == "sd3":  # the unconditional half: the empty negative prompt's maps
        assert [tl.prompt for tl in obs.attention.negative.token_lists] == [""]
    else:
        assert obs.attention.negative is None

"""The conformance suite: one set of tests every fixture family passes, driven by ``Family.capabilities``.

A new family is a record in ``sdexplore/families.py`` and a fixture in ``sdexplore/fixtures.py``; add its name to
``ALL_FIXTURE_FAMILIES`` and this file says what works and what is missing. For each family: the steps recorded
under observation leave the image bit for bit and give x0 by the family's schedule math (recomputed here); the
attention maps equal an explicit softmax computed here from the layers' own inputs; steering, controls,
injection, inversion, walks and concept maps run where the record claims them, and everything it does not claim is
refused with one clear error naming the families that can. Tiny fixtures, 64 px, two steps, one pipeline per
family per module.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import gen

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError, UnsupportedPipelineError
from sdexplore.families import CAPABILITIES, FAMILIES
from sdexplore.fixtures import ALL_FIXTURE_FAMILIES, fixture_call_defaults, tiny_pipeline
from sdexplore.record.joint import joint_attention_layers

P = "a red circle on a blue background"
STEPS = 2
_PIPES: dict[str, object] = {}


def pipe_of(name: str):
    """One fixture pipeline per family for the whole module (they are never changed by a test)."""
    if name not in _PIPES:
        _PIPES[name] = tiny_pipeline(name)
    return _PIPES[name]


def call_kwargs(name: str, **extra) -> dict:
    """A fast call of family ``name``: 64 px, two steps, its fixture's call defaults (its record's, and the
    fixture's own: Wan's 5 frames), a short T5/Qwen sequence."""
    fam = FAMILIES[name]
    kw = dict(num_inference_steps=STEPS, height=64, width=64, output_type="np", **fixture_call_defaults(name))
    if "max_sequence_length" in fam.encode_options:
        kw["max_sequence_length"] = 32
    return {**kw, **extra}


def pixels(out) -> np.ndarray:
    """A pipeline output's pictures: ``.images``, or a video pipeline's ``.frames`` (B, frames, H, W, 3)."""
    return out.frames if hasattr(out, "frames") else out.images


def plain(name: str, seed: int = 0, **extra) -> np.ndarray:
    pipe = pipe_of(name)
    return pixels(pipe(prompt=P, generator=gen(seed), **call_kwargs(name, **extra)))


def families_with(capability: str) -> list[str]:
    return [n for n in ALL_FIXTURE_FAMILIES if FAMILIES[n].can(capability)]


def families_without(capability: str) -> list[str]:
    return [n for n in ALL_FIXTURE_FAMILIES if not FAMILIES[n].can(capability)]


#: Known gaps, (check, family) → what is missing and where. Each fails today (a strict xfail), so the fix is noticed;
#: the fix removes its entry. They are in files outside families.py, fixtures.py and record/.
_ATTACH_CFG = (
    "attach.py reads CFG from pipe.do_classifier_free_guidance, which PixArtSigmaPipeline lacks (a local "
    "variable): use Family.batch_cfg(pipe, run.arguments) and the call's guidance_scale"
)
_ATTACH_VARIANCE = (
    "attach.py keeps the denoiser's (2B, 2C, h, w) output with PixArt's learned variance as the noise halves: "
    "store Family.prediction(out)"
)
_NO_WALK_CHECK = (
    "walks.py checks no family, so {} fails deep inside instead of a refusal naming the families: {}"
)
PENDING: dict[tuple[str, str], str] = {}


def _params(names: list[str], check: str) -> list:
    if not names:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no fixture family"))]
    return [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=PENDING[check, n]))
        if (check, n) in PENDING
        else n
        for n in names
    ]


# ---- the record ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL_FIXTURE_FAMILIES)
def test_fixture_is_its_family_and_claims_known_capabilities(name) -> None:
    pipe = pipe_of(name)
    fam = sdx.detect_family(pipe)
    assert fam is FAMILIES[name]
    assert fam.capabilities <= set(CAPABILITIES), fam.capabilities - set(CAPABILITIES)
    assert "steps" in fam.capabilities  # the least a family must do
    cfg = fam.get_denoiser(pipe).config
    out = cfg.get("out_channels") or cfg.in_channels  # what the denoiser predicts per latent cell or token
    if (
        fam.latent_packing > 1
    ):  # packed tokens in, packed tokens out (Qwen-Image's out_channels counts latent ones)
        out = cfg.in_channels
    assert out == fam.latent_channels * fam.latent_packing**2 * (2 if fam.learned_variance else 1)
    with pytest.raises(InvalidArgumentError, match="Unknown capability"):
        fam.can("teleport")


@pytest.mark.parametrize("name", _params(list(ALL_FIXTURE_FAMILIES), "describe"))
def test_describe_names_the_family(name) -> None:
    d = sdx.describe(pipe_of(name))
    assert d.family == name and FAMILIES[name].label in str(d)
    assert d.capabilities == [
        c for c in CAPABILITIES if FAMILIES[name].can(c)
    ]  # the record, the single source
    assert f"sdexplore can: {', '.join(d.capabilities)}" in str(d)


def test_capability_table_agrees_with_the_modules_that_refuse() -> None:
    """Every module's own list of families equals the capability table (until the modules read the table)."""
    from sdexplore.directions.apply import SUPPORTED
    from sdexplore.flowedit import FLOWEDIT_FAMILIES
    from sdexplore.inversion import FLOW_FAMILIES, NULL_TEXT_FAMILIES
    from sdexplore.record.ablate_text import ABLATION_FAMILIES
    from sdexplore.record.control import CONTROL_FAMILIES, JOINT_CONTROL_FAMILIES

    lists = {
        "controls": CONTROL_FAMILIES,
        "inject": JOINT_CONTROL_FAMILIES,
        "null-text": NULL_TEXT_FAMILIES,
        "flowedit": FLOWEDIT_FAMILIES,
        "ablate-text": ABLATION_FAMILIES,
        "directions": SUPPORTED,
        "invert": ("sd1", "sd2", "sdxl", *FLOW_FAMILIES),
    }
    for capability, names in lists.items():
        assert set(names) == {f.name for f in FAMILIES.values() if f.can(capability)}, capability


# ---- steps: bitwise and x0 by the schedule -------------------------------------------------------------------
def _x0_by_schedule(pipe, step, latents: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """x0 from the recorded latents and prediction, by the scheduler's own schedule (independently of sdexplore)."""
    sched = pipe.scheduler
    if "FlowMatch" in type(sched).__name__ or getattr(sched.config, "use_flow_sigmas", False):
        s = float(sched.sigmas[step.index])  # the σ after shifting, as set by the pipeline's call (Sana: DPM)
        return latents - s * prediction  # flow matching: x_t = (1 − σ) x0 + σ ε, v = ε − x0
    a = float(sched.alphas_cumprod[int(step.timestep)])
    if sched.config.prediction_type == "v_prediction":
        return math.sqrt(a) * latents - math.sqrt(1 - a) * prediction
    return (latents - math.sqrt(1 - a) * prediction) / math.sqrt(a)  # ε


@pytest.mark.parametrize("name", _params(families_with("steps"), "steps"))
def test_steps_leave_the_image_and_give_x0_by_the_schedule(name) -> None:
    pipe, want = pipe_of(name), plain(name)
    with sdx.observe(pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        image = pixels(pipe(prompt=P, generator=gen(0), **call_kwargs(name)))
    assert np.array_equal(image, want)  # bitwise
    tr = obs.steps
    assert len(tr) == STEPS and tr.family == name
    for step in tr.steps:
        assert (
            step.latents.shape[1] == FAMILIES[name].latent_channels
        )  # unpacked (B, C, h, w) on every family
        ref = _x0_by_schedule(pipe, step, step.latents, step.noise_pred)
        torch.testing.assert_close(step.x0, ref, rtol=1e-4, atol=1e-4)
        if FAMILIES[name].cfg_batch:  # the guided prediction from the recorded halves: u + g (c − u)
            u, c = step.noise_uncond, step.noise_cond
            torch.testing.assert_close(
                step.noise_pred, u + step.guidance_scale * (c - u), rtol=1e-4, atol=1e-5
            )
    for a, b in zip(tr.steps, tr.steps[1:], strict=False):
        assert torch.equal(a.latents_out, b.latents)  # one step's output is the next one's input


# ---- attention: an explicit softmax --------------------------------------------------------------------------
def _explicit_probs(pipe, name: str, kw: dict) -> tuple[np.ndarray, dict[str, list[torch.Tensor]]]:
    """A plain call; per text-conditioned attention layer and denoiser call, the conditional row's image-query ×
    text-key block (heads, HW, T) of softmax(QKᵀ·scale) — over all keys for joint attention, over the (masked) text
    keys for cross-attention — computed here from each layer's own inputs."""
    from diffusers.models.embeddings import apply_rotary_emb

    fam = FAMILIES[name]
    den = fam.get_denoiser(pipe)
    joint = dict(joint_attention_layers(den)) if fam.denoiser == "transformer" else {}
    names = [n.removesuffix(".processor") for n in joint] or [
        n.removesuffix(".processor") for n in fam.cross_attention_layers(den)
    ]
    modules = dict(den.named_modules())
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    rows_in: dict[str, int] = {}  # Z-Image: its image tokens and the prompt row's caption tokens, per call

    def denoiser_pre(module, args, kwargs):
        if name == "z-image":  # x: per-row latents (C, 1, h, w); cap_feats: per-row caption features (L_i, D)
            rows_in["hw"] = args[0][0].shape[-2] * args[0][0].shape[-1] // 4  # 2×2 patches
            rows_in["text"] = args[2][0].shape[0]  # the prompt's row comes first

    def heads_first(x: torch.Tensor, d: int) -> torch.Tensor:  # (B, L, heads·d) → (B, heads, L, d)
        return x.unflatten(-1, (-1, d)).transpose(1, 2)

    def hook(layer: str, attn):
        def pre(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            c = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            rows = h.shape[0]
            cond = (
                int(fam.cfg_uncond_first) if fam.cfg_batch and rows == 2 else 0
            )  # Z-Image: prompt row first
            if not joint:  # cross-attention: image queries, text keys, PixArt's mask as an additive bias
                d = attn.to_q.out_features // attn.heads
                q, k = attn.to_q(h), attn.to_k(c)
                if type(attn).__name__ == "WanAttention":  # RMSNorm across the heads, before the split
                    q, k = attn.norm_q(q), attn.norm_k(k)
                q, k = heads_first(q, d), heads_first(k, d)
                scale = getattr(attn, "scale", d**-0.5)  # Wan's: SDPA's default
                # (B, heads, HW, T); a video's (B, heads, F·HW, T), its queries frame by frame
                scores = (q @ k.transpose(-1, -2)) * scale
                mask = kwargs.get("attention_mask")
                if mask is not None:  # (B, 1, T) bias
                    scores = scores + mask[:, None]
                seen.setdefault(layer, []).append(scores.softmax(-1)[cond])
                return
            if name == "z-image":  # one sequence: image tokens then caption, each padded to a multiple of 32
                qk = [attn.norm_q(attn.to_q(h).unflatten(-1, (attn.heads, -1)))]
                qk.append(attn.norm_k(attn.to_k(h).unflatten(-1, (attn.heads, -1))))
                rot = kwargs["freqs_cis"].unsqueeze(2)  # (B, L, 1, d/2) complex
                q, k = (
                    torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * rot).flatten(
                        3
                    )
                    for x in qk
                )
                scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * q.shape[-1] ** -0.5  # (B, heads, L, L)
                hw, t = rows_in["hw"], rows_in["text"]
                start = -(-hw // 32) * 32
                seen.setdefault(layer, []).append(scores.softmax(-1)[cond, :, :hw, start : start + t])
                return
            if name == "qwen-image":  # text first; Qwen's complex rotary embedding per stream
                from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen as qrope

                d = attn.inner_dim // attn.heads
                img_f, txt_f = kwargs["image_rotary_emb"]
                q = torch.cat(
                    [
                        qrope(
                            attn.norm_added_q(attn.add_q_proj(c).unflatten(-1, (-1, d))),
                            txt_f,
                            use_real=False,
                        ),
                        qrope(attn.norm_q(attn.to_q(h).unflatten(-1, (-1, d))), img_f, use_real=False),
                    ],
                    1,
                )
                k = torch.cat(
                    [
                        qrope(
                            attn.norm_added_k(attn.add_k_proj(c).unflatten(-1, (-1, d))),
                            txt_f,
                            use_real=False,
                        ),
                        qrope(attn.norm_k(attn.to_k(h).unflatten(-1, (-1, d))), img_f, use_real=False),
                    ],
                    1,
                )
                scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * d**-0.5  # (B, heads, T+HW, T+HW)
                t = c.shape[1]
                seen.setdefault(layer, []).append(scores.softmax(-1)[cond, :, t:, :t])
                return
            if "image_rotary_emb" not in kwargs:  # SD3: image first, then text, scale 1/√d
                d = attn.to_q.out_features // attn.heads
                norm = [
                    f if f is not None else (lambda x: x)
                    for f in (attn.norm_q, attn.norm_k, attn.norm_added_k)
                ]
                q, k = norm[0](heads_first(attn.to_q(h), d)), norm[1](heads_first(attn.to_k(h), d))
                tk = norm[2](heads_first(attn.add_k_proj(c), d))
                hw = h.shape[1]
                scores = (q @ torch.cat([k, tk], 2).transpose(-1, -2)) * attn.scale  # (B, heads, HW, HW+T)
                seen.setdefault(layer, []).append(scores.softmax(-1)[cond, :, :, hw:])
                return
            # Flux.1 / Flux.2: text first, RoPE on q and k; single-stream blocks carry both in one sequence
            d = attn.head_dim

            def split(x):  # (B, L, heads·d) → (B, L, heads, d)
                return x.unflatten(-1, (-1, d))

            if hasattr(attn, "to_qkv_mlp_proj"):
                q, k = (split(x) for x in attn.to_qkv_mlp_proj(h)[..., : 3 * attn.inner_dim].chunk(3, -1)[:2])
            else:
                q, k = split(attn.to_q(h)), split(attn.to_k(h))
            q, k = attn.norm_q(q), attn.norm_k(k)
            if c is not None:
                q = torch.cat([attn.norm_added_q(split(attn.add_q_proj(c))), q], 1)
                k = torch.cat([attn.norm_added_k(split(attn.add_k_proj(c))), k], 1)
            rope = kwargs["image_rotary_emb"]
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * d**-0.5  # (B, heads, L, L)
            mask = kwargs.get("attention_mask")  # Chroma's (B, 1, L, L): SDPA adds a float mask, drops False
            if mask is not None:
                scores = (
                    scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
                )
            p = scores.softmax(-1)
            t = kw["max_sequence_length"]
            seen.setdefault(layer, []).append(p[cond, :, t:, :t])

        return pre

    handles.append(den.register_forward_pre_hook(denoiser_pre, with_kwargs=True))
    for layer in names:
        handles.append(
            modules[layer].register_forward_pre_hook(hook(layer, modules[layer]), with_kwargs=True)
        )
    try:
        with torch.no_grad():
            image = pixels(pipe(prompt=P, generator=gen(0), **kw))
    finally:
        for h in handles:
            h.remove()
    for layer, calls in seen.items():
        if (
            len(calls) == 2 * STEPS
        ):  # CFG as two calls per step (Flux.2 [klein]): the prompt's call comes first
            seen[layer] = calls[::2]
    return image, seen


@pytest.mark.parametrize("name", _params(families_with("attention"), "attention"))
def test_attention_maps_equal_an_explicit_softmax_and_leave_the_image(name) -> None:
    pipe, kw = pipe_of(name), call_kwargs(name)
    want_image, want = _explicit_probs(pipe, name, kw)
    with sdx.observe(pipe, steps=False, attention={"keep_probs": True, "per_head": True}) as obs:
        image = pixels(pipe(prompt=P, generator=gen(0), **kw))
    assert np.array_equal(image, want_image)  # bitwise: the output still comes from the original kernel
    maps = obs.attention
    assert maps.family == name and set(maps.layer_names) == set(want) and want
    for layer, per_step in want.items():
        got = maps.probs[layer]  # (S, B, heads, HW, T)
        assert got.shape[0] == STEPS == len(per_step)
        for s, ref in enumerate(per_step):
            torch.testing.assert_close(got[s, 0].float(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", _params(families_with("attention"), "labels"))
def test_attention_maps_are_labelled_with_the_prompts_words(name) -> None:
    """The words are the prompt's, and the labelled positions are the ones the encoders filled with it: the
    prompt's ids, in order, are a run of some text encoder's input ids (a prefix the pipeline adds, a chat template
    or Sana's instruction, is not the prompt), and where the denoiser takes a text mask the unmasked keys are the
    labelled ones (a shifted window fails either)."""
    pipe, fam = pipe_of(name), FAMILIES[name]
    fed: list[list[int]] = []  # each row of input ids each text encoder received
    masks: list[torch.Tensor] = []  # the denoiser's text masks, (rows, T), where it takes one

    def ids_in(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            fed.extend(ids.reshape(-1, ids.shape[-1]).tolist())

    def mask_in(module, args, kwargs):
        if isinstance(m := kwargs.get("encoder_attention_mask"), torch.Tensor):
            masks.append(m.reshape(m.shape[0], -1))

    encoders = [e for n in fam.text_encoders if (e := getattr(pipe, n, None)) is not None]
    handles = [e.register_forward_pre_hook(ids_in, with_kwargs=True) for e in encoders]
    handles.append(fam.get_denoiser(pipe).register_forward_pre_hook(mask_in, with_kwargs=True))
    try:
        with sdx.observe(pipe, steps=False, attention=True) as obs:
            pipe(prompt=P, generator=gen(0), **call_kwargs(name))
    finally:
        for h in handles:
            h.remove()
    maps = obs.attention
    assert maps.words == P.split()  # each word once, its pieces merged, markers and specials left out
    circle = maps.word("circle")  # (H, W): the summed maps of the word's pieces; a video's (F, H, W)
    assert circle.shape == (*([maps.frames] if maps.frames else []), *maps.latent_size)
    assert float(circle.sum()) > 0
    labels = maps.token_lists[0]
    for seg in labels.parts():  # each part of the sequence (SD3: CLIP's, then T5's) by its own encoder
        span = range(seg.start, seg.stop)
        text = tuple(labels.ids[i] for i in span if labels.kinds[i] == "text")
        runs = {tuple(row[j : j + len(text)]) for row in fed for j in range(len(row) - len(text) + 1)}
        assert text in runs, (
            f"the labelled ids of {seg.name!r} are not the prompt's as a text encoder read it"
        )
    if masks:
        rows = masks[0].shape[0]
        cond = fam.cfg_rows(rows)[1].start if fam.cfg_batch and rows % 2 == 0 else 0  # (uncond, cond)
        assert masks[0].shape[1] == len(labels.ids)
        assert masks[0][cond].bool().tolist() == [k != "pad" for k in labels.kinds]


@pytest.mark.parametrize("name", _params(families_without("attention"), "attention-refused"))
def test_attention_is_refused_naming_the_families_that_can(name) -> None:
    with pytest.raises(UnsupportedPipelineError, match="attention maps work on Stable Diffusion 1.x"):
        sdx.observe(pipe_of(name), steps=True, attention=True)


# ---- the time axis (video families) --------------------------------------------------------------------------
VIDEO = [n for n in ALL_FIXTURE_FAMILIES if FAMILIES[n].video]


@pytest.mark.parametrize("name", _params(VIDEO, "frames"))
def test_video_steps_keep_every_frame_and_strip_them(name) -> None:
    """Latents (B, C, F, h, w) with the VAE's latent frames; each frame previewed from its own x0 frame; a frame
    strip lays the frames of a step left to right."""
    from sdexplore.families import latent_rgb
    from sdexplore.preview import latent_to_uint8

    pipe = pipe_of(name)
    with sdx.observe(pipe, steps={"quantities": "all", "dtype": torch.float32}) as obs:
        video = pixels(pipe(prompt=P, generator=gen(0), **call_kwargs(name)))
    tr = obs.steps
    F = tr.frames
    assert F == (video.shape[1] - 1) // pipe.vae_scale_factor_temporal + 1 > 1
    factors, bias = latent_rgb(pipe)
    for i, step in enumerate(tr):
        assert step.latents.shape[2] == step.x0.shape[2] == F and step.preview.shape[:2] == (1, F)
        h, w = step.preview.shape[2:4]
        strip = np.asarray(tr.frame_strip(i))  # (h, F·w, 3)
        assert strip.shape == (h, F * w, 3)
        for f in range(F):
            own = latent_to_uint8(step.x0[:, :, f], factors, bias)[0]  # (h, w, 3) of x0's frame f alone
            assert (step.preview[0, f].int() - own.int()).abs().max() <= 1  # float rounding: one level
            assert np.array_equal(strip[:, f * w : (f + 1) * w], step.preview[0, f].numpy())
    assert tr.frame_strip(0, scale=3).size == (3 * F * w, 3 * h)


@pytest.mark.parametrize("name", _params([n for n in VIDEO if FAMILIES[n].can("attention")], "frame-maps"))
def test_video_maps_per_frame_and_step_equal_an_explicit_softmax(name) -> None:
    """The reduced maps (no probabilities kept) per layer and frame, and per step and frame, equal the explicit
    softmax's head mean reshaped frame by frame (queries run frame-major, then rows, then columns)."""
    from sdexplore.heatmaps import resize

    pipe, kw = pipe_of(name), call_kwargs(name)
    _, want = _explicit_probs(pipe, name, kw)  # layer → per step (heads, F·h·w, T)
    with sdx.observe(pipe, steps=False, attention=True) as obs:
        pixels(pipe(prompt=P, generator=gen(0), **kw))
    maps = obs.attention
    F = maps.frames
    at = maps.token_lists[0].positions("circle", None)
    per_step = []
    for layer, calls in want.items():
        grid = tuple(maps.layers[layer].shape[2:])  # (F, h, w)
        assert grid[0] == F > 1
        each = [p.mean(0)[:, at].sum(-1).reshape(grid) for p in calls]  # per step (F, h, w): head mean
        ref = torch.stack(each).mean(0)
        per_step.append([resize(m, maps.steps.shape[-2:]) for m in each])
        for f in range(F):
            got = maps.word("circle", layer=layer, frame=f)  # (h, w)
            torch.testing.assert_close(got, ref[f], rtol=0, atol=1e-5)
        assert torch.equal(
            maps.word("circle", layer=layer),
            torch.stack([maps.word("circle", layer=layer, frame=f) for f in range(F)]),
        )
    for s in range(STEPS):  # per step: the mean over layers, at the step maps' size
        ref = torch.stack([layer_steps[s] for layer_steps in per_step]).mean(0)  # (F, hs, ws)
        for f in range(F):
            torch.testing.assert_close(maps.word("circle", step=s, frame=f), ref[f], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", _params(families_with("steps"), "files"))
def test_recorded_results_load_back(name, tmp_path) -> None:
    """A trace and (where the family has them) attention maps survive save → load: shapes, frames, kind."""
    from sdexplore.results.attention_maps import AttentionMaps
    from sdexplore.results.trace import Trace

    pipe = pipe_of(name)
    attention = FAMILIES[name].can("attention")
    with sdx.observe(pipe, steps=True, attention=attention) as obs:
        pixels(pipe(prompt=P, generator=gen(0), **call_kwargs(name)))
    tr = Trace.load(obs.steps.save(tmp_path / "trace.safetensors"))
    assert tr.frames == obs.steps.frames and (tr.frames is not None) == FAMILIES[name].video
    assert torch.equal(tr[-1].latents, obs.steps[-1].latents)
    if attention:
        maps = AttentionMaps.load(obs.attention.save(tmp_path / "maps.safetensors"))
        assert (maps.frames, maps.kind) == (obs.attention.frames, obs.attention.kind)
        assert torch.equal(maps.aggregate, obs.attention.aggregate)


# ---- steering ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params(families_with("steering"), "steering"))
def test_steering_edits_latents(name) -> None:
    pipe, kw = pipe_of(name), call_kwargs(name, num_inference_steps=3)
    full = pixels(pipe(prompt=P, generator=gen(0), **kw))
    with sdx.observe(pipe, edit_latents=lambda step, latents: latents):  # an identity edit: bit for bit
        same = pixels(pipe(prompt=P, generator=gen(0), **kw))
    assert np.array_equal(same, full)
    with sdx.observe(pipe, edit_latents=lambda step, latents: -latents if step == 0 else latents):
        edited = pixels(pipe(prompt=P, generator=gen(0), **kw))
    assert np.abs(edited - full).max() > 1e-4


@pytest.mark.parametrize("name", _params(families_with("stop_at"), "stop_at"))
def test_stop_at_stops_early(name) -> None:
    pipe, kw = pipe_of(name), call_kwargs(name, num_inference_steps=3)
    full = pixels(pipe(prompt=P, generator=gen(0), **kw))
    with sdx.observe(pipe, stop_at=1) as obs:
        early = pixels(pipe(prompt=P, generator=gen(0), **kw))
    assert len(obs.steps) == 1 and early.shape == full.shape and np.abs(early - full).max() > 1e-4
    assert not getattr(pipe, "_interrupt", False)  # the flag is handed back


@pytest.mark.parametrize("name", _params(families_without("stop_at"), "stop_at-refused"))
def test_stop_at_is_refused_where_the_pipeline_cannot_stop(name) -> None:
    with pytest.raises(UnsupportedPipelineError, match="cannot use stop_at: the loop of .* interrupt flag"):
        sdx.observe(pipe_of(name), stop_at=1)


# ---- controls and injection ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params(families_with("controls"), "controls"))
def test_zero_strength_controls_give_the_plain_image(name) -> None:
    pipe, want = pipe_of(name), plain(name)
    with sdx.Control(pipe, sdx.Reweight({"circle": 1.0})):
        image = pixels(pipe(prompt=P, generator=gen(0), **call_kwargs(name)))
    assert np.array_equal(image, want)
    with sdx.Control(pipe, sdx.Reweight({"circle": 0.0})):
        ablated = pixels(pipe(prompt=P, generator=gen(0), **call_kwargs(name)))
    assert np.abs(ablated - want).max() > 0


@pytest.mark.parametrize("name", _params(families_without("controls"), "controls-refused"))
def test_controls_are_refused_naming_the_families_that_can(name) -> None:
    with pytest.raises(UnsupportedPipelineError, match="controls"):
        sdx.Control(pipe_of(name), sdx.Reweight({"circle": 2.0}))


@pytest.mark.parametrize("name", _params(families_with("inject"), "inject"))
def test_an_empty_injection_gives_the_plain_images(name) -> None:
    pipe, kw = pipe_of(name), call_kwargs(name)

    def pair() -> dict:  # a source and a target row from the same noise
        return dict(prompt=[P, "a green square"], generator=[gen(0), gen(0)], **kw)

    want = pixels(pipe(**pair()))
    with sdx.Control(pipe, sdx.Inject(steps=(0.5, 0.5))):
        image = pixels(pipe(**pair()))
    assert np.array_equal(image, want)


@pytest.mark.parametrize(
    "name", _params([n for n in families_without("inject") if FAMILIES[n].can("controls")], "inject-refused")
)
def test_injection_is_refused_without_joint_attention(name) -> None:
    with pytest.raises(UnsupportedPipelineError, match="joint attention"):
        with sdx.Control(pipe_of(name), sdx.Inject()):
            pass


# ---- inversion, walks, concepts ------------------------------------------------------------------------------
def _picture() -> np.ndarray:
    y, x = np.mgrid[0:64, 0:64]
    img = np.zeros((64, 64, 3), np.uint8)
    img[...] = (40, 60, 200)
    img[(y - 32) ** 2 + (x - 24) ** 2 < 200] = (220, 30, 30)
    return img


@pytest.mark.parametrize("name", _params(families_with("invert"), "invert"))
def test_inversion_returns_noise_of_the_latent_shape(name) -> None:
    pipe = pipe_of(name)
    inv = sdx.invert(pipe, _picture(), "a red circle", steps=2, iterations=0, height=64, width=64)
    assert inv.latents.shape[-3] == FAMILIES[name].latent_channels and torch.isfinite(inv.latents).all()


@pytest.mark.parametrize("name", _params(families_without("invert"), "invert-refused"))
def test_inversion_is_refused(name) -> None:
    with pytest.raises(UnsupportedPipelineError, match="invert"):
        sdx.invert(pipe_of(name), _picture(), "a red circle", steps=2)


@pytest.mark.parametrize("name", _params(families_without("null-text"), "null-text-refused"))
def test_null_text_inversion_is_refused_naming_the_unet_families(name) -> None:
    with pytest.raises(UnsupportedPipelineError, match="SD 1.x, SD 2.x and SDXL"):
        sdx.invert(pipe_of(name), _picture(), "a red circle", steps=2, method="null-text")


@pytest.mark.parametrize("name", _params(families_with("walks"), "walks"))
def test_walk_lands_on_its_keyframes(name) -> None:
    pipe, kw = pipe_of(name), call_kwargs(name)
    kw.pop("output_type")
    w = sdx.walk(pipe, [P, "a green square"], seeds=[0, 1], frames=3, batch_size=3, progress=False, **kw)
    assert w.images.shape == (3, 64, 64, 3) and w.keyframe_frames == [0, 2]
    want = np.asarray(plain(name, output_type="pil")[0], dtype=np.int16)
    assert np.abs(w.images[0].astype(np.int16) - want).max() <= 1  # the first frame is the plain call


@pytest.mark.parametrize("name", _params(families_without("walks"), "walks-refused"))
def test_walks_are_refused(name) -> None:
    with pytest.raises((UnsupportedPipelineError, InvalidArgumentError)):
        kw = call_kwargs(name)
        kw.pop("output_type")
        sdx.walk(pipe_of(name), [P, "a green square"], seeds=[0, 1], frames=2, progress=False, **kw)


@pytest.mark.parametrize("name", _params(families_with("concepts"), "concepts"))
def test_concept_maps_are_recorded_and_leave_the_image(name) -> None:
    pipe, want = pipe_of(name), plain(name)
    with sdx.observe(pipe, steps=False, attention={"concepts": ["sky"]}) as obs:
        image = pixels(pipe(prompt=P, generator=gen(0), **call_kwargs(name)))
    assert np.array_equal(image, want)
    sky = obs.attention.concept("sky")
    assert torch.isfinite(sky).all() and float(sky.std()) > 0


@pytest.mark.parametrize(
    "name",
    _params([n for n in families_without("concepts") if FAMILIES[n].can("attention")], "concepts-refused"),
)
def test_concepts_are_refused(name) -> None:
    pipe = pipe_of(name)
    with pytest.raises(UnsupportedPipelineError, match="cannot use concept maps"):
        with sdx.AttentionRecorder(pipe, concepts=["sky"]):
            pipe(prompt=P, generator=gen(0), **call_kwargs(name))


# ---- the other tools' refusals -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", _params(families_without("flowedit"), "flowedit-refused"))
def test_flowedit_is_refused(name) -> None:
    from sdexplore.flowedit import check_flow_family

    with pytest.raises(UnsupportedPipelineError, match="flow-matching"):
        check_flow_family(pipe_of(name))


@pytest.mark.parametrize("name", _params(families_without("ablate-text"), "ablate-text-refused"))
def test_text_ablation_is_refused(name) -> None:
    from sdexplore.record.ablate_text import check_ablatable

    with pytest.raises(UnsupportedPipelineError, match="ablation"):
        check_ablatable(pipe_of(name))


@pytest.mark.parametrize("name", _params(families_without("directions"), "directions-refused"))
def test_directions_are_refused(name) -> None:
    from sdexplore.directions.apply import check_family

    with pytest.raises((UnsupportedPipelineError, InvalidArgumentError), match="Directions"):
        check_family(pipe_of(name))


# ---- every refusal names the families that can ---------------------------------------------------------------
def _refuse(capability: str, pipe, name: str) -> None:
    """Ask ``pipe`` for ``capability`` through its tool's public entry point (each refuses before any step)."""
    from sdexplore.directions.apply import check_family
    from sdexplore.flowedit import check_flow_family
    from sdexplore.record.ablate_text import check_ablatable

    kw = call_kwargs(name)
    calls = {
        "stop_at": lambda: sdx.observe(pipe, stop_at=1),
        "attention": lambda: sdx.observe(pipe, steps=True, attention=True),
        "controls": lambda: sdx.Control(pipe, sdx.Reweight({"circle": 2.0})),
        "inject": lambda: sdx.Control(pipe, sdx.Inject()).__enter__(),
        "invert": lambda: sdx.invert(pipe, _picture(), "a red circle", steps=2),
        "null-text": lambda: sdx.invert(pipe, _picture(), "a red circle", steps=2, method="null-text"),
        "flowedit": lambda: check_flow_family(pipe),
        "walks": lambda: sdx.walk(pipe, [P, "a green square"], seeds=[0, 1], frames=2, progress=False,
                                  **{k: v for k, v in kw.items() if k != "output_type"}),
        "directions": lambda: check_family(pipe),
        "ablate-text": lambda: check_ablatable(pipe),
    }  # fmt: skip
    if capability == "concepts":
        with sdx.AttentionRecorder(pipe, concepts=["sky"]):
            pipe(prompt=P, generator=gen(0), **kw)
    else:
        calls[capability]()


#: What a refusal needs before it can be asked (concepts and inject are asked of families with maps, controls).
_REFUSAL_NEEDS = {"concepts": "attention", "inject": "controls"}
_REFUSALS = [
    (c, n)
    for c in CAPABILITIES
    if c not in ("steps", "steering")
    for n in families_without(c)
    if FAMILIES[n].can(_REFUSAL_NEEDS.get(c, "steps"))
]


@pytest.mark.parametrize(
    ("capability", "name"),
    [
        pytest.param(c, n, marks=pytest.mark.xfail(strict=True, reason=PENDING[f"{c}-names", n]))
        if (f"{c}-names", n) in PENDING
        else pytest.param(c, n)
        for c, n in _REFUSALS
    ],
)
def test_each_refusal_names_every_family_that_can(capability, name) -> None:
    """A capability a family's record does not claim is refused with UnsupportedPipelineError naming, by label,
    every family whose record claims it (Family.require's sentence)."""
    with pytest.raises(UnsupportedPipelineError) as e:
        _refuse(capability, pipe_of(name), name)
    message = str(e.value)
    able = [f.label for f in FAMILIES.values() if f.can(capability)]
    assert able and all(label in message for label in able), (capability, message)
    assert FAMILIES[name].label in message


def test_require_passes_a_capable_family_and_words_the_refusal() -> None:
    from sdexplore.families import capable_families, refusal

    sd1, sana = FAMILIES["sd1"], FAMILIES["sana"]
    assert sd1.require("invert", "sdexplore.invert") is sd1
    assert [f.name for f in capable_families("flowedit")] == ["sd3", "flux", "flux2"]
    with pytest.raises(UnsupportedPipelineError) as e:
        sana.require("invert", "sdexplore.invert", why="a reason", hint="Do this.")
    assert str(e.value) == refusal(sana, "invert", "sdexplore.invert", why="a reason", hint="Do this.")
    assert str(e.value).startswith(
        "Sana cannot use sdexplore.invert: a reason. The families that can: Stable Diffusion 1.x, "
    )
    assert str(e.value).endswith(" and Flux.2. Do this.")
    with pytest.raises(InvalidArgumentError, match="Unknown capability"):
        sana.require("teleport", "x")


# ---- masked joint attention (Chroma) -------------------------------------------------------------------------
def test_key_bias_reads_bool_and_float_masks_and_text_block_applies_it() -> None:
    from sdexplore.record.joint import key_bias, text_block

    keep = torch.tensor(
        [[1, 1, 0, 1, 1, 1]], dtype=torch.bool
    )  # 3 text keys (the third masked), 3 image keys
    outer = keep[:, None, None, :] & keep[:, None, :, None]  # (1, 1, 6, 6): Chroma's outer product
    bias = key_bias(outer, 6)
    assert bias.tolist() == [[0.0, 0.0, float("-inf"), 0.0, 0.0, 0.0]]
    assert key_bias(outer.float(), 6).tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]]  # a float mask is added
    assert key_bias(outer[..., :5], 6) is None  # not a (N, 1, L, L) mask: the original processor runs
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 6, 4)  # image queries; text keys then image keys
    for b in (bias, key_bias(outer.float(), 6)):
        want = ((q @ k.transpose(-1, -2)) * 0.5 + b[:, None, None, :]).softmax(-1)[..., :3]  # (1, 2, 3, 3)
        lse = ((q @ k.transpose(-1, -2)) * 0.5 + b[:, None, None, :]).logsumexp(-1)
        got, _ = text_block(q, k[:, :, :3], lse, 0.5, "joint", key_bias=b[:, :3])
        torch.testing.assert_close(got, want)

"""MMDiT joint-attention maps: equal to an explicit softmax(QKᵀ) computed here, the image unchanged, kinds, restore."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_restored, gen, pipeline_state

import sdexplore as sdx
import sdexplore.record.joint as joint_mod
from sdexplore.errors import InvalidArgumentError, UnsupportedPipelineError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.joint import sdpa_with_lse

P = "a red circle on a blue background"
KW = dict(num_inference_steps=3, height=64, width=64, output_type="np", guidance_scale=5.0)


@pytest.fixture(scope="module")
def sd3():
    return tiny_pipeline("sd3", t5=True)


def _explicit(
    sd3, prompt: str
) -> tuple[object, dict[str, list[torch.Tensor]], dict[str, list[torch.Tensor]]]:
    """A plain call; for every joint layer and call, the conditional row's text block of softmax(QKᵀ·scale) over
    all keys and of the text-only softmax, each (heads, HW, T), computed here from the layer's own inputs."""
    joint: dict[str, list[torch.Tensor]] = {}
    text: dict[str, list[torch.Tensor]] = {}
    handles = []

    def hook(name, attn):
        def pre(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            c = kwargs.get("encoder_hidden_states")
            B, HW, _ = h.shape
            heads = attn.heads
            d = attn.to_q.out_features // heads

            def split(x):  # (B, L, heads*d) -> (B, heads, L, d)
                return x.view(B, -1, heads, d).transpose(1, 2)

            def norm(f):  # SD3.5 normalises q and k (RMSNorm); SD3 does not
                return f if f is not None else (lambda x: x)

            q, k = norm(attn.norm_q)(split(attn.to_q(h))), norm(attn.norm_k)(split(attn.to_k(h)))
            tk = norm(attn.norm_added_k)(split(attn.add_k_proj(c)))
            scores = (q @ torch.cat([k, tk], 2).transpose(-1, -2)) * attn.scale  # (B, heads, HW, HW+T)
            joint.setdefault(name, []).append(scores.softmax(-1)[1, :, :, HW:])  # cond row: the second
            text.setdefault(name, []).append(scores[..., HW:].softmax(-1)[1])

        return pre

    for name, module in sd3.transformer.named_modules():
        if name.endswith(".attn") and getattr(module, "add_k_proj", None) is not None:
            handles.append(module.register_forward_pre_hook(hook(name, module), with_kwargs=True))
    try:
        with torch.no_grad():
            image = sd3(P, generator=gen(0), **KW).images
    finally:
        for h in handles:
            h.remove()
    return image, joint, text


def test_joint_maps_equal_an_explicit_softmax_and_the_image_is_unchanged(sd3) -> None:
    plain, joint, text = _explicit(sd3, P)
    assert joint and all(len(v) == 3 for v in joint.values())  # two joint layers, three steps
    for kind, want in (("joint", joint), ("text", text)):
        with sdx.AttentionRecorder(sd3, kind=kind, keep_probs=True, per_head=True) as rec:
            image = sd3(P, generator=gen(0), **KW).images
        assert (image == plain).all()  # bitwise: the output still comes from the fused kernel
        maps = rec.maps
        assert maps.kind == kind and maps.family == "sd3" and maps.layer_names == list(want)
        assert maps.words == P.split() and maps.aggregate.shape[1] == 77 + 256  # CLIP's 77, then T5's 256
        clip, t5 = (
            maps.token_lists[0].positions("circle", segment="clip"),
            maps.token_lists[0].positions("circle", segment="t5"),
        )
        assert clip and t5 and min(t5) >= 77  # the word is labelled in both parts of the joint sequence
        for name, per_step in want.items():
            got = maps.probs[name]  # (S, B, heads, HW, T)
            assert got.shape == (3, 1, *per_step[0].shape)
            for s, ref in enumerate(per_step):
                torch.testing.assert_close(got[s, 0].float(), ref, rtol=0, atol=2e-6)
            # the head-mean layer map is the mean over heads and steps of the same probabilities
            mean = torch.stack(per_step).mean((0, 1))  # (HW, T)
            torch.testing.assert_close(maps.layers[name][0].flatten(1).T, mean, rtol=0, atol=2e-6)
        sums = maps.aggregate.sum(1)  # (B, H, W): the mass on text keys
        if kind == "joint":
            assert float(sums.max()) < 1 - 1e-3  # part of each query's mass went to the image keys
        else:
            torch.testing.assert_close(sums, torch.ones_like(sums))


def test_head_chunked_means_equal_the_full_probabilities(sd3, monkeypatch) -> None:
    with sdx.AttentionRecorder(sd3, per_head=True) as full:
        sd3(P, generator=gen(1), **KW)
    monkeypatch.setattr("sdexplore.record.attention.PROBS_BYTES_CPU", 1)  # one head per batch
    with sdx.AttentionRecorder(sd3) as chunked:
        sd3(P, generator=gen(1), **KW)
    for name, heads in full.maps.layer_heads.items():
        torch.testing.assert_close(chunked.maps.layers[name], heads.mean(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.maps.steps, full.maps.steps, rtol=0, atol=1e-6)


def test_without_a_kernel_log_sum_exp_the_maps_are_the_same(sd3, monkeypatch) -> None:
    with sdx.AttentionRecorder(sd3) as kernel:
        sd3(P, generator=gen(2), **KW)

    def math_only(q, k, v, need_lse=True):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), None

    monkeypatch.setattr(joint_mod, "sdpa_with_lse", math_only)
    with sdx.AttentionRecorder(sd3) as explicit:
        sd3(P, generator=gen(2), **KW)
    torch.testing.assert_close(explicit.maps.aggregate, kernel.maps.aggregate, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def flux():
    return tiny_pipeline("flux")


FLUX_KW = dict(num_inference_steps=2, height=64, width=64, output_type="np", max_sequence_length=32)


def _explicit_flux(flux, kw=FLUX_KW) -> tuple[object, dict[str, list[torch.Tensor]]]:
    """A plain Flux (or Flux.2) call; per double- and single-stream layer and call, the text block (heads, HW, T)
    of softmax(QKᵀ/√d) over all keys after RoPE, computed here from the layer's own inputs (text first)."""
    from diffusers.models.embeddings import apply_rotary_emb

    want: dict[str, list[torch.Tensor]] = {}
    handles = []
    T = kw["max_sequence_length"]

    def hook(name, attn):
        def pre(module, args, kwargs):
            h, c = kwargs["hidden_states"], kwargs.get("encoder_hidden_states")
            rope = kwargs["image_rotary_emb"]

            def heads(x):  # (B, L, heads*d) -> (B, L, heads, d)
                return x.unflatten(-1, (-1, attn.head_dim))

            if hasattr(attn, "to_qkv_mlp_proj"):  # Flux.2 single-stream: q, k, v and the MLP input in one
                qkv = attn.to_qkv_mlp_proj(h)[..., : 3 * attn.inner_dim]
                q, k = (heads(x) for x in qkv.chunk(3, dim=-1)[:2])
                q, k = attn.norm_q(q), attn.norm_k(k)
            else:
                q, k = attn.norm_q(heads(attn.to_q(h))), attn.norm_k(heads(attn.to_k(h)))
            if c is not None:  # double-stream: the text's own projections, text first
                q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(c))), q], 1)
                k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(c))), k], 1)
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, L, d)
            p = ((q @ k.transpose(-1, -2)) * attn.head_dim**-0.5).softmax(-1)  # (B, heads, L, L)
            want.setdefault(name, []).append(p[0, :, T:, :T])  # image queries x text keys

        return pre

    for name, module in flux.transformer.named_modules():
        if name.endswith(".attn"):
            handles.append(module.register_forward_pre_hook(hook(name, module), with_kwargs=True))
    try:
        with torch.no_grad():
            image = flux(prompt=P, generator=gen(0), **kw).images
    finally:
        for h in handles:
            h.remove()
    return image, want


def test_flux_maps_of_double_and_single_stream_blocks_equal_an_explicit_softmax(flux) -> None:
    plain, want = _explicit_flux(flux)
    assert any(n.startswith("single_") for n in want) and any(n.startswith("transformer_") for n in want)
    with sdx.AttentionRecorder(flux, keep_probs=True) as rec:
        image = flux(P, generator=gen(0), **FLUX_KW).images
    assert (image == plain).all()
    maps = rec.maps
    assert maps.kind == "joint" and maps.family == "flux" and set(maps.layer_names) == set(want)
    assert maps.latent_size == (8, 8) and maps.aggregate.shape[1] == FLUX_KW["max_sequence_length"]
    assert maps.words == P.split() and maps.tokens[2:4] == ["cir", "cle"]  # T5 pieces merged into words
    for name, per_step in want.items():
        for s, ref in enumerate(per_step):
            torch.testing.assert_close(maps.probs[name][s, 0].float(), ref, rtol=0, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_with_lse_is_sdpa_bitwise_with_the_true_log_sum_exp(dtype) -> None:
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen(i)).to(dtype) for i in range(3))
    out, lse = sdpa_with_lse(q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    want = ((q.float() @ k.float().transpose(-1, -2)) * 16**-0.5).logsumexp(-1)  # (2, 3, 40)
    torch.testing.assert_close(lse, want, rtol=0, atol=1e-4 if dtype == torch.bfloat16 else 1e-5)


def test_output_maps_are_a_softmax_over_the_words_and_saved_with_their_kind(sd3, tmp_path) -> None:
    with sdx.AttentionRecorder(sd3, kind="output") as rec:
        sd3(P, generator=gen(0), **KW)
    maps = rec.maps
    assert maps.kind == "output"
    sums = maps.aggregate.sum(1)
    torch.testing.assert_close(sums, torch.ones_like(sums))  # a distribution over text positions per pixel
    loaded = sdx.AttentionMaps.load(maps.save(tmp_path / "m"))
    assert loaded.kind == "output"
    assert torch.equal(loaded.aggregate, maps.aggregate)


def test_bad_kinds_are_refused_before_anything_changes(sd3) -> None:
    before = pipeline_state(sd3)
    with pytest.raises(InvalidArgumentError, match="'joint'"):
        sdx.AttentionRecorder(sd3, kind="cross")
    with pytest.raises(InvalidArgumentError, match="MMDiT"):
        sdx.AttentionRecorder(tiny_pipeline("sd1"), kind="joint")
    assert_restored(sd3, before)


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_joint_processors_are_restored_after_a_fault(sd3, flux, fault) -> None:
    def boom(pipe, i, t, kw):
        raise fault("stop")

    for pipe, kw in ((sd3, KW), (flux, FLUX_KW)):
        with pytest.raises(fault):  # a plain faulting call first: the pipeline's own state after one
            pipe(P, generator=gen(0), callback_on_step_end=boom, **kw)
        before = pipeline_state(pipe)
        with pytest.raises(fault), sdx.AttentionRecorder(pipe):
            pipe(P, generator=gen(0), callback_on_step_end=boom, **kw)
        assert_restored(pipe, before)
        pipe(P, generator=gen(0), **kw)
        before = pipeline_state(pipe)
        with sdx.AttentionRecorder(pipe):
            pipe(P, generator=gen(0), **kw)
        assert_restored(pipe, before)


def test_flux_true_cfg_records_the_prompts_call_only(flux) -> None:
    kw = dict(FLUX_KW, true_cfg_scale=3.0, negative_prompt="blurry")
    plain = flux(P, generator=gen(0), **kw).images
    with sdx.AttentionRecorder(flux) as rec:
        image = flux(P, generator=gen(0), **kw).images
    assert (image == plain).all()
    assert rec.maps.num_steps == kw["num_inference_steps"]  # one map per step, not per denoiser call
    assert torch.equal(rec.maps.timesteps, flux.scheduler.timesteps.float())  # the schedule's, step by step
    with sdx.AttentionRecorder(flux) as alone:
        flux(P, generator=gen(0), **FLUX_KW)
    # the prompt's call of the first step sees the same latents with or without true CFG
    torch.testing.assert_close(rec.maps.steps[0], alone.maps.steps[0], rtol=0, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="negative=True"):
        sdx.AttentionRecorder(flux, negative=True)


def test_sd3_concept_maps_equal_an_explicit_concept_stream(sd3) -> None:
    """The concept tokens, run here through each joint block by the block itself (its text side only reads the
    image and the text it is given), give keys whose joint-softmax masses equal the recorded concept maps."""
    from sdexplore.record.tokens import sequence_tokens

    concepts = ["sky", "green grass"]
    inputs: dict[int, dict] = {}
    blocks = sd3.transformer.transformer_blocks

    def grab(i):
        def pre(module, args, kwargs):
            inputs.setdefault(i, []).append(
                {k: kwargs[k][1:2] for k in ("hidden_states", "encoder_hidden_states", "temb")}
            )

        return pre

    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            plain = sd3(P, generator=gen(0), **KW).images
    finally:
        for h in handles:
            h.remove()
    with sdx.AttentionRecorder(sd3, concepts=concepts) as rec:
        image = sd3(P, generator=gen(0), **KW).images
    assert (image == plain).all()
    maps = rec.maps
    embeds = sd3.encode_prompt(concepts, None, None, device="cpu", do_classifier_free_guidance=False)[0]
    words = [[i for i, k in enumerate(sequence_tokens(sd3, c).kinds) if k == "text"] for c in concepts]
    c0 = sd3.transformer.context_embedder(torch.cat([embeds[i, w] for i, w in enumerate(words)]))[None]
    spans, start = [], 0
    for w in words:
        spans.append((start, start + len(w)))
        start += len(w)
    with torch.no_grad():
        want = {i: [] for i in range(len(blocks))}
        for s in range(KW["num_inference_steps"]):
            c = c0
            for i, block in enumerate(blocks):
                x = inputs[i][s]
                attn, heads = block.attn, block.attn.heads

                def split(t, heads=heads):  # (1, L, heads*d) -> (1, heads, L, d)
                    return t.view(1, t.shape[1], heads, -1).transpose(1, 2)

                norm_h = block.norm1(x["hidden_states"], emb=x["temb"])[0]
                if block.context_pre_only:
                    norm_t, norm_c = (
                        block.norm1_context(t, x["temb"]) for t in (x["encoder_hidden_states"], c)
                    )
                else:
                    norm_t, norm_c = (
                        block.norm1_context(t, emb=x["temb"])[0] for t in (x["encoder_hidden_states"], c)
                    )
                q = split(attn.to_q(norm_h))
                keys = torch.cat([split(attn.to_k(norm_h)), split(attn.add_k_proj(norm_t))], 2)
                lse = ((q @ keys.transpose(-1, -2)) * attn.scale).logsumexp(-1)  # (1, heads, HW)
                sc = (q @ split(attn.add_k_proj(norm_c)).transpose(-1, -2)) * attn.scale  # (1, heads, HW, C')
                masses = []
                for a, z in spans:
                    both = torch.logaddexp(lse, sc[..., a:z].logsumexp(-1))
                    masses.append((sc[..., a:z] - both[..., None]).exp().sum(-1).mean(1)[0])  # (HW,)
                want[i].append(torch.stack(masses))  # (C, HW)
                if not block.context_pre_only:  # the block itself advances the concept tokens
                    c = block(hidden_states=x["hidden_states"], encoder_hidden_states=c, temb=x["temb"])[0]
    for i in range(len(blocks)):
        got = maps.concept_layers[f"transformer_blocks.{i}.attn"][0].flatten(1)  # (C, HW)
        torch.testing.assert_close(got, torch.stack(want[i]).mean(0), rtol=0, atol=2e-6)
    assert maps.concept("sky").shape == maps.word("circle").shape


def test_flux_concept_maps_leave_the_image_and_the_prompt_maps(flux) -> None:
    plain = flux(P, generator=gen(0), **FLUX_KW).images
    with sdx.AttentionRecorder(flux) as bare:
        flux(P, generator=gen(0), **FLUX_KW)
    for kind in ("joint", "output"):
        with sdx.AttentionRecorder(flux, kind=kind, concepts=["sky"]) as rec:
            image = flux(P, generator=gen(0), **FLUX_KW).images
        assert (image == plain).all()
        if kind == "joint":
            torch.testing.assert_close(rec.maps.aggregate, bare.maps.aggregate, rtol=0, atol=1e-7)
        sky = rec.maps.concept_layers  # every double- and single-stream layer has a concept map
        assert set(sky) == set(rec.maps.layer_names)
        assert all(float(m.min()) >= 0 and float(m.max()) <= 1 and float(m.std()) > 0 for m in sky.values())
    with pytest.raises(InvalidArgumentError, match="every layer"):
        sdx.AttentionRecorder(flux, concepts=["sky"], layers="single")


def test_flux2_klein_maps_equal_an_explicit_softmax() -> None:
    klein = tiny_pipeline("flux2")
    kw = dict(FLUX_KW, guidance_scale=1.0)  # Klein's CFG would add a negative call per step
    plain, want = _explicit_flux(klein, kw)
    assert any(n.startswith("single_") for n in want)
    with sdx.AttentionRecorder(klein, keep_probs=True) as rec:
        image = klein(prompt=P, generator=gen(0), **kw).images
    assert (image == plain).all()
    maps = rec.maps
    assert maps.family == "flux2" and set(maps.layer_names) == set(want) and maps.words == P.split()
    for name, per_step in want.items():
        for s, ref in enumerate(per_step):
            torch.testing.assert_close(maps.probs[name][s, 0].float(), ref, rtol=0, atol=2e-6)
    cfg = dict(FLUX_KW, guidance_scale=4.0)  # two denoiser calls per step: the prompt's, then the negative's
    plain = klein(prompt=P, generator=gen(0), **cfg).images
    with sdx.AttentionRecorder(klein) as rec:
        image = klein(prompt=P, generator=gen(0), **cfg).images
    assert (image == plain).all() and rec.maps.num_steps == cfg["num_inference_steps"]
    torch.testing.assert_close(rec.maps.steps[0], maps.steps[0], rtol=0, atol=1e-6)  # the prompt's call
    with pytest.raises(UnsupportedPipelineError, match="Flux.2 cannot use concept maps"):
        sdx.AttentionRecorder(klein, concepts=["sky"])

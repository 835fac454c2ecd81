"""Attention relations beyond image→text (record/relations.py): image→image, text→image and text→text maps equal an
explicit softmax computed here from each layer's own inputs; images stay bitwise plain; the plan counts the maps to
the byte; files keep the relation; a relation a model does not have is refused before any run."""

from __future__ import annotations

import pytest
import torch
from conftest import gen
from diffusers.models.embeddings import apply_rotary_emb

from sdexplore.errors import InvalidArgumentError, SelectionError, UnsupportedPipelineError
from sdexplore.families import FAMILIES
from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline
from sdexplore.record.attention import AttentionRecorder
from sdexplore.record.joint import joint_attention_layers
from sdexplore.record.relations import grid_weights, self_attention_layers
from sdexplore.results.attention_maps import AttentionMaps

P = "a red circle on a blue background"
STEPS = 2
_PIPES: dict[str, object] = {}


def pipe_of(name: str):
    if name not in _PIPES:
        _PIPES[name] = tiny_pipeline(name)
    return _PIPES[name]


def kwargs_of(name: str) -> dict:
    kw = dict(num_inference_steps=STEPS, height=64, width=64, output_type="latent")
    kw.update(fixture_call_defaults(name))
    if name in ("flux", "chroma"):
        kw["max_sequence_length"] = 32
    return kw


def mask_of_rows(rows: list[int], size: int = 8) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[rows] = True
    return m


QUERIES = [(2, 3), mask_of_rows([4, 5])]  # a point and a mask on the fixtures' 8×8 latent grid


def _heads_first(x: torch.Tensor, d: int) -> torch.Tensor:  # (B, L, heads·d) → (B, heads, L, d)
    return x.unflatten(-1, (-1, d)).transpose(1, 2)


def _explicit(pipe, name: str, kw: dict, self_attention: bool = False):
    """A plain call; per layer and denoiser call, the conditional row's full softmax (heads, L, L) with the image
    and text slices of its sequence, computed here (UNet-style self-attention: image only)."""
    fam = FAMILIES[name]
    den = fam.get_denoiser(pipe)
    if self_attention:
        names = [n.removesuffix(".processor") for n in self_attention_layers(den)]
    else:
        names = [n.removesuffix(".processor") for n, _ in joint_attention_layers(den)]
    modules = dict(den.named_modules())
    seen: dict[str, list] = {}

    def hook(layer: str, attn):
        def pre(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            c = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            cond = 1 if fam.cfg_batch and h.shape[0] == 2 else 0
            if self_attention:
                d = attn.to_q.out_features // attn.heads
                q, k = _heads_first(attn.to_q(h), d), _heads_first(attn.to_k(h), d)
                p = ((q @ k.transpose(-1, -2)) * d**-0.5).softmax(-1)
                seen.setdefault(layer, []).append((p[cond], slice(None), None))
                return
            if "image_rotary_emb" not in kwargs:  # SD3: image first, then text
                d = attn.to_q.out_features // attn.heads
                ident = lambda x: x  # noqa: E731
                nq, nk, naq, nak = (
                    f if f is not None else ident
                    for f in (attn.norm_q, attn.norm_k, attn.norm_added_q, attn.norm_added_k)
                )
                q = torch.cat(
                    [nq(_heads_first(attn.to_q(h), d)), naq(_heads_first(attn.add_q_proj(c), d))], 2
                )
                k = torch.cat(
                    [nk(_heads_first(attn.to_k(h), d)), nak(_heads_first(attn.add_k_proj(c), d))], 2
                )
                hw = h.shape[1]
                p = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)
                seen.setdefault(layer, []).append((p[cond], slice(0, hw), slice(hw, None)))
                return
            d = attn.head_dim  # Flux / Chroma: text first, RoPE on q and k

            def split(x):
                return x.unflatten(-1, (-1, d))

            q, k = attn.norm_q(split(attn.to_q(h))), attn.norm_k(split(attn.to_k(h)))
            if c is not None:
                q = torch.cat([attn.norm_added_q(split(attn.add_q_proj(c))), q], 1)
                k = torch.cat([attn.norm_added_k(split(attn.add_k_proj(c))), k], 1)
            rope = kwargs["image_rotary_emb"]
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
            scores = (q.transpose(1, 2) @ k.permute(0, 2, 3, 1)) * d**-0.5  # (B, heads, L, L)
            mask = kwargs.get("attention_mask")
            if mask is not None:
                scores = (
                    scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
                )
            t = kw["max_sequence_length"]
            seen.setdefault(layer, []).append((scores.softmax(-1)[cond], slice(t, None), slice(0, t)))

        return pre

    handles = [modules[n].register_forward_pre_hook(hook(n, modules[n]), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            out = pipe(prompt=P, generator=gen(0), **kw).images
    finally:
        for h in handles:
            h.remove()
    for layer, calls in seen.items():
        if len(calls) == 2 * STEPS:  # CFG as two calls per step (Chroma): the prompt's call first
            seen[layer] = calls[::2]
    return out, seen


def _record(pipe, kw, **opts):
    rec = AttentionRecorder(pipe, keep_probs=True, **opts)
    with rec:
        out = pipe(prompt=P, generator=gen(0), **kw).images
    return out, rec


def _check_image_image(maps: AttentionMaps, want: dict, heads=None) -> None:
    """Recorded (S, B, heads', keys, Q) probabilities against the explicit rows, weighted by the query masks."""
    assert maps.relation == "image->image" and maps.query_masks is not None
    assert set(maps.probs) == set(want) and want
    for layer, calls in want.items():
        got = maps.probs[layer]  # (S, B, heads', HW, Q)
        h, w = maps.layers[layer].shape[-2:]
        weights = grid_weights(maps.query_masks, (h, w))  # (Q, HW)
        for s, (p, img, _) in enumerate(calls):
            block = p[:, img, img]  # (heads, HW, HW): image rows × image columns
            if heads is not None:
                block = block[list(heads)]
            ref = torch.einsum("hrk,qr->hkq", block, weights)  # (heads', HW, Q)
            torch.testing.assert_close(got[s, 0].float(), ref, rtol=0, atol=1e-5)


# ---- image→image -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd1", "pixart-sigma"])
def test_self_attention_maps_equal_an_explicit_softmax_and_leave_the_image(name) -> None:
    pipe, kw = pipe_of(name), kwargs_of(name)
    want_out, want = _explicit(pipe, name, kw, self_attention=True)
    out, rec = _record(pipe, kw, relation="image->image", queries=QUERIES)
    assert torch.equal(out, want_out)  # bitwise: the output still comes from the original SDPA call
    maps = rec.maps
    _check_image_image(maps, want)
    mass = maps.layers[maps.layer_names[0]].flatten(-2).sum(-1)  # (B, Q): a softmax over the image keys
    torch.testing.assert_close(mass, torch.ones_like(mass), rtol=0, atol=1e-5)
    point = maps.query(0)  # the point's map over the keys at latent resolution
    assert point.shape == (8, 8)


@pytest.mark.parametrize("name", ["sd3", "flux", "chroma"])
def test_joint_image_image_maps_are_the_image_block_of_the_joint_softmax(name) -> None:
    pipe, kw = pipe_of(name), kwargs_of(name)
    want_out, want = _explicit(pipe, name, kw)
    out, rec = _record(pipe, kw, relation="image->image", queries=QUERIES)
    assert torch.equal(out, want_out)
    maps = rec.maps
    _check_image_image(maps, want)
    mass = maps.layers[maps.layer_names[0]].flatten(-2).sum(-1)
    assert float(mass.max()) < 1  # text keys took their share of every image query


@pytest.mark.parametrize("name", ["sd3", "flux", "chroma"])
@pytest.mark.parametrize("relation", ["text->image", "text->text"])
def test_text_query_maps_are_the_text_rows_of_the_joint_softmax(name, relation) -> None:
    pipe, kw = pipe_of(name), kwargs_of(name)
    want_out, want = _explicit(pipe, name, kw)
    out, rec = _record(pipe, kw, relation=relation, heads=[1, 0])
    assert torch.equal(out, want_out)
    maps = rec.maps
    assert maps.relation == relation and set(maps.probs) == set(want) and want
    for layer, calls in want.items():
        got = maps.probs[layer]  # (S, B, heads', keys, T)
        for s, (p, img, txt) in enumerate(calls):
            block = p[[1, 0]][:, txt, img if relation == "text->image" else txt]  # (heads', T, keys)
            torch.testing.assert_close(got[s, 0].float(), block.transpose(-1, -2), rtol=0, atol=1e-5)
    if relation == "text->text":
        assert maps.layers[maps.layer_names[0]].shape[-2:] == (1, maps.aggregate.shape[1])  # (1, T) rows
    # a word's map reads like an image→text one: the sum of its tokens' maps (here over the image keys)
    assert maps.word("circle").shape == (
        (8, 8) if relation == "text->image" else (1, maps.aggregate.shape[1])
    )


def test_head_selection_averages_only_those_heads() -> None:
    pipe, kw = pipe_of("sd1"), kwargs_of("sd1")
    _, want = _explicit(pipe, "sd1", kw, self_attention=True)
    _, rec = _record(pipe, kw, relation="image->image", queries=QUERIES, heads=[1], per_head=True)
    maps = rec.maps
    _check_image_image(maps, want, heads=[1])
    layer = maps.layer_names[0]
    assert maps.layer_heads[layer].shape[1] == 1
    torch.testing.assert_close(maps.layers[layer], maps.layer_heads[layer][:, 0])


# ---- memory: only the selection is kept, and the plan counts it exactly -----------------------------------------
@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("sd1", dict(relation="image->image", queries=QUERIES)),
        ("sd1", dict(relation="image->image", queries=QUERIES[:1], negative=True, per_head=True)),
        ("sd3", dict(relation="image->image", queries=QUERIES, heads=[0])),
        ("sd3", dict(relation="text->text", per_head=True)),
        ("flux", dict(relation="text->image", keep_probs=True)),
    ],
)
def test_the_plan_equals_the_stored_bytes(name, opts) -> None:
    pipe, kw = pipe_of(name), kwargs_of(name)
    rec = AttentionRecorder(pipe, **opts)
    with rec:
        pipe(prompt=P, generator=gen(0), **kw)
    maps = rec.maps
    assert rec.budget.nbytes == maps.nbytes
    if opts["relation"] == "image->image":  # one map per query and layer: never the (HW)² matrix
        for t in maps.layers.values():
            assert t.shape[1] == len(opts["queries"])


def test_queries_beyond_the_latent_grid_are_refused_before_the_loop() -> None:
    pipe, kw = pipe_of("sd1"), kwargs_of("sd1")
    steps = []
    rec = AttentionRecorder(pipe, relation="image->image", queries=[(8, 0)])
    with pytest.raises(InvalidArgumentError, match="outside this call's 8×8 latent grid"), rec:
        pipe(prompt=P, generator=gen(0), callback_on_step_end=lambda *a: steps.append(1) or {}, **kw)
    assert not steps
    with (
        pytest.raises(InvalidArgumentError, match="latent grid is 8×8"),
        AttentionRecorder(pipe, relation="image->image", queries=[torch.ones(4, 4, dtype=torch.bool)]),
    ):
        pipe(prompt=P, generator=gen(0), **kw)


# ---- files keep the relation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "opts"),
    [("sd1", dict(relation="image->image", queries=QUERIES)), ("sd3", dict(relation="text->text"))],
)
def test_saved_maps_keep_their_relation(tmp_path, name, opts) -> None:
    pipe, kw = pipe_of(name), kwargs_of(name)
    rec = AttentionRecorder(pipe, **opts)
    with rec:
        pipe(prompt=P, generator=gen(0), **kw)
    maps = rec.maps
    back = AttentionMaps.load(maps.save(tmp_path / "m"))
    assert back.relation == opts["relation"]
    torch.testing.assert_close(back.aggregate, maps.aggregate, rtol=0, atol=0)
    if maps.query_masks is not None:
        assert torch.equal(back.query_masks, maps.query_masks)
        torch.testing.assert_close(back.query(1), maps.query(1), rtol=0, atol=0)
        with pytest.raises(SelectionError, match="use .query"):
            back.word("circle")
    else:
        with pytest.raises(SelectionError, match="use .word"):
            back.query(0)


def test_a_cross_attention_file_claiming_text_queries_is_refused(tmp_path) -> None:
    from sdexplore.errors import ResultFileError
    from sdexplore.results import fileformat as ff

    pipe, kw = pipe_of("sd1"), kwargs_of("sd1")
    rec = AttentionRecorder(pipe)
    with rec:
        pipe(prompt=P, generator=gen(0), **kw)
    tensors, header = rec.maps.to_state()
    header["maps"]["relation"] = "text->image"
    with pytest.raises(ResultFileError, match="no text queries"):
        AttentionMaps.from_state(tensors, header)
    assert ff  # the module the loader checks with


# ---- refusals, before any run ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd1", "pixart-sigma", "sana"])
@pytest.mark.parametrize("relation", ["text->image", "text->text"])
def test_text_queries_are_refused_on_cross_attention(name, relation) -> None:
    with pytest.raises(InvalidArgumentError, match="no text query ever attends"):
        AttentionRecorder(pipe_of(name), relation=relation)


def test_sana_self_attention_is_linear_and_refused() -> None:
    rec = AttentionRecorder(pipe_of("sana"), relation="image->image", queries=[(0, 0)])
    with pytest.raises(UnsupportedPipelineError, match="linear"), rec:
        pass


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        (dict(relation="image->image"), "pass queries="),
        (dict(relation="image->text", queries=[(0, 0)]), "Leave queries out"),
        (dict(relation="image->depth"), "not an attention relation"),
        (dict(relation="image->image", queries=[(0, 0.5)]), "neither a"),
        (dict(relation="image->image", queries=[torch.zeros(8, 8, dtype=torch.bool)]), "no True pixel"),
        (dict(relation="image->image", queries=[torch.zeros(8, 8)]), "must be boolean"),
        (dict(heads=[-1]), "head indices"),
        (dict(heads="all"), "head indices"),
    ],
)
def test_bad_selections_are_refused(opts, match) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        AttentionRecorder(pipe_of("sd1"), **opts)


def test_heads_a_layer_lacks_are_refused_before_the_loop() -> None:
    pipe, kw = pipe_of("sd1"), kwargs_of("sd1")
    with pytest.raises(InvalidArgumentError, match="names head 99"), AttentionRecorder(pipe, heads=[99]):
        pipe(prompt=P, generator=gen(0), **kw)


def test_joint_relations_need_joint_maps() -> None:
    with pytest.raises(InvalidArgumentError, match="kind='joint'"):
        AttentionRecorder(pipe_of("sd3"), relation="text->image", kind="text")


# ---- the cheaper capture paths (issue 31's overhead) keep every value -------------------------------------------
def test_pixart_masked_cross_attention_waits_and_is_batched() -> None:
    """PixArt-Σ's T5 padding mask used to send every call through an immediate softmax; now its calls wait in the
    queue like unmasked ones (the mask as a per-key bias) and the maps still equal the explicit masked softmax
    (tests/test_conformance.py checks every probability)."""
    pipe, kw = pipe_of("pixart-sigma"), kwargs_of("pixart-sigma")
    rec = AttentionRecorder(pipe)
    waiting = []

    def peek(i, t, latents):  # PixArt-Σ's (older) step callback
        waiting.append(sum(len(b[2]) for b in rec._queue.values()))

    with rec:
        pipe(prompt=P, generator=gen(0), callback=peek, callback_steps=1, **kw)
    assert waiting and waiting[0] > 0  # the first step's calls wait for one batched softmax
    assert torch.isfinite(rec.maps.aggregate).all()


def test_captions_projected_each_step_are_flushed_in_one_batch() -> None:
    """PixArt-Σ (and Sana) project the caption inside the denoiser, so every step brings new keys: the waiting
    steps now go through one batched softmax, each against its own keys (the maps equal the explicit softmax: see
    tests/test_conformance.py), instead of one batch per step (while the batch stays under the cache-sized cap)."""
    pipe, kw = pipe_of("pixart-sigma"), kwargs_of("pixart-sigma")
    rec = AttentionRecorder(pipe)
    batches = []
    real = rec._file
    rec._file = lambda steps, names, p: (batches.append(list(steps)), real(steps, names, p))  # type: ignore[method-assign]
    with rec:
        pipe(prompt=P, generator=gen(0), **kw)
    assert rec.maps.num_steps == STEPS
    assert batches == [list(range(STEPS))]  # one batch holding every step


@pytest.mark.parametrize("name", ["sd1", "pixart-sigma", "sd3", "chroma"])
def test_head_selection_on_per_token_maps(name) -> None:
    """heads= on image→text maps: the kept probabilities are the chosen heads' own, the maps their mean."""
    pipe, kw = pipe_of(name), kwargs_of(name)
    _, full = _record(pipe, kw)
    _, some = _record(pipe, kw, heads=[1])
    a, b = full.maps, some.maps
    assert set(a.probs) == set(b.probs)
    for layer in a.probs:
        assert b.probs[layer].shape[2] == 1
        torch.testing.assert_close(b.probs[layer][:, :, 0], a.probs[layer][:, :, 1], rtol=0, atol=1e-6)
    layer = b.layer_names[0]
    want = a.probs[layer][:, :, 1].float().mean(0)  # (B, HW, T): the head's map, mean over steps
    got = b.layers[layer].flatten(-2).transpose(-1, -2)  # (B, HW, T)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert some.budget.nbytes == b.nbytes
    with pytest.raises(InvalidArgumentError, match="not per head"):
        AttentionRecorder(
            pipe, heads=[0], kind="output" if name in ("sd3", "chroma") else None, concepts=["sky"]
        )


def test_observe_takes_the_relation_options() -> None:
    """One options path: observe(attention={...}) hands relation, queries and heads to the recorder."""
    import sdexplore as sdx

    pipe, kw = pipe_of("sd1"), kwargs_of("sd1")
    with sdx.observe(
        pipe, steps=False, attention={"relation": "image->image", "queries": [(1, 1)], "heads": [0]}
    ) as obs:
        pipe(prompt=P, generator=gen(0), **kw)
    maps = obs.attention
    assert maps.relation == "image->image" and maps.query(0).shape == (8, 8)
    with pytest.raises(InvalidArgumentError, match="no text query ever attends"):
        sdx.observe(pipe, steps=False, attention={"relation": "text->text"})

"""Concept maps: a word not in the prompt, scored against the same queries; equal to an explicit softmax here."""

from __future__ import annotations

import pytest
import torch
from conftest import gen

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError, WordNotFoundError
from sdexplore.fixtures import tiny_pipeline

P = "a red circle on a blue background"
KW = dict(num_inference_steps=2, height=64, width=64, output_type="np")


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request):
    return tiny_pipeline(request.param)


def _explicit(pipe, layer: str, concepts: list[str]) -> tuple[object, list[torch.Tensor]]:
    """A plain call; per step, the conditional row's concept masses at ``layer`` (C, HW): softmax over the prompt's
    keys and one concept's word keys, the concept's part summed, mean over heads; computed here."""
    attn = pipe.unet.get_submodule(layer)
    tok = pipe.tokenizer
    ctx = (
        sdx.families.detect_family(pipe)
        .encode_prompt(pipe, concepts, device="cpu", do_classifier_free_guidance=False)
        .embeds
    )  # (C, 77, D)
    words = [tok(c, add_special_tokens=False).input_ids for c in concepts]
    out: list[torch.Tensor] = []

    def pre(module, args, kwargs):
        h, text = args[0], kwargs["encoder_hidden_states"]
        h = h[-1:]  # the conditional row (SD's CFG batch: unconditional first)
        heads = attn.heads

        def split(x):  # (N, L, heads*d) -> (N, heads, L, d)
            return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

        q = split(attn.to_q(h))[0]  # (heads, HW, d)
        k = split(attn.to_k(text[-1:]))[0]  # (heads, 77, d)
        masses = []
        for i, ids in enumerate(words):
            kc = split(attn.to_k(ctx[i : i + 1]))[0][:, 1 : 1 + len(ids)]  # (heads, |c|, d): after BOS
            p = ((q @ torch.cat([k, kc], 1).transpose(1, 2)) * attn.scale).softmax(-1)  # (heads, HW, 77+|c|)
            masses.append(p[..., 77:].sum(-1).mean(0))  # (HW,)
        out.append(torch.stack(masses))

    handle = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            image = pipe(P, generator=gen(0), **KW).images
    finally:
        handle.remove()
    return image, out


def test_concept_maps_equal_an_explicit_softmax_and_leave_the_image(pipe) -> None:
    layer = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")][0]
    concepts = ["sky", "grass field"]
    plain, want = _explicit(pipe, layer, concepts)
    with sdx.AttentionRecorder(pipe, concepts=concepts) as rec:
        image = pipe(P, generator=gen(0), **KW).images
    assert (image == plain).all()
    maps = rec.maps
    assert maps.concepts == concepts and maps.words == ["a", "red", "circle", "on", "a", "blue", "background"]
    got = maps.concept_layers[layer][0]  # (C, h, w): mean over the two steps
    torch.testing.assert_close(got.flatten(1), torch.stack(want).mean(0), rtol=0, atol=1e-6)
    # the prompt's own maps are exactly those of a recorder without concepts
    with sdx.AttentionRecorder(pipe) as bare:
        pipe(P, generator=gen(0), **KW)
    torch.testing.assert_close(maps.aggregate, bare.maps.aggregate, rtol=0, atol=1e-7)
    assert maps.concept("sky").shape == maps.word("circle").shape
    assert maps.concept("sky", step=1).shape == maps.steps.shape[-2:]
    torch.testing.assert_close(maps.concept("grass field", layer=layer), got[1], rtol=0, atol=0)


def test_concepts_are_saved_and_bad_concepts_refused(tmp_path) -> None:
    pipe = tiny_pipeline("sd1")
    with sdx.AttentionRecorder(pipe, concepts=["sky"], negative=True) as rec:
        pipe(P, generator=gen(0), **KW)
    loaded = sdx.AttentionMaps.load(rec.maps.save(tmp_path / "c"))
    assert loaded.concepts == ["sky"] and torch.equal(loaded.concept("sky"), rec.maps.concept("sky"))
    assert loaded.negative.concepts == ["sky"]
    with pytest.raises(WordNotFoundError, match="concepts=\\['cat'\\]"):
        loaded.concept("cat")
    for bad in ("sky", ["sky", ""], [3]):
        with pytest.raises(InvalidArgumentError, match="concepts="):
            sdx.AttentionRecorder(pipe, concepts=bad)

"""sdexplore's attention maps equal attention-map-diffusers' (a reference, never a dependency) for every relation both
record, on the tiny SD 1.x-style UNet fixture and the SD3 and Flux fixtures.

How their maps line up with ours (attention-map-diffusers 1.0.0, ``AttentionCapture(pipe, relations=[...],
timesteps="all", heads="mean")``):

- theirs: one record per layer, relation and denoiser call, ``data`` (B, 1, queries, keys): the mean over heads of
  the probabilities, every row of the CFG batch (unconditional first), the softmax over the layer's *whole* key
  sequence (joint attention: text and image), then the relation's block sliced out;
- ours with ``keep_probs=True``: ``maps.probs[layer]`` (S, B', heads, keys-or-queries layout, ...), the conditional
  row only: image→text (HW, T) per head; image→image (HW keys, Q) per head, each selected query's rows weighted by
  its mask on the layer's grid (we select queries, they keep every query row: their rows are weighted here with our
  weights); text→image (HW keys, T queries) and text→text (T keys, T queries) per head: their (queries, keys)
  transposed.

So ours.mean(heads) == theirs[cond, 0] (transposed, or weighted, as above), layer by layer and step by step. They
record Flux's double-stream blocks only (their single-stream capture needs text passed apart), so Flux is compared
there.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import gen

from sdexplore.families import FAMILIES
from sdexplore.fixtures import tiny_pipeline
from sdexplore.record.attention import AttentionRecorder
from sdexplore.record.relations import grid_weights

# `make setup` installs the reference: in CI a missing one is a broken setup, not a skip
if os.environ.get("CI"):
    import attention_map_diffusers as amd
else:
    amd = pytest.importorskip(
        "attention_map_diffusers", reason="attention-map-diffusers is not installed (make setup)"
    )

P = "a red circle on a blue background"
STEPS = 2
QUERIES = [(2, 3), (5, 1)]
RELATIONS = {
    "sd1": ["image->text", "image->image"],
    "sd3": ["image->text", "image->image", "text->image", "text->text"],
    "flux": ["image->text", "image->image", "text->image", "text->text"],
}
CASES = [(name, rel) for name, rels in RELATIONS.items() for rel in rels]
_PIPES: dict[str, object] = {}


def pipe_of(name: str):
    if name not in _PIPES:
        _PIPES[name] = tiny_pipeline(name)
    return _PIPES[name]


def kwargs_of(name: str) -> dict:
    kw = dict(num_inference_steps=STEPS, height=64, width=64, output_type="latent")
    if name == "flux":
        kw["max_sequence_length"] = 32
    return kw


def theirs(pipe, kw: dict, relation: str) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Their records: layer (our module path) → per denoiser call, data (B, 1, queries, keys)."""
    with amd.AttentionCapture(pipe, relations=[relation], timesteps="all", heads="mean") as cap:
        with torch.no_grad():
            out = pipe(prompt=P, generator=gen(0), **kw).images
        maps = cap.compute()
    per: dict[str, list[torch.Tensor]] = {}
    for r in sorted(maps.records, key=lambda r: r.step_index):
        if r.relation == relation:
            per.setdefault(r.layer_id.split(".", 1)[1], []).append(r.data.float())
    return out, per


@pytest.mark.parametrize(("name", "relation"), CASES)
def test_our_maps_equal_attention_map_diffusers(name, relation) -> None:
    pipe, kw = pipe_of(name), kwargs_of(name)
    opts = dict(relation=relation, keep_probs=True)
    if relation == "image->image":
        opts["queries"] = QUERIES
    rec = AttentionRecorder(pipe, **opts)
    with rec, torch.no_grad():
        ours_out = pipe(prompt=P, generator=gen(0), **kw).images
    maps = rec.maps
    their_out, their = theirs(pipe, kw, relation)
    assert torch.equal(ours_out, their_out)  # neither changes the image
    common = sorted(set(maps.probs) & set(their))
    assert common, (sorted(maps.probs), sorted(their))
    cond = 1 if FAMILIES[name].cfg_batch else 0  # their batch: the unconditional half first
    worst = 0.0
    for layer in common:
        got = maps.probs[layer].float().mean(2)  # (S, B', ·, ·): the mean over heads, as theirs
        assert got.shape[0] == len(their[layer]) == STEPS
        for s, data in enumerate(their[layer]):
            ref = data[cond, 0]  # (queries, keys)
            if relation == "image->image":
                h, w = maps.layers[layer].shape[-2:]
                ref = (grid_weights(maps.query_masks, (h, w)) @ ref).T  # (HW keys, Q)
            elif relation != "image->text":
                ref = ref.T  # ours: (keys, text queries)
            worst = max(worst, float((got[s, 0] - ref).abs().max()))
    assert worst <= 1e-6, f"{name} {relation}: max |ours − theirs| = {worst:.2e}"

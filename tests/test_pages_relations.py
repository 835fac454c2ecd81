"""The page payload of attention relations beyond image→text (sdexplore.views.payload): image→image maps travel
with their recorded queries (a label and a point each, in the place of the words), text→image maps as the per-word
maps they are, each block naming its relation; text→text rows are not a picture's map and are left out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdexplore
from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline
from sdexplore.views import payload as pl

P = "a red circle on a blue background"


def _observed(name: str, **attention):
    pipe = tiny_pipeline(name)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="np", **fixture_call_defaults(name))
    if name == "flux":
        kw["max_sequence_length"] = 32
    with sdexplore.observe(pipe, attention=attention or True) as obs:
        image = pipe(P, generator=torch.Generator().manual_seed(0), **kw).images[0]
    return obs, image


@pytest.fixture(scope="module")
def self_attention():
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[4:6] = True  # two rows of the fixture's 8×8 latent grid
    return _observed("sd1", relation="image->image", queries=[(2, 3), mask])


def test_image_to_image_maps_travel_with_their_queries(self_attention) -> None:
    obs, image = self_attention
    maps = obs.attention
    p = pl.observation_payload(obs, image=image)
    att = p["attention"]
    assert att["relation"] == "image->image" and att["words"] == [] and att["default_word"] is None
    q = att["queries"]
    assert [x["cells"] for x in q] == [1, 16]
    assert q[0]["label"] == "query 0: cell (2, 3)" and q[0]["point"] == [2.5 / 8, 3.5 / 8]
    assert q[1]["point"] == [5 / 8, 0.5] and "mask of 16 cells" in q[1]["label"]
    # axis 1 of the maps is the queries: query i's map is maps.query(i)
    back = pl.dequantize_maps(att["aggregate"])  # (Q, H, W)
    assert back.shape[0] == 2
    for i in range(2):
        want = maps.query(i).numpy()
        assert np.abs(back[i] - want).max() <= (want.max() - want.min()) / 255 + 1e-6
    assert not np.allclose(back[0], back[1])  # two queries, two maps


def test_text_to_image_maps_are_words_named_by_their_relation() -> None:
    obs, image = _observed("flux", relation="text->image")
    att = pl.observation_payload(obs, image=image)["attention"]
    assert att["relation"] == "text->image" and "queries" not in att
    assert att["default_word"] == "red" and any(w["word"] == "circle" for w in att["words"])
    pos = next(w for w in att["words"] if w["word"] == "circle")["positions"]
    back = pl.dequantize_maps(att["aggregate"])[pos].sum(0)
    want = obs.attention.word("circle").numpy()
    assert np.allclose(back, want, atol=len(pos) * float(want.max()) / 255 + 1e-6)


def test_image_to_text_maps_name_their_relation_and_text_rows_are_left_out() -> None:
    obs, image = _observed("flux")
    assert pl.observation_payload(obs, image=image)["attention"]["relation"] == "image->text"
    obs, image = _observed("flux", relation="text->text")
    assert "attention" not in pl.observation_payload(obs, image=image)


def test_the_attention_explorer_offers_image_to_image_queries(self_attention) -> None:
    from sdexplore.heatmaps import normalize
    from sdexplore.views.widgets import AttentionExplorer

    obs, image = self_attention
    ex = AttentionExplorer(obs, image, static=True)
    assert ex.relation == "image->image" and ex.words == [
        q["label"] for q in pl._queries(obs.attention.query_masks)
    ]
    assert torch.allclose(ex.heat(ex.words[1]), normalize(obs.attention.query(1), "minmax"))
    assert ex.payload()["attention"]["default_word"] == ex.words[0]
    fig = ex.figure(n_bins=2)
    drawn = [np.asarray(im.get_array(), np.float64) for ax in fig.axes for im in ax.get_images()]
    assert len(drawn) == 2 * 3 and all(a.max() - a.min() > 1e-6 for a in drawn)  # 2 queries × (2 bins + all)
    assert "image → image" in fig._suptitle.get_text()


def test_a_page_heading_names_its_relation(self_attention) -> None:
    from sdexplore.views import pages

    def heading(obs, image) -> str:
        html = pages.page_html(pl.observation_payload(obs, image=image), ["attention"])
        return html.split("<h2>", 1)[1].split("</h2>", 1)[0]

    assert heading(*self_attention) == "Self-attention per query point"
    assert heading(*_observed("flux", relation="text->image")) == "Attention per word (text → image)"
    assert heading(*_observed("flux")) == "Attention per word"

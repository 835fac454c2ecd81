"""Edit as a result file: save/load in the one checksummed format (images as uint8 tensors, the maps of both
branches as AttentionMaps saves them), a round trip that gives back equal data, and cross-field checks that refuse
a header contradicting its tensors or itself even when re-sealed (checksums recomputed with the format's ``seal``).
Every edit here is genuine, made by ``sdexplore.edit`` on the tiny SD1 fixture."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sdexplore as sdx
from sdexplore.errors import InvalidArgumentError, ResultFileError
from sdexplore.fixtures import tiny_pipeline
from sdexplore.results import Edit
from sdexplore.results import fileformat as ff

KEY = "sdexplore.edit"
KW = dict(num_inference_steps=2, height=64, width=64)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline("sd1")


@pytest.fixture(scope="module")
def swap(pipe) -> Edit:
    return sdx.edit(pipe, "a red circle", "a blue circle", generator=torch.Generator().manual_seed(0), **KW)


@pytest.fixture(scope="module")
def batch(pipe) -> Edit:
    return sdx.edit(
        pipe,
        ["a red circle", "a green circle"],
        reweight={"circle": 0.0},
        num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(1),
        **KW,
    )


def reseal(path: Path, edit) -> None:
    """Edit a saved file's header and seal it again: every checksum is right, only the content is wrong."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()[KEY])
    header = ff.seal(edit(header), tensors)
    save_file(tensors, str(path), metadata={KEY: json.dumps(header)})


def retensor(path: Path, name: str, change) -> None:
    """Replace one tensor and re-seal: the checksums agree, the content contradicts the rest."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        header = json.loads(f.metadata()[KEY])
    tensors[name] = change(tensors[name])
    save_file(tensors, str(path), metadata={KEY: json.dumps(ff.seal(header, tensors))})


def fails(path: Path, *fields: str) -> str:
    with pytest.raises(ResultFileError) as e:
        Edit.load(path)
    message = str(e.value)
    assert str(path) in message
    for field in fields:
        assert field in message, message
    return message


def same_maps(a, b) -> None:
    assert a.family == b.family and a.kind == b.kind and a.latent_size == b.latent_size
    assert torch.equal(a.aggregate, b.aggregate) and torch.equal(a.timesteps, b.timesteps)
    assert a.layer_names == b.layer_names
    assert all(torch.equal(a.layers[n], b.layers[n]) for n in a.layers)
    assert [t.to_json() for t in a.token_lists] == [t.to_json() for t in b.token_lists]


@pytest.mark.parametrize("which", ["swap", "batch"])
def test_an_edit_round_trips_equal(which, request, tmp_path) -> None:
    res: Edit = request.getfixturevalue(which)
    back = Edit.load(res.save(tmp_path / "e.safetensors"))
    assert type(back.source) is type(res.source) and back.num_images == res.num_images
    for i in range(res.num_images):
        for a, b in zip(res.images(i), back.images(i), strict=True):
            assert a.dtype == b.dtype == np.uint8 and np.array_equal(a, b)
    assert (back.source_prompt, back.edited_prompt) == (res.source_prompt, res.edited_prompt)
    assert back.settings == res.settings
    same_maps(res.source_maps, back.source_maps)
    same_maps(res.edited_maps, back.edited_maps)
    with safe_open(str(tmp_path / "e.safetensors"), framework="pt") as f:
        assert f.get_tensor("source").dtype == torch.uint8  # images stored as uint8, not floats


def test_an_edit_without_maps_round_trips(pipe, tmp_path) -> None:
    res = sdx.edit(pipe, "a red circle", "a blue circle", attention=False, generator=torch.Generator(), **KW)
    back = Edit.load(res.save(tmp_path / "e.safetensors"))
    assert back.source_maps is None and back.edited_maps is None
    assert np.array_equal(back.difference(), res.difference())


@pytest.mark.parametrize(
    "prompt", ["a (red)1.0 circle", "a (red)1.5 circle", "a red.swap(blue) circle"], ids=["w1", "w15", "swap"]
)
def test_edits_written_in_prompt_syntax_round_trip(pipe, tmp_path, prompt) -> None:
    """compel's syntax is an edit even at weight 1.0 (settings.syntax keeps the prompt as written)."""
    res = sdx.edit(pipe, prompt, attention=False, generator=torch.Generator().manual_seed(0), **KW)
    back = Edit.load(res.save(tmp_path / "e.safetensors"))
    assert back.settings["syntax"] == prompt and np.array_equal(back.difference(), res.difference())


def test_views_difference_and_changed_words(swap, batch) -> None:
    src, out = swap.images()
    assert np.array_equal(swap.difference(), np.abs(out.astype(int) - src.astype(int)).astype(np.uint8))
    assert swap.changed_words() == ["blue"]
    assert batch.changed_words(3) == ["circle"] and batch.prompts(3) == ("a green circle", "a green circle")
    with pytest.raises(InvalidArgumentError, match="images 0..3"):
        batch.images(4)


def test_a_tampered_tensor_fails_its_checksum(swap, tmp_path) -> None:
    path = swap.save(tmp_path / "e.safetensors")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    tensors["edited"] = tensors["edited"].clone()
    tensors["edited"][0, 0, 0, 0] ^= 1
    save_file(tensors, str(path), metadata=meta)
    fails(path, "tensor 'edited'", "checksum")


def _set(*path):
    """Set ``header[k1][k2]... = value`` (the last argument is the value)."""
    *keys, value = path

    def edit(h):
        d = h
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
        return h

    return edit


@pytest.mark.parametrize(
    ("edit", "fields"),
    [
        (_set("edited_prompt", ["a blue circle"]), ["edited_prompt"]),
        (_set("settings", "cross_replace", None), ["settings.cross_replace"]),
        (_set("settings", "cross_replace", 1.5), ["settings.cross_replace"]),
        (_set("settings", "num_images_per_prompt", 2), ["settings.num_images_per_prompt"]),
        (_set("settings", "reweight", {"square": 2.0}), ["settings.reweight", "'square'"]),
        (_set("settings", "steps", [0.9, 0.1]), ["settings.steps"]),
        (_set("edited_maps", None), ["tensor 'edited_maps/aggregate'", "not described"]),
        (_set("edited_maps", "family", "sd2"), ["edited_maps.family"]),
        (_set("edited_maps", "latent_size", [4, 4]), ["latent_size"]),
        (
            _set("source_maps", "token_lists", 0, "prompt", "a green circle"),
            ["source_maps.token_lists[0].prompt"],
        ),
        (_set("oops", 1), ["'oops'"]),
    ],
)
def test_a_resealed_header_that_contradicts_itself_fails_naming_the_field(
    swap, tmp_path, edit, fields
) -> None:
    path = swap.save(tmp_path / "e.safetensors")
    Edit.load(path)  # the genuine file loads
    reseal(path, edit)
    fails(path, *fields)


def test_branches_of_different_sizes_fail(swap, tmp_path) -> None:
    path = swap.save(tmp_path / "e.safetensors")
    retensor(path, "edited", lambda t: t[:, :32].contiguous())
    fails(path, "tensor 'edited'", "tensor 'source'")


def test_edited_maps_of_another_schedule_fail(swap, tmp_path) -> None:
    path = swap.save(tmp_path / "e.safetensors")
    retensor(path, "edited_maps/timesteps", lambda t: t + 1)
    fails(path, "edited_maps/timesteps")


def test_a_file_of_another_result_is_refused(swap, tmp_path) -> None:
    path = swap.source_maps.save(tmp_path / "maps.safetensors")
    with pytest.raises(ResultFileError, match="not Edit"):
        Edit.load(path)


def test_word_maps_pair_a_swapped_word_with_the_word_it_replaced(pipe) -> None:
    res = sdx.edit(
        pipe,
        "a red circle, blue background",
        "a blue circle, blue background",
        generator=torch.Generator(),
        **KW,
    )
    before, after = res.word_maps("blue")  # the swapped word, although the source has "blue" too (background)
    # "blue" occurs twice in the edited prompt: its map sums both, so before sums "red" and the background "blue"
    assert torch.allclose(before, res.source_maps.word("red") + res.source_maps.word("blue"))
    assert torch.equal(after, res.edited_maps.word("blue"))


def test_word_maps_of_an_ablation_show_the_zero_map_after(batch) -> None:
    before, after = batch.word_maps("circle", index=2)
    assert torch.equal(before, batch.source_maps.word("circle", index=2)) and float(before.max()) > 0
    assert float(after.abs().max()) == 0.0


def test_reweighted_maps_keep_their_mass_and_a_mass_the_weights_cannot_give_fails(batch, tmp_path) -> None:
    """A reweight scales probabilities after the softmax (ablating a word leaves each pixel less than 1 in all):
    the edited maps load with the mass they had, and a mass outside the factors' range is refused."""
    path = batch.save(tmp_path / "e.safetensors")
    mass = Edit.load(path).edited_maps.aggregate.double().sum(1)
    assert float(mass.max()) < 1 - 1e-4  # "circle" ablated: the mass it had is gone
    retensor(path, "edited_maps/aggregate", lambda t: t * 3)
    fails(path, "tensor 'edited_maps/aggregate'", "settings.reweight")

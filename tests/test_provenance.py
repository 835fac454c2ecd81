"""Provenance: recorders note what made a result (model, scheduler, seed, prompts, settings) from the call itself,
saved files keep it (older files without it still load), and pages show it without the caller repeating it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import gen

import sdexplore
from sdexplore.errors import InvalidArgumentError, ResultFileError
from sdexplore.record.observe import observe
from sdexplore.record.provenance import call_provenance, seeds
from sdexplore.results import AttentionMaps, Edit, Observation, Trace
from sdexplore.views import pages

PROMPT = "a big red circle at the top left on a blue background"
STEPS = dict(num_inference_steps=4)


@pytest.fixture(scope="module")
def embedded():
    return sdexplore.load_pipeline()


def _facts(path) -> dict:
    return pages.read_payload(path)["provenance"]


def test_an_observed_call_gives_a_page_naming_model_scheduler_seed_and_prompt(embedded, tmp_path) -> None:
    plain = embedded(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **STEPS).images
    with observe(embedded, attention=True) as obs:
        out = embedded(
            PROMPT,
            negative_prompt="green",
            generator=torch.Generator().manual_seed(3),
            output_type="np",
            **STEPS,
        ).images
    negative = embedded(
        PROMPT, negative_prompt="green", generator=torch.Generator().manual_seed(3), output_type="np", **STEPS
    ).images
    assert not np.array_equal(plain, negative)  # the negative prompt matters: the check below can fail
    np.testing.assert_array_equal(out, negative)  # noting provenance changes nothing
    kept = obs.steps.meta["provenance"]
    assert kept == {
        "model": "tiny-shapes",
        "prompt": PROMPT,
        "negative_prompt": "green",
        "seed": 3,
        "size": [64, 64],
    }  # the scheduler, steps and guidance are the trace's own fields, not repeated
    maps = obs.attention.provenance
    assert maps["model"] == "tiny-shapes" and maps["seed"] == 3 and maps["scheduler"] == "DDIMScheduler"
    assert maps["steps"] == 4 and maps["guidance_scale"] == obs.steps.guidance_scale and "prompt" not in maps

    path = obs.save_html(tmp_path / "run.html")  # no model=, seed=, prompt= given
    prov = _facts(path)
    assert prov["model"] == "tiny-shapes" and prov["scheduler"] == "DDIMScheduler" and prov["seed"] == 3
    assert prov["prompt"] == PROMPT and prov["negative_prompt"] == "green"
    assert prov["steps"] == 4 and prov["size"] == [64, 64]
    head = path.read_text(encoding="utf-8").split('id="sdx-root"')[
        0
    ]  # the provenance line above the explorers
    assert "tiny-shapes" in head and "DDIMScheduler" in head and "seed <code>3</code>" in head

    # explicit arguments still win
    prov = _facts(obs.save_html(tmp_path / "other.html", model="my-model", seed=11, prompt="p"))
    assert prov["model"] == "my-model" and prov["seed"] == 11 and prov["prompt"] == "p"

    # the files keep it, and so do pages of the loaded observation
    obs.save(tmp_path / "obs")
    back = Observation.load(tmp_path / "obs")
    assert back.steps.meta["provenance"] == kept and back.attention.provenance == maps
    assert _facts(back.save_html(tmp_path / "back.html"))["seed"] == 3


def test_attention_alone_keeps_the_provenance_of_its_call(embedded, tmp_path) -> None:
    with observe(embedded, steps=False, attention=True) as obs:
        embedded(PROMPT, generator=torch.Generator().manual_seed(5), **STEPS)
    prov = _facts(obs.save_html(tmp_path / "maps.html"))
    assert prov["model"] == "tiny-shapes" and prov["scheduler"] == "DDIMScheduler" and prov["seed"] == 5
    assert prov["steps"] == 4 and prov["prompt"] == PROMPT
    path = obs.attention.save(tmp_path / "maps.safetensors")
    assert AttentionMaps.load(path).provenance == obs.attention.provenance


def test_a_call_without_a_generator_says_unseeded(sd1_pipe, tmp_path) -> None:
    with observe(sd1_pipe, attention=True) as obs:
        sd1_pipe("a red circle", num_inference_steps=2, height=64, width=64)
    assert obs.steps.meta["provenance"]["seed"] is None and obs.attention.provenance["seed"] is None
    assert "model" not in obs.steps.meta["provenance"]  # a pipeline built in code has no model name
    prov = _facts(obs.save_html(tmp_path / "run.html"))
    assert prov["seed"] == "unseeded" and "model" not in prov
    assert "seed <code>unseeded</code>" in (tmp_path / "run.html").read_text(encoding="utf-8")


def test_a_list_of_generators_gives_each_image_its_seed(sd1_pipe, tmp_path) -> None:
    with observe(sd1_pipe, attention=True) as obs:
        sd1_pipe(
            ["a red circle", "a blue square"],
            generator=[gen(7), gen(9)],
            num_inference_steps=2,
            height=64,
            width=64,
        )
    assert obs.steps.meta["provenance"]["seed"] == [7, 9] and obs.attention.provenance["seed"] == [7, 9]
    for index, (seed, prompt) in enumerate([(7, "a red circle"), (9, "a blue square")]):
        prov = _facts(obs.save_html(tmp_path / f"run{index}.html", index=index))
        assert prov["seed"] == seed and prov["prompt"] == prompt
    steps_only = Observation(runs=obs.runs)  # the trace alone tells the image's prompt and seed too
    prov = _facts(steps_only.save_html(tmp_path / "steps.html", index=1))
    assert prov["seed"] == 9 and prov["prompt"] == "a blue square"


def test_a_generator_used_before_the_call_is_told_and_a_fresh_one_is_not(sd1_pipe) -> None:
    g = gen(4)
    assert (
        seeds(g) == (4, False) and seeds(None) == (None, False) and seeds([gen(1), gen(2)]) == ([1, 2], False)
    )
    torch.rand(3, generator=g)
    state = g.get_state().clone()
    assert seeds(g) == (4, True)
    assert torch.equal(g.get_state(), state)  # reading the seed never advances the generator
    prov = call_provenance(
        sd1_pipe, {"prompt": "x", "generator": g, "latents": torch.zeros(1)}, sd1_pipe.scheduler
    )
    assert (
        prov["generator_used"]
        and prov["latents_given"]
        and prov["scheduler"] == type(sd1_pipe.scheduler).__name__
    )
    from sdexplore.results.provenance import seed_of_image

    assert seed_of_image(prov, 0, 1) == "4 (latents given)"
    assert seed_of_image({"seed": 4, "generator_used": True}, 0, 1) == "4 (generator used before the call)"
    assert seed_of_image({"seed": None, "latents_given": True}, 0, 1) == "latents given"
    assert seed_of_image({}, 0, 1) is None  # not recorded: the page says nothing


def test_files_saved_before_provenance_still_load_and_a_damaged_one_is_refused(sd1_pipe, tmp_path) -> None:
    with observe(sd1_pipe, attention=True) as obs:
        sd1_pipe("a red circle", generator=gen(0), num_inference_steps=2, height=64, width=64)
    trace, maps = obs.steps, obs.attention
    del trace.meta["provenance"]  # what an older sdexplore wrote: no key at all
    maps.provenance = {}
    assert "provenance" not in maps._meta()
    old = Observation(runs=[trace], _attention=maps)
    old.save(tmp_path / "old")
    back = Observation.load(tmp_path / "old")
    assert "provenance" not in back.steps.meta and back.attention.provenance == {}
    prov = _facts(back.save_html(tmp_path / "old.html"))
    assert (
        "seed" not in prov and "model" not in prov and prov["scheduler"] == trace.scheduler
    )  # nothing invented

    tensors, header = trace.to_state()
    header["meta"]["provenance"] = {"seed": "zero"}
    with pytest.raises(ResultFileError, match=r"meta\.provenance\.seed"):
        Trace.from_state(tensors, header)
    header["meta"]["provenance"] = {"seeds": [0]}
    with pytest.raises(ResultFileError, match=r"meta\.provenance\.seeds"):
        Trace.from_state(tensors, header)
    tensors, header = maps.to_state()
    header["maps"]["provenance"] = {"size": [64]}
    with pytest.raises(ResultFileError, match=r"maps\.provenance\.size"):
        AttentionMaps.from_state(tensors, header)


@pytest.fixture(scope="module")
def an_edit(embedded):
    return sdexplore.edit(
        embedded, PROMPT, PROMPT.replace("red", "green"), generator=torch.Generator().manual_seed(2), **STEPS
    )


def test_edit_save_html_writes_the_edit_page_with_its_recorded_provenance(an_edit, tmp_path) -> None:
    path = an_edit.save_html(tmp_path / "edit.html")
    p = pages.read_payload(path)
    assert p["kind"] == "edit" and p["edit"]["default_word"] == "green"
    prov = p["provenance"]
    assert prov["model"] == "tiny-shapes" and prov["scheduler"] == "DDIMScheduler" and prov["seed"] == 2
    assert prov["steps"] == 4 and "→" in prov["prompt"]
    prov = _facts(an_edit.save_html(tmp_path / "mine.html", model="m", seed=9, words=["green"], title="T"))
    assert prov["model"] == "m" and prov["seed"] == 9
    assert [w["word"] for w in pages.read_payload(tmp_path / "mine.html")["edit"]["words"]] == ["green"]
    assert "<title>T</title>" in (tmp_path / "mine.html").read_text(encoding="utf-8")
    back = Edit.load(an_edit.save(tmp_path / "edit.safetensors"))
    assert back.edited_maps.provenance == an_edit.edited_maps.provenance
    assert _facts(back.save_html(tmp_path / "back.html"))["seed"] == 2
    with pytest.raises(InvalidArgumentError, match=r"\.html"):
        an_edit.save_html(tmp_path / "edit.png")
    with pytest.raises(InvalidArgumentError, match="index"):
        an_edit.save_html(tmp_path / "edit.html", index=5)

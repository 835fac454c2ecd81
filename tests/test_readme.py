"""Every Python example of the README runs, as written, on the embedded model, and gives what the README says.

The ```python blocks run in order in one namespace (later examples use the quick start's ``pipe``), in a
temporary folder holding the pictures the README names (``photo.png``, ``photo_b.png``: scenes of the embedded
model's world, drawn by its renderer). A block whose first line says it needs the Hugging Face Hub or a GPU is
skipped, and only such a block. Where the README says what an example gives, the picture is read back with the
world's scorer (:func:`sdexplore.embedded.scenes.read_scene`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdexplore.embedded.model import EMBEDDED_STEPS, embedded_model_available
from sdexplore.embedded.scenes import parse_prompt, read_scene, render_scene

README = Path(__file__).resolve().parents[1] / "README.md"
#: First lines that mark a block as needing what tests here do not have (the README shows them as written).
NEEDS = ("# needs the Hugging Face Hub", "# needs a GPU")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
_HUB_ID = re.compile(r"""load_pipeline\(\s*["'][\w.-]+/[\w.-]+["']""")  # a hub id: owner/name


def python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    return _BLOCK.findall(README.read_text(encoding="utf-8"))


def needs_more(block: str) -> bool:
    """True for a block marked (on its first line) as needing the Hub or a GPU."""
    return block.lstrip().startswith(NEEDS)


def _code_lines(block: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in block.splitlines())  # comments dropped


def test_only_blocks_that_need_the_hub_or_a_gpu_are_marked():
    blocks = python_blocks()
    marked = [b for b in blocks if needs_more(b)]
    assert len(blocks) >= 4 and 1 <= len(marked) < len(blocks)
    for block in blocks:
        uses_hub = _HUB_ID.search(_code_lines(block)) is not None
        uses_gpu = re.search(r"""["']cuda["']|\.cuda\(""", _code_lines(block)) is not None
        assert needs_more(block) == (uses_hub or uses_gpu), block.splitlines()[0]


def _reads_as(image, prompt: str) -> None:
    """The picture shows every part ``prompt`` names (colour, shape, place, background)."""
    want, got = parse_prompt(prompt), read_scene(np.asarray(image))
    assert (got.colour, got.shape, got.place, got.background) == (
        want.colour,
        want.shape,
        want.place,
        want.background,
    ), f"{prompt!r} read as {got.as_params()}"


@pytest.mark.slow
@pytest.mark.skipif(not embedded_model_available(), reason="the trained embedded model is not installed")
def test_every_readme_example_runs_and_gives_what_it_says(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    for name, prompt in (
        ("photo.png", "a big red circle at the top left on a blue background"),
        ("photo_b.png", "a big yellow triangle at the bottom right on a blue background"),
    ):
        Image.fromarray(render_scene(prompt, jitter=False)[0]).save(name)  # the user's pictures

    ns: dict = {"__name__": "readme"}
    after: list[dict] = []  # the namespace after each block that ran
    blocks = [b for b in python_blocks() if not needs_more(b)]
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102 - the README's own examples
        after.append(dict(ns))
    assert len(after) == len(blocks) == len(python_blocks()) - sum(map(needs_more, python_blocks()))

    def state(name: str) -> dict:  # the namespace right after the first block that defines `name`
        return next(a for a in after if name in a)

    # Quick start: the image is the prompt's scene; every step recorded; the word's map; the walk
    qs = state("walk")
    prompt_qs = "a big red circle at the top left on a blue background"
    _reads_as(qs["image"], prompt_qs)
    assert len(qs["obs"].steps) == EMBEDDED_STEPS and qs["obs"].attention.word("circle").ndim == 2
    walk = qs["walk"]
    assert len(walk) == 8 and Path("red_to_blue.gif").stat().st_size > 0
    background = {parse_prompt(p).background for p in walk.prompts}
    assert background == {"white"}
    assert [read_scene(im).background for im in walk.images] == ["white"] * len(walk)  # never flips
    _reads_as(walk.images[0], walk.prompts[0])
    _reads_as(walk.images[-1], walk.prompts[-1])
    page = Path("red_circle.html").read_text(encoding="utf-8")  # the pages: whole files carrying their own run
    assert page.lower().startswith("<!doctype html") and page.rstrip().endswith("</html>")
    assert prompt_qs in page and "tiny-shapes" in page
    assert walk.prompts[0] in Path("red_to_blue.html").read_text(encoding="utf-8")

    # Inversion: within 2 dB of the VAE's round trip at CFG 1 and 25 steps; the regeneration is the picture
    inv_state = state("inv_cfg")
    inv = inv_state["inv"]
    assert inv.settings["steps"] == 25 and inv.settings["guidance"] == 1.0
    assert inv.vae_psnr - 2.0 < inv.psnr <= inv.vae_psnr + 0.5
    _reads_as(inv_state["again"], inv_state["prompt"])
    _reads_as(inv_state["inv_cfg"].reconstruction, inv_state["prompt"])
    assert inv_state["obs"].attention.word("circle").ndim == 2  # maps on the user's picture
    # Edit your own picture: the source branch is the null-text reconstruction, the edit reads as yellow
    assert inv_state["inv_nt"].psnr > inv_state["inv_nt"].vae_psnr - 10
    _reads_as(inv_state["yellow"].source, inv_state["prompt"])
    _reads_as(inv_state["yellow"].edited, inv_state["prompt"].replace("red", "yellow"))

    # Edit by attention: the swap keeps place and background and reads as the new colour; the ablated word's map
    # is zero; under observe the reweighted call recorded its maps
    ed = state("swap")
    _reads_as(ed["swap"].source, ed["source"])
    _reads_as(ed["swap"].edited, "a big green circle at the top left on a blue background")
    assert float(ed["ablate"].edited_maps.word("circle").abs().max()) == 0.0
    assert ed["obs"].attention.word("circle").ndim == 2
    green = "a big green circle at the top left on a blue background"
    _reads_as(ed["green"].edited, green)  # compel's .swap(): the same edit as the explicit pair
    assert np.array_equal(np.asarray(ed["green"].edited), np.asarray(ed["swap"].edited))
    _reads_as(ed["local"].edited, green)
    big, small = (read_scene(np.asarray(im)).size_px for im in (ed["smaller"].source, ed["smaller"].edited))
    assert small < 0.8 * big  # "small" added: the shape shrinks

    # FlowEdit on the embedded MMDiT: the picture's colour turns, place and background stay
    _reads_as(state("flowed")["flowed"].edited, "a big yellow circle at the top left on a blue background")

    # Directions: a red → blue direction turns a held-out prompt's red (another shape and place, another seed)
    dr = state("bluer")
    _reads_as(dr["bluer"], "a big blue triangle at the bottom left on a white background")
    assert Path("red_to_blue.safetensors").stat().st_size > 0

    # Walks between pictures: the end frames are the pictures; a seed keyframe is the prompt's scene
    ws = state("picture_to_seed")
    _reads_as(ws["two_pictures"].images[0], ws["prompt"])
    _reads_as(ws["two_pictures"].images[-1], ws["prompt_b"])
    _reads_as(ws["picture_to_seed"].images[0], ws["prompt"])
    _reads_as(ws["picture_to_seed"].images[-1], ws["prompt_b"])


def test_command_line_examples_use_prompts_the_embedded_model_reads():
    """The README's commands run on the embedded model by default: each prompt they give is one of its world's
    (every part named, so the picture and a walk's every frame keep the background the prompt asks for)."""
    text = README.read_text(encoding="utf-8")
    commands = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    prompts = [
        p
        for block in commands
        for command in block.replace("\\\n", " ").splitlines()
        if re.match(r"sdexplore (steps|attention|walk|invert)\b", command.strip())
        for p in re.findall(r'"([^"]+)"', command.split("#")[0])
    ]
    assert len(prompts) >= 5
    for prompt in prompts:
        scene = parse_prompt(prompt)  # a ValueError naming the grammar otherwise
        assert scene.background is not None, f"{prompt!r}: name the background"

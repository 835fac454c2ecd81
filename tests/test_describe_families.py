"""describe() on the newer families: the capabilities it states are the family record's (the single source), a
video family's frames are counted, and the roles are read from the components (which tokens a tokenizer makes,
whether a transformer attends jointly or through cross-attention)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import sdexplore.tour as tour
from sdexplore import describe
from sdexplore.families import CAPABILITIES, FAMILIES, detect_family
from sdexplore.fixtures import tiny_pipeline


@pytest.fixture(scope="module")
def pipes() -> dict[str, object]:
    return {}


def pipe_of(pipes: dict, name: str):
    if name not in pipes:
        pipes[name] = tiny_pipeline(name)
    return pipes[name]


@pytest.mark.parametrize("name", ["sd1", "sana", "wan"])
def test_describe_states_the_record_capabilities(pipes, name, monkeypatch) -> None:
    pipe = pipe_of(pipes, name)
    d = describe(pipe, steps=2)
    fam = FAMILIES[name]
    assert d.capabilities == [c for c in CAPABILITIES if fam.can(c)]
    assert d.missing == [c for c in CAPABILITIES if not fam.can(c)]
    assert set(d.capabilities) | set(d.missing) == set(CAPABILITIES)
    line = next(x for x in str(d).splitlines() if x.startswith("sdexplore can:"))
    assert all(c in line for c in CAPABILITIES)  # every capability is either offered or said to be refused
    assert d.to_dict()["capabilities"] == d.capabilities
    # read from the record, not a table of its own: a record claiming less makes describe() say less
    fewer = replace(fam, capabilities=frozenset({"steps"}))
    monkeypatch.setattr(tour, "detect_family", lambda p: fewer)
    d = describe(pipe, steps=2)
    assert d.capabilities == ["steps"] and "sdexplore can: steps; refuses" in str(d)


def test_describe_counts_a_video_familys_frames(pipes) -> None:
    pipe = pipe_of(pipes, "wan")
    d = describe(pipe, steps=2)
    # WanPipeline's own defaults: 81 frames of 480×832; its causal VAE keeps frame 0, then 1 in 4
    assert d.frames == (81, 21) and d.image_size == (480, 832)
    ch, h, w = d.latent_shape
    assert (h, w) == (60, 104) and ch == FAMILIES["wan"].latent_channels
    assert d.compression == pytest.approx(81 * 480 * 832 * 3 / (21 * ch * h * w))
    assert "81 frames × 480×832×3" in str(d) and f"21 × 60×104×{ch}" in str(d)
    assert describe(pipe, steps=2, height=64, width=96).latent_shape == (ch, 8, 12)
    assert describe(pipe_of(pipes, "sana"), steps=2).frames is None  # an image family


@pytest.mark.parametrize(
    ("name", "tokens", "structure"),
    [
        ("sana", "sentencepiece pieces for Gemma2Model", "linear (softmax-free"),
        (
            "pixart-sigma",
            "sentencepiece pieces for T5EncoderModel",
            "blocks of self-attention over the image",
        ),
        ("wan", "sentencepiece pieces for UMT5EncoderModel", "self-attention over the video tokens"),
    ],
)
def test_cross_attention_dits_are_described_as_such(pipes, name, tokens, structure) -> None:
    pipe = pipe_of(pipes, name)
    d = describe(pipe, steps=2, height=64, width=64)
    roles = {c.name: c.role for c in d.components}
    assert roles["tokenizer"] == f"splits the prompt into {tokens}"
    assert roles["transformer"].startswith("DiT:") and "cross-attention" in roles["transformer"]
    assert "MMDiT" not in roles["transformer"]
    assert len(d.blocks) == 1 and structure in d.blocks[0] and "2 blocks" in d.blocks[0]


def test_an_mmdit_keeps_its_joint_role_and_clip_its_bpe(pipes) -> None:
    d = describe(pipe_of(pipes, "sd3"), steps=2)
    roles = {c.name: c.role for c in d.components}
    assert roles["transformer"].startswith("MMDiT") and roles["tokenizer"].startswith(
        "splits the prompt into CLIP BPE tokens"
    )
    assert detect_family(pipe_of(pipes, "sd3")).name == d.family


def test_z_image_is_a_single_stream_dit_predicting_x0_minus_noise_at_1024(pipes) -> None:
    """Z-Image's transformer runs image and caption tokens as one sequence (not an MMDiT) and outputs x0 − ε, which
    the pipeline negates (the record's negated_output); its call's default size is 1024 (the record's)."""
    pipe = pipe_of(pipes, "z-image")
    d = describe(pipe, steps=2)
    role = {c.name: c.role for c in d.components}["transformer"]
    assert role.startswith("single-stream DiT") and "MMDiT" not in role and "jointly" not in role
    assert "x0 − ε" in role and "v = ε − x0, noise minus image" not in role
    assert d.negated_output and "the denoiser predicts x0 − ε" in str(d)
    assert d.image_size == (1024, 1024) == (FAMILIES["z-image"].native_size,) * 2
    assert d.latent_shape[1:] == (128, 128)
    assert (
        len(d.blocks) == 1 and "2 single-stream layers" in d.blocks[0] and "1 caption refiner" in d.blocks[0]
    )
    # the other flow families keep the flow v = ε − x0 and their own sizes
    q = describe(pipe_of(pipes, "qwen-image"), steps=2)
    assert not q.negated_output and "v = ε − x0" in {c.name: c.role for c in q.components}["transformer"]
    assert q.image_size == (1024, 1024) and not any("single-stream" in b for b in q.blocks)

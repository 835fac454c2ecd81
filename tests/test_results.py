"""Result files (Trace, AttentionMaps, Walk, Observation): checksums, field checks, atomic pairs, accessor errors."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdexplore.errors import InterpolationError, ResultFileError, SelectionError, WordNotFoundError
from sdexplore.results import AttentionMaps, Observation, StepRecord, TokenList, Trace, Walk

TRACE_KEY, MAPS_KEY, WALK_KEY = "sdexplore.trace", "sdexplore.AttentionMaps", "sdexplore.Walk"


# ---------------------------------------------------------------- tiny results, built without a pipeline


def make_trace(steps: int = 3, B: int = 1, C: int = 4, h: int = 8, w: int = 8) -> Trace:
    """A trace shaped like a recorder's: fp16 latents and x0, uint8 previews, an infinite first sigma."""
    g = torch.Generator().manual_seed(0)
    recs = []
    for i in range(steps):
        ab = (i + 1) / (steps + 1)
        rec = StepRecord(
            index=2 * i,
            timestep=float(999 - 300 * i),
            sigma=math.inf if i == 0 else math.sqrt((1 - ab) / ab),
            alpha_bar=0.0 if i == 0 else ab,
            guidance_scale=3.0,
            x0_source="scheduler",
        )
        rec.latents = torch.randn(B, C, h, w, generator=g).half()  # (B, C, h, w)
        rec.x0 = torch.randn(B, C, h, w, generator=g).half()
        rec.preview = torch.randint(0, 256, (B, h, w, 3), generator=g, dtype=torch.uint8)  # (B, h, w, 3)
        rec.noise_norm = torch.rand(B, generator=g)  # (B,)
        recs.append(rec)
    return Trace(
        steps=recs,
        family="sd1",
        scheduler="DDIMScheduler",
        num_steps=2 * steps,
        every=2,
        guidance_scale=3.0,
        final_latents=torch.randn(B, C, h, w, generator=g).half(),
        meta={"ve_latents": False, "latent_rgb": {"factors": [[0.1, 0.2, 0.3]] * C, "bias": [0.0, 0.1, 0.2]}},
    )


def _tokens(T: int, words: list[str]) -> TokenList:
    pieces = ["<|startoftext|>", *(f"{w}</w>" for w in words), "<|endoftext|>"]
    kinds = ["bos", *["text"] * len(words), "eos"]
    pieces += ["<|endoftext|>"] * (T - len(pieces))
    kinds += ["pad"] * (T - len(kinds))
    return TokenList(ids=list(range(T)), pieces=pieces, kinds=kinds, prompt=" ".join(words))


def make_maps(negative: bool = True, T: int = 6, S: int = 2) -> AttentionMaps:
    """Maps of one image: two layers (4×4 and 8×8), per-step maps, per-head maps and kept fp16 probabilities."""
    g = torch.Generator().manual_seed(1)

    def soft(*shape: int, dim: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).softmax(dim)

    sizes = {"down_blocks.0.attn2": (4, 4), "up_blocks.1.attn2": (8, 8)}
    maps = AttentionMaps(
        aggregate=soft(1, T, 8, 8, dim=1),  # (B, T, H, W)
        timesteps=torch.tensor([900.0, 500.0][:S]),
        layers={n: soft(1, T, h, w, dim=1) for n, (h, w) in sizes.items()},  # (B, T, h, w)
        token_lists=[_tokens(T, ["a", "red", "circle"])],
        latent_size=(8, 8),
        steps=soft(S, 1, T, 4, 4, dim=2),  # (S, B, T, h, w)
        layer_heads={n: soft(1, 2, T, h, w, dim=2) for n, (h, w) in sizes.items()},  # (B, heads, T, h, w)
        probs={
            n: soft(S, 1, 2, h * w, T, dim=-1).half() for n, (h, w) in sizes.items()
        },  # (S, B, heads, hw, T)
        family="sd1",
    )
    if negative:
        maps.negative = make_maps(negative=False, T=T, S=S)
        maps.negative.token_lists = [_tokens(T, ["blurry"])]
    return maps


def make_walk(frames: int = 5) -> Walk:
    g = np.random.default_rng(2)
    return Walk(
        images=g.integers(0, 256, (frames, 8, 8, 3), dtype=np.uint8),  # (frames, H, W, 3)
        prompts=["a red circle", "a blue circle"],
        seeds=[0, 1],
        segments=[0] * frames,
        ts=[i / (frames - 1) for i in range(frames)],
        keyframe_frames=[0, frames - 1],
        settings={"num_inference_steps": 3, "height": 8, "width": 8, "loop": False, "spacing": "even"},
        summaries=[{"timesteps": [1.0, 2.0]}] * frames,
    )


def make_observation() -> Observation:
    return Observation(runs=[make_trace()], _attention=make_maps())


# ---------------------------------------------------------------- equality (a loaded result is what was saved)


def same_tensor(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def same_trace(a: Trace, b: Trace) -> bool:
    scalars = ("family", "scheduler", "prediction_type", "num_steps", "every", "guidance_scale", "stopped_at")
    if any(getattr(a, k) != getattr(b, k) for k in scalars) or a.meta != b.meta or len(a) != len(b):
        return False
    if not same_tensor(a.final_latents, b.final_latents):
        return False
    return all(
        s._scalars() == t._scalars() and s._tensors().keys() == t._tensors().keys()
        for s, t in zip(a, b, strict=True)
    ) and all(
        same_tensor(getattr(s, k), getattr(t, k)) for s, t in zip(a, b, strict=True) for k in s._tensors()
    )


def same_maps(a: AttentionMaps | None, b: AttentionMaps | None) -> bool:
    if a is None or b is None:
        return a is b
    groups_a = [a.layers, a.layer_heads or {}, a.probs or {}]
    groups_b = [b.layers, b.layer_heads or {}, b.probs or {}]
    return (
        same_tensor(a.aggregate, b.aggregate)
        and same_tensor(a.timesteps, b.timesteps)
        and same_tensor(a.steps, b.steps)
        and all(
            ga.keys() == gb.keys() and all(same_tensor(ga[k], gb[k]) for k in ga)
            for ga, gb in zip(groups_a, groups_b, strict=True)
        )
        and (a.layer_heads is None) == (b.layer_heads is None)
        and (a.probs is None) == (b.probs is None)
        and [t.to_json() for t in a.token_lists] == [t.to_json() for t in b.token_lists]
        and (a.latent_size, a.vae_scale, a.skipped_layers, a.family)
        == (b.latent_size, b.vae_scale, b.skipped_layers, b.family)
        and same_maps(a.negative, b.negative)
    )


def same_walk(a: Walk, b: Walk) -> bool:
    return (
        a.images.dtype == b.images.dtype
        and np.array_equal(a.images, b.images)
        and (a.prompts, a.seeds, a.segments, a.ts, a.keyframe_frames, a.settings, a.summaries)
        == (b.prompts, b.seeds, b.segments, b.ts, b.keyframe_frames, b.settings, b.summaries)
    )


def same_observation(a: Observation, b: Observation) -> bool:
    return (
        len(a.runs) == len(b.runs)
        and all(map(same_trace, a.runs, b.runs))
        and same_maps(a.attention, b.attention)
    )


# ---------------------------------------------------------------- file surgery


def read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def rewrite(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def edit_header(path: Path, key: str, edit) -> None:
    tensors, meta = read_file(path)
    header = json.loads(meta[key])
    meta[key] = json.dumps(edit(header))
    rewrite(path, tensors, meta)


def edit_walk(path: Path, edit) -> None:
    """Edit a saved walk's JSON, in the sidecar and (where the file carries one) in its embedded header."""
    side = Path(str(path) + ".json")
    side.write_text(json.dumps(edit(json.loads(side.read_text()))))
    tensors, meta = read_file(path)
    if WALK_KEY in meta:
        meta[WALK_KEY] = json.dumps(edit(json.loads(meta[WALK_KEY])))
        rewrite(path, tensors, meta)


def set_step(i: int, key: str, value):
    def edit(h):
        h["steps"][i][key] = value
        return h

    return edit


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------- round trips


def test_round_trips_are_exact(tmp_path):
    trace, maps, walk, obs = make_trace(), make_maps(), make_walk(), make_observation()
    assert same_trace(Trace.load(trace.save(tmp_path / "t.safetensors")), trace)
    assert same_maps(AttentionMaps.load(maps.save(tmp_path / "m")), maps)
    assert same_walk(Walk.load(walk.save(tmp_path / "w.safetensors")), walk)
    assert same_observation(Observation.load(obs.save(tmp_path / "obs")), obs)
    assert Trace.load(tmp_path / "t.safetensors")[0].sigma == math.inf


# ---------------------------------------------------------------- header fields


@pytest.mark.parametrize("version", ["abc", [2], None, "missing", True, 2.0])
def test_a_trace_version_of_the_wrong_type_is_a_result_file_error(tmp_path, version):
    path = make_trace().save(tmp_path / "t.safetensors")

    def edit(h):
        if version == "missing":
            del h["version"]
        else:
            h["version"] = version
        return h

    edit_header(path, TRACE_KEY, edit)
    with pytest.raises(ResultFileError, match=r"t\.safetensors.*version"):
        Trace.load(path)


def test_a_trace_header_that_is_not_an_object_is_a_result_file_error(tmp_path):
    path = make_trace().save(tmp_path / "t.safetensors")
    edit_header(path, TRACE_KEY, lambda h: [h])
    with pytest.raises(ResultFileError, match="JSON object"):
        Trace.load(path)


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (set_step(1, "timestep", "soon"), r"steps\[1\]\.timestep"),
        (set_step(0, "x0_source", "guessed"), r"steps\[0\]\.x0_source"),
        (set_step(2, "index", 0), r"steps\[2\]\.index"),
        (set_step(0, "tensors", ["x0", "x0"]), r"steps\[0\]\.tensors"),
        (lambda h: {**h, "every": 0}, "every"),
        (
            lambda h: {**h, "meta": {**h["meta"], "latent_rgb": {"factors": [[1, 2]], "bias": [0, 0, 0]}}},
            "latent_rgb",
        ),
        (lambda h: {**h, "family": 3}, "family"),
    ],
)
def test_each_trace_field_is_checked_and_named(tmp_path, edit, field):
    path = make_trace().save(tmp_path / "t.safetensors")
    edit_header(path, TRACE_KEY, edit)
    with pytest.raises(ResultFileError, match=field) as err:
        Trace.load(path)
    assert str(path) in str(err.value)


def test_an_edited_but_well_typed_field_fails_the_header_checksum(tmp_path):
    path = make_trace().save(tmp_path / "t.safetensors")
    edit_header(path, TRACE_KEY, lambda h: {**h, "family": "sdxl"})
    with pytest.raises(ResultFileError, match="checksum"):
        Trace.load(path)


def test_a_version_1_file_is_refused_as_predating_checksums(tmp_path):
    """What sdexplore 0.1.0 wrote: a trace header without shapes, dtypes or checksums."""
    tensors, header = make_trace().to_state()
    header["version"] = 1
    del header["final_latents"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={TRACE_KEY: json.dumps(header)})
    with pytest.raises(ResultFileError, match="predates checksums"):
        Trace.load(tmp_path / "old.safetensors")
    save_file(
        {"aggregate": torch.zeros(1)},
        str(tmp_path / "old_maps.safetensors"),
        metadata={"format": MAPS_KEY, "version": "1", "meta": "{}"},
    )
    with pytest.raises(ResultFileError, match="predates checksums"):
        AttentionMaps.load(tmp_path / "old_maps.safetensors")


# ---------------------------------------------------------------- tensors: shapes, dtypes, bytes


@pytest.mark.parametrize("kind", ["trace", "maps"])
def test_a_reshaped_tensor_fails(tmp_path, kind):
    if kind == "trace":
        path, name, load = make_trace().save(tmp_path / "t.safetensors"), "step1.x0", Trace.load
    else:
        path, name, load = (
            make_maps().save(tmp_path / "m.safetensors"),
            "layers/down_blocks.0.attn2",
            AttentionMaps.load,
        )
    tensors, meta = read_file(path)
    t = tensors[name]
    tensors[name] = t.reshape(*t.shape[:-2], t.shape[-1] // 2, t.shape[-2] * 2)  # same numel, (…, h/2, 2w)
    rewrite(path, tensors, meta)
    with pytest.raises(ResultFileError, match=name.split("/")[-1].replace(".", r"\.")):
        load(path)


def test_swapped_preview_and_x0_fail(tmp_path):
    path = make_trace().save(tmp_path / "t.safetensors")
    tensors, meta = read_file(path)
    tensors["step0.x0"], tensors["step0.preview"] = tensors["step0.preview"], tensors["step0.x0"]
    rewrite(path, tensors, meta)
    with pytest.raises(ResultFileError, match=r"step0\.(x0|preview)"):
        Trace.load(path)


@pytest.mark.parametrize("kind", ["trace", "maps", "walk"])
def test_a_flipped_data_byte_fails_the_checksum(tmp_path, kind):
    result = {"trace": make_trace, "maps": make_maps, "walk": make_walk}[kind]()
    path = result.save(tmp_path / "r.safetensors")
    flip_last_byte(path)
    with pytest.raises(ResultFileError, match="checksum"):
        type(result).load(path)


def test_a_retyped_tensor_fails(tmp_path):
    path = make_trace().save(tmp_path / "t.safetensors")
    tensors, meta = read_file(path)
    tensors["step2.preview"] = tensors["step2.preview"].float()
    rewrite(path, tensors, meta)
    with pytest.raises(ResultFileError, match=r"step2\.preview.*dtype"):
        Trace.load(path)


# ---------------------------------------------------------------- walks: consistency and atomic pairs


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda h: {**h, "segments": h["segments"][:-1]}, "segments"),
        (lambda h: {**h, "segments": [0, 0, 5, 0, 0]}, r"segments\[2\]"),
        (lambda h: {**h, "ts": [0.0, 0.2, "half", 0.7, 1.0]}, r"ts\[2\]"),
        (lambda h: {**h, "keyframe_frames": [0, 9]}, r"keyframe_frames\[1\]"),
        (lambda h: {**h, "seeds": [0]}, "seeds"),
        (lambda h: {**h, "settings": {**h["settings"], "height": "tall"}}, r"settings\.height"),
    ],
)
def test_walk_fields_must_agree_with_its_frames(tmp_path, edit, field):
    path = make_walk().save(tmp_path / "w.safetensors")
    edit_walk(path, edit)
    with pytest.raises(ResultFileError, match=field):
        Walk.load(path)


def test_a_walk_sidecar_from_another_save_is_refused(tmp_path):
    a = make_walk().save(tmp_path / "a.safetensors")
    other = make_walk()
    other.prompts = ["a green square", "a blue circle"]
    b = other.save(tmp_path / "b.safetensors")
    Path(str(a) + ".json").write_text(Path(str(b) + ".json").read_text())
    with pytest.raises(ResultFileError, match="'prompts' does not match"):
        Walk.load(a)


def test_a_failed_walk_save_leaves_no_orphan(tmp_path):
    path = tmp_path / "w.safetensors"
    Path(str(path) + ".json").mkdir()  # the JSON cannot be written there
    with pytest.raises(OSError):
        make_walk().save(path)
    assert not path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors.json"]


def test_a_failed_save_keeps_the_previous_pair(tmp_path):
    path = make_walk().save(tmp_path / "w.safetensors")
    before = (path.read_bytes(), Path(str(path) + ".json").read_bytes())
    bad = make_walk()
    bad.summaries = [object()] * len(bad)  # not JSON: refused before anything is written
    with pytest.raises(ResultFileError, match="JSON"):
        bad.save(path)
    assert (path.read_bytes(), Path(str(path) + ".json").read_bytes()) == before
    assert same_walk(Walk.load(path), make_walk())


def test_saved_files_have_ordinary_modes_and_no_temporaries(tmp_path):
    make_walk().save(tmp_path / "w.safetensors")
    make_observation().save(tmp_path / "obs")
    umask = os.umask(0)
    os.umask(umask)
    files = [*tmp_path.glob("*"), *(tmp_path / "obs").glob("*")]
    names = sorted(p.name for p in files)
    assert names == sorted(
        [
            "w.safetensors",
            "w.safetensors.json",
            "obs",
            "steps.safetensors",
            "attention.safetensors",
            "observation.json",
        ]
    )
    for p in files:
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p


# ---------------------------------------------------------------- observation folders


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda ix: {**ix, "version": "abc"}, "version"),
        (lambda ix: {**ix, "steps": {**ix["steps"], "file": "../t.safetensors"}}, r"steps\.file"),
        (lambda ix: {**ix, "attention": 7}, "attention"),
        (lambda ix: [ix], "JSON object"),
    ],
)
def test_observation_index_fields_are_checked(tmp_path, edit, field):
    folder = make_observation().save(tmp_path / "obs")
    index = folder / "observation.json"
    index.write_text(json.dumps(edit(json.loads(index.read_text()))))
    with pytest.raises(ResultFileError, match=field):
        Observation.load(folder)


def test_an_observation_file_from_another_save_is_refused(tmp_path):
    folder = make_observation().save(tmp_path / "obs")
    other = make_trace(steps=2)
    other.save(folder / "steps.safetensors")
    with pytest.raises(ResultFileError, match="another save"):
        Observation.load(folder)


# ---------------------------------------------------------------- accessors


def test_attention_accessors_raise_library_errors_naming_the_value():
    maps = make_maps()
    with pytest.raises(WordNotFoundError, match="123"):
        maps.word(123)  # type: ignore[arg-type]
    with pytest.raises(WordNotFoundError, match="list of words"):
        maps.word_maps("red")
    with pytest.raises(WordNotFoundError, match="occurrence"):
        maps.word("red", occurrence="first")  # type: ignore[arg-type]
    with pytest.raises(SelectionError, match="'3'"):
        maps.token("3")  # type: ignore[arg-type]
    with pytest.raises(SelectionError, match="0..5"):
        maps.token(6)
    with pytest.raises(SelectionError, match="index=1"):
        maps.word("red", index=1)
    with pytest.raises(SelectionError, match="2.5"):
        maps.word("red", step=2.5)  # type: ignore[arg-type]
    with pytest.raises(SelectionError, match="'x'"):
        maps.word("red", step=[0, "x"])  # type: ignore[list-item]
    with pytest.raises(SelectionError, match="layer=3"):
        maps.word("red", layer=3)  # type: ignore[arg-type]
    with pytest.raises(IndexError):  # still the plain lookup errors they replaced
        maps.word("red", step=9)
    with pytest.raises(KeyError):
        maps.word("red", layer="mid_block")
    assert maps.word("red", step=[0, 1], layer="down").shape == (4, 4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(frames=2.5), r"frames .*got 2\.5"),
        (dict(frames=True), r"frames .*got True"),
        (dict(num_inference_steps=0), r"num_inference_steps .*got 0"),
        (dict(height=0, width=64), "height=0"),
        (dict(width=60), "width=60"),
        (dict(guidance_scale="high"), r"guidance_scale='high'"),
        (dict(guidance_scale=math.nan), "guidance_scale=nan"),
        (dict(batch_size=0), r"batch_size .*got 0"),
        (dict(seeds=[0, 1.5]), r"seeds\[1\]=1\.5"),
        (dict(spacing="fast"), "spacing='fast'"),
        (dict(loop="yes"), "loop='yes'"),
        (dict(negative_prompt=3), "negative_prompt=3"),
        (dict(prompts=["a", 3]), "prompts="),
        (dict(generator_device="nowhere"), "generator_device='nowhere'"),
        (dict(observe=True), "observe=True"),
    ],
)
def test_walk_arguments_are_checked_before_anything_runs(sd1_pipe, monkeypatch, kwargs, match):
    import sdexplore.walks as walks

    def never(*a, **k):
        raise AssertionError("walk() started encoding or rendering before checking its arguments")

    monkeypatch.setattr(walks, "_keyframes", never)
    monkeypatch.setattr(walks, "_render", never)
    args = dict(prompts=["a red circle", "a blue circle"], seeds=[0, 1], frames=3, progress=False)
    with pytest.raises(InterpolationError, match=match):
        walks.walk(sd1_pipe, **{**args, **kwargs})


def test_refine_checks_its_count(sd1_pipe):
    import sdexplore.walks as walks

    with pytest.raises(InterpolationError, match=r"extra .*got -1"):
        walks.refine(sd1_pipe, make_walk(), -1)

"""Hostile inputs to the file writers and the loader: each gets one sdexplore error naming the file or value,
before expensive work, and a failed or interrupted write leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import torch

import sdexplore.loading as loading
import sdexplore.views.export as export
from sdexplore import DeviceDtypeError, ModelNotAvailableError, SdexploreError, UnsupportedPipelineError


def _frames(n=4, h=32, w=48):
    """Frames that differ clearly (a moving bar), so no encoder merges them."""
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, :, i * (w // n) : (i + 1) * (w // n)] = (255, 60 * i, 0)
    return out


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- export: arguments


@pytest.mark.parametrize("fps", [0, -3, float("nan"), float("inf"), "12", True, None])
@pytest.mark.parametrize("writer", ["save_gif", "save_mp4"])
def test_bad_fps_is_refused_before_any_file_is_written(tmp_path, writer, fps):
    path = tmp_path / ("x.gif" if writer == "save_gif" else "x.mp4")
    with pytest.raises(SdexploreError, match="fps"):
        getattr(export, writer)(_frames(), path, fps=fps)
    assert _listing(tmp_path) == []


def test_gif_fps_above_what_gif_delays_can_store_is_refused(tmp_path):
    with pytest.raises(
        SdexploreError, match="50"
    ):  # delays are whole 1/100 s; browsers slow < 0.02 s to 0.1 s
        export.save_gif(_frames(), tmp_path / "x.gif", fps=60)
    assert _listing(tmp_path) == []


def test_mp4_writes_the_fps_it_was_given(tmp_path):
    path = export.save_mp4(_frames(), tmp_path / "x.mp4", fps=5)
    import imageio.v3 as iio

    assert iio.immeta(path, plugin="FFMPEG")["fps"] == pytest.approx(5)


@pytest.mark.parametrize("name", ["x.txt", "x", "x.avi", "x.gif"])
def test_video_extension_is_checked_before_encoding(tmp_path, name):
    with pytest.raises(SdexploreError, match=r"\.mp4.*\.webm"):
        export.save_mp4(_frames(), tmp_path / name)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("name", ["x.mp4", "x.png", "x"])
def test_gif_extension_is_checked(tmp_path, name):
    with pytest.raises(SdexploreError, match=r"\.gif"):
        export.save_gif(_frames(), tmp_path / name)
    assert _listing(tmp_path) == []


def test_grid_extension_must_be_an_image_format(tmp_path):
    with pytest.raises(SdexploreError, match="grid.xyz"):
        export.save_grid(_frames(), tmp_path / "grid.xyz")
    assert _listing(tmp_path) == []
    assert export.save_grid(_frames(), tmp_path / "grid.jpg").stat().st_size > 100  # any format PIL writes


def test_webm_is_vp9_and_reads_back(tmp_path):
    f = _frames(5, 32, 48)
    path = export.save_mp4(f, tmp_path / "walk.webm", fps=10)
    import imageio.v3 as iio

    meta = iio.immeta(path, plugin="FFMPEG")
    assert meta["codec"] == "vp9" and meta["fps"] == pytest.approx(10)
    back = export.read_frames(path)
    assert back.shape == (5, 32, 48, 3)
    assert np.abs(back[2].astype(int) - f[2]).mean() < 20  # lossy, but the same picture


def test_empty_frames_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(SdexploreError, match="no frames"):
        export.save_gif(np.zeros((0, 8, 8, 3), np.uint8), tmp_path / "x.gif")
    with pytest.raises(SdexploreError, match="no frames"):
        export.save_mp4([], tmp_path / "x.mp4")
    with pytest.raises(SdexploreError, match="nope"):
        export.save_mp4(_frames(), tmp_path / "nope" / "x.mp4")
    assert _listing(tmp_path) == []


# ---------------------------------------------------------------- export: failures leave nothing behind


def test_ffmpeg_failure_raises_naming_the_file_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "walk.mp4"
    target.write_bytes(b"previous video")
    monkeypatch.setattr(export, "_VIDEO_CODECS", {".mp4": ("mp4", ["-c:v", "no-such-encoder"])})
    with pytest.raises(SdexploreError, match=r"walk\.mp4.*no-such-encoder"):
        export.save_mp4(_frames(), target)
    assert target.read_bytes() == b"previous video"  # untouched
    assert _listing(tmp_path) == ["walk.mp4"]  # no temporary file left


def test_interrupted_video_write_kills_ffmpeg_and_leaves_nothing(tmp_path, monkeypatch):
    started = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    def interrupted(frames):
        yield frames[0].tobytes()
        raise KeyboardInterrupt

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    monkeypatch.setattr(export, "_frame_bytes", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.save_mp4(_frames(), tmp_path / "walk.mp4")
    assert len(started) == 1 and started[0].poll() is not None  # ffmpeg is gone, not orphaned
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_interrupted_gif_write_leaves_the_old_file(tmp_path, monkeypatch, error):
    target = tmp_path / "walk.gif"
    target.write_bytes(b"previous gif")
    real = export.iio.imwrite

    def half_then_fail(uri, *args, **kwargs):
        real(uri, *args, **kwargs)  # the temporary file is complete ...
        raise error  # ... and then the write is interrupted before the rename

    monkeypatch.setattr(export.iio, "imwrite", half_then_fail)
    with pytest.raises(error):
        export.save_gif(_frames(), target)
    assert target.read_bytes() == b"previous gif" and _listing(tmp_path) == ["walk.gif"]


def test_frames_are_written_all_or_nothing(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    real_save = export.Image.Image.save
    calls = []

    def fail_on_third(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(export.Image.Image, "save", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        export.save_frames(_frames(5), folder)
    assert not folder.exists() or _listing(folder) == []  # no half sequence, no temporary files


def test_rewriting_a_shorter_sequence_removes_the_stale_tail(tmp_path):
    folder = tmp_path / "frames"
    export.save_frames(_frames(5), folder)
    (folder / "notes.txt").write_text("mine")
    paths = export.save_frames(_frames(3), folder)
    assert [p.name for p in paths] == ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    assert _listing(folder) == ["frame_0000.png", "frame_0001.png", "frame_0002.png", "notes.txt"]


def test_written_files_have_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        for path in (
            export.save_gif(_frames(), tmp_path / "a.gif"),
            export.save_grid(_frames(), tmp_path / "g.png"),
            export.save_frames(_frames(2), tmp_path / "f")[0],
        ):
            assert path.stat().st_mode & 0o777 == 0o644, path
    finally:
        os.umask(umask)


# ---------------------------------------------------------------- loading: files


def _fake_safetensors(path, keys):
    from safetensors.torch import save_file

    save_file({k: torch.zeros(2) for k in keys}, str(path))
    return path


def test_garbage_model_index_names_the_file(tmp_path):
    (tmp_path / "model_index.json").write_text("garbage{")
    with pytest.raises(ModelNotAvailableError, match=r"model_index\.json.*not valid JSON"):
        loading.load_pipeline(tmp_path, device="cpu")
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ModelNotAvailableError, match=r"model_index\.json.*_class_name"):
        loading.load_pipeline(tmp_path, device="cpu")


def test_missing_component_folder_is_named_before_loading(tmp_path, sd1_pipe):
    sd1_pipe.save_pretrained(tmp_path)
    import shutil

    shutil.rmtree(tmp_path / "unet")
    with pytest.raises(ModelNotAvailableError, match=r"unet"):
        loading.load_pipeline(tmp_path, device="cpu")


def test_junk_or_truncated_safetensors_names_the_file(tmp_path, sd1_pipe):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelNotAvailableError, match=r"junk\.safetensors"):
        loading.load_pipeline(junk, device="cpu")
    junk.write_bytes(b"")
    with pytest.raises(ModelNotAvailableError, match=r"junk\.safetensors"):
        loading.load_pipeline(junk, device="cpu")
    folder = tmp_path / "pipe"
    sd1_pipe.save_pretrained(folder)
    weights = next((folder / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])  # a download cut short
    with pytest.raises(ModelNotAvailableError, match=rf"{weights.name}.*truncated"):
        loading.load_pipeline(folder, device="cpu")


def test_unrelated_safetensors_is_not_a_hub_cache_problem(tmp_path):
    other = _fake_safetensors(tmp_path / "other.safetensors", ["a", "b.weight"])
    with pytest.raises(UnsupportedPipelineError, match=r"other\.safetensors.*Stable Diffusion checkpoint"):
        loading.load_pipeline(other, device="cpu")
    unet = _fake_safetensors(
        tmp_path / "unet.safetensors", ["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"]
    )
    with pytest.raises(UnsupportedPipelineError, match="pipeline folder"):
        loading.load_pipeline(unet, device="cpu")
    sd3 = _fake_safetensors(tmp_path / "sd3.safetensors", ["model.diffusion_model.joint_blocks.0.x.weight"])
    with pytest.raises(UnsupportedPipelineError, match="SD3"):
        loading.load_pipeline(sd3, device="cpu")


def test_single_file_that_cannot_be_built_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    sd = _fake_safetensors(tmp_path / "sd15.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"])
    with pytest.raises(ModelNotAvailableError, match=r"sd15\.safetensors"):
        loading.load_pipeline(sd, device="cpu")


# ---------------------------------------------------------------- loading: arguments


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", "meta", "", 3.5, None])
def test_unknown_device_lists_the_accepted_ones(device):
    with pytest.raises(DeviceDtypeError, match=r"'cpu'.*'cuda:N'"):
        loading.pick_device(device)


def test_cuda_index_beyond_the_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert loading.pick_device("cuda:1") == torch.device("cuda:1")
    assert loading.pick_device(" CUDA ") == torch.device("cuda")
    with pytest.raises(DeviceDtypeError, match=r"cuda:2.*2 GPU"):
        loading.pick_device("cuda:2")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float64, torch.complex64, "int8", 16, None])
def test_dtypes_a_pipeline_cannot_run_in_are_refused(dtype):
    with pytest.raises(DeviceDtypeError, match=r"float32.*float16.*bfloat16"):
        loading.pick_dtype(dtype, "cpu")


def test_dtype_strings_are_forgiving_about_case_and_prefix():
    assert loading.pick_dtype("torch.float32", "cpu") == torch.float32
    assert loading.pick_dtype(" BFloat16 ", "cpu") == torch.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": 42}, "model"),
        ({"model": ""}, "model"),
        ({"safety_checker": "no"}, "safety_checker"),
        ({"allow_pickle": 1}, "allow_pickle"),
        ({"progress_bar": "yes"}, "progress_bar"),
        ({"scheduler": 3}, "scheduler"),
        ({"device": "tpu"}, "tpu"),
        ({"dtype": torch.int8}, "int8"),
    ],
)
def test_load_pipeline_arguments_are_checked_before_loading(monkeypatch, kwargs, match):
    def never(*args, **kw):
        raise AssertionError("loading started before the arguments were checked")

    monkeypatch.setattr(loading, "_load", never)
    with pytest.raises(SdexploreError, match=match):
        loading.load_pipeline(**kwargs)


def test_passing_a_pipeline_as_the_model_says_so(monkeypatch, sd1_pipe):
    monkeypatch.setattr(loading, "_load", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SdexploreError, match="already"):
        loading.load_pipeline(sd1_pipe)


# ---------------------------------------------------------------- schedulers


def test_unknown_scheduler_is_refused_without_changing_the_pipeline(sd1_pipe):
    before = sd1_pipe.scheduler
    with pytest.raises(SdexploreError, match=r"FancyScheduler.*EulerDiscreteScheduler"):
        loading.set_scheduler(sd1_pipe, "FancyScheduler")
    with pytest.raises(SdexploreError, match="Did you mean 'EulerDiscreteScheduler'"):
        loading.set_scheduler(sd1_pipe, "EulerDiscretescheduler")
    assert sd1_pipe.scheduler is before


@pytest.mark.parametrize(
    "name", ["FlowMatchEulerDiscreteScheduler", "DDIMInverseScheduler", "VQDiffusionScheduler"]
)
def test_incompatible_scheduler_is_refused_without_changing_the_pipeline(sd1_pipe, name):
    before = sd1_pipe.scheduler
    with pytest.raises(SdexploreError, match=rf"{name}.*DDIMScheduler.*EulerDiscreteScheduler"):
        loading.set_scheduler(sd1_pipe, name)
    assert sd1_pipe.scheduler is before


def test_scheduler_options_are_checked_before_anything_changes(sd1_pipe):
    before = sd1_pipe.scheduler
    with pytest.raises(SdexploreError, match="no_such_option"):
        loading.set_scheduler(sd1_pipe, "EulerDiscreteScheduler", no_such_option=1)
    with pytest.raises(SdexploreError, match="beta_schedule"):
        loading.set_scheduler(sd1_pipe, "DDIMScheduler", beta_schedule="wobbly")
    assert sd1_pipe.scheduler is before
    loading.set_scheduler(sd1_pipe, "LCMScheduler")  # distilled-model schedulers stay allowed on SD models
    assert type(sd1_pipe.scheduler).__name__ == "LCMScheduler"


def test_check_scheduler_name_reads_the_model_folder(tmp_path, sd1_pipe):
    assert (
        loading.check_scheduler_name("EulerDiscreteScheduler") == "EulerDiscreteScheduler"
    )  # embedded model
    with pytest.raises(SdexploreError, match="FlowMatchEulerDiscreteScheduler"):
        loading.check_scheduler_name("FlowMatchEulerDiscreteScheduler")
    sd1_pipe.save_pretrained(tmp_path)
    assert loading.check_scheduler_name("UniPCMultistepScheduler", tmp_path) == "UniPCMultistepScheduler"
    config = tmp_path / "scheduler" / "scheduler_config.json"
    config.write_text(
        json.dumps({**json.loads(config.read_text()), "_class_name": "FlowMatchEulerDiscreteScheduler"})
    )
    assert loading.check_scheduler_name("FlowMatchEulerDiscreteScheduler", tmp_path)
    with pytest.raises(SdexploreError, match=r"DDIMScheduler.*FlowMatchEulerDiscreteScheduler"):
        loading.check_scheduler_name("DDIMScheduler", tmp_path)
    with pytest.raises(SdexploreError, match="FancyScheduler"):
        loading.check_scheduler_name("FancyScheduler", "some-org/not-cached-model")  # name checked offline


def test_load_pipeline_checks_the_scheduler_before_loading(monkeypatch):
    monkeypatch.setattr(loading, "_load", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(SdexploreError, match="FlowMatchEulerDiscreteScheduler"):
        loading.load_pipeline(scheduler="FlowMatchEulerDiscreteScheduler")


def test_check_fps_is_cheap_and_public_for_the_command_line():
    assert export.check_fps(np.float32(12)) == 12.0 and export.check_fps(60) == 60.0
    for bad in (float("nan"), 0, -1, float("inf")):
        with pytest.raises(SdexploreError, match="fps"):
            export.check_fps(bad)
    with pytest.raises(SdexploreError, match="50"):
        export.check_fps(60, gif=True)


def test_missing_ffmpeg_is_one_clear_error(tmp_path, monkeypatch):
    import imageio_ffmpeg

    def no_ffmpeg():
        raise RuntimeError("No ffmpeg exe could be found.")

    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", no_ffmpeg)
    with pytest.raises(SdexploreError, match="imageio-ffmpeg"):
        export.save_mp4(_frames(), tmp_path / "x.mp4")
    assert _listing(tmp_path) == []

"""load_pipeline: device/dtype choice, the embedded default, local folders, and every bad input's message."""

import json
import logging
import warnings

import pytest
import torch

import sdexplore.loading as loading
from sdexplore import (
    DeviceDtypeError,
    ModelNotAvailableError,
    UnsafeCheckpointError,
    UnsupportedPipelineError,
    load_pipeline,
)


@pytest.fixture
def no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_device_order(monkeypatch, no_accelerators):
    assert loading.pick_device("auto").type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert loading.pick_device("auto").type == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert loading.pick_device("auto").type == "cuda"  # cuda wins over mps


def test_auto_dtype_per_device():
    assert loading.pick_dtype("auto", "cpu") == torch.float32
    assert loading.pick_dtype("auto", "cuda") == torch.float16
    assert loading.pick_dtype("auto", "mps") == torch.float16
    assert loading.pick_dtype("bf16", "cpu") == torch.bfloat16
    assert loading.pick_dtype(torch.float16, "cuda") == torch.float16


def test_fp16_on_cpu_is_one_clear_error():
    with pytest.raises(DeviceDtypeError, match="float16 pipelines cannot run on the CPU"):
        load_pipeline(dtype="float16", device="cpu")
    with pytest.raises(DeviceDtypeError, match="Unknown dtype"):
        loading.pick_dtype("float8", "cpu")


def test_explicit_cuda_without_gpu(no_accelerators):
    with pytest.raises(DeviceDtypeError, match="no CUDA GPU"):
        load_pipeline(device="cuda")


def test_default_loads_offline_on_cpu_without_fp16_warning(no_accelerators, caplog):
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe = load_pipeline()
    text = caplog.text + " ".join(str(w.message) for w in caught)
    assert "cannot run with cpu device" not in text
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    if loading.embedded_model_available():
        assert str(loading.EMBEDDED_MODEL_DIR) in str(pipe.config._name_or_path)


def test_local_folder_roundtrip_and_bad_folders(tmp_path, sd1_pipe):
    folder = tmp_path / "tiny"
    sd1_pipe.save_pretrained(folder)
    pipe = load_pipeline(folder, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.unet.dtype == torch.float32
    with pytest.raises(ModelNotAvailableError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path, device="cpu")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"  # a diffusers pipeline of no supported family
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusionXLPipeline"):
        load_pipeline(folder, device="cpu")


def test_missing_path_and_pickles_refused(tmp_path):
    with pytest.raises(ModelNotAvailableError, match="No such file or folder"):
        load_pipeline(tmp_path / "nope" / "model.safetensors", device="cpu")
    for suffix in (".ckpt", ".bin", ".pt"):
        f = tmp_path / f"model{suffix}"
        f.write_bytes(b"not really")
        with pytest.raises(UnsafeCheckpointError, match="allow_pickle=True"):
            load_pipeline(f, device="cpu")


def test_offline_hub_miss_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelNotAvailableError, match="some-org/not-cached-model.*HF_HUB_OFFLINE"):
        load_pipeline("some-org/not-cached-model", device="cpu")


def test_moved_seed_id_resolves_to_mirror_with_a_note(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.warns(loading.ModelIdNote, match="stable-diffusion-v1-5/stable-diffusion-v1-5"):
        with pytest.raises(ModelNotAvailableError, match="stable-diffusion-v1-5/stable-diffusion-v1-5"):
            load_pipeline("runwayml/stable-diffusion-v1-5", device="cpu")


def test_unknown_scheduler_lists_known(sd1_pipe):
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        loading.set_scheduler(sd1_pipe, "FancyScheduler")
    loading.set_scheduler(sd1_pipe, "EulerDiscreteScheduler")
    assert type(sd1_pipe.scheduler).__name__ == "EulerDiscreteScheduler"


def test_loading_leaves_library_progress_bar_settings_as_they_were():
    import diffusers.utils.logging as d_logging
    import transformers.utils.logging as t_logging

    d_logging.enable_progress_bar()
    t_logging.disable_progress_bar()
    try:
        load_pipeline(device="cpu")
        assert d_logging.is_progress_bar_enabled() and not t_logging.is_progress_bar_enabled()
    finally:
        t_logging.enable_progress_bar()

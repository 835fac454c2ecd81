"""The embedded model's pipeline folder: writing it whole, and the flat copy a remote GPU run sends back.

A folder is written beside its destination and moved into place, so a crash never leaves half a model where a
loadable one was.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from ..errors import ModelNotAvailableError
from ..tokenizer import clip_tokenizer
from .architecture import build_scheduler, build_text_encoder, build_vae

#: A pipeline folder's files as a flat folder (a device run sends back plain files at most two folders down).
FLAT_FILES = {
    "unet.safetensors": "unet/diffusion_pytorch_model.safetensors",
    "vae.safetensors": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder.safetensors": "text_encoder/model.safetensors",
    "vae_config.json": "vae/config.json",
    "unet_config.json": "unet/config.json",
    "training.json": "training.json",
    "latent_rgb.json": "latent_rgb.json",
}


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    unet: UNet2DConditionModel,
    extra_files: dict[str, str] | None = None,
) -> StableDiffusionPipeline:
    """Assemble the shipped pipeline from its trained parts and write it to ``out``, replacing what is there,
    with ``extra_files`` (name → text, e.g. ``training.json``) beside the diffusers files."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return write_pipeline_folder(pipe, Path(out), ("tokenizer",), extra_files)


def write_pipeline_folder(
    pipe: Any, out: Path, tokenizers: tuple[str, ...], extra_files: dict[str, str] | None = None
) -> Any:
    """Write ``pipe`` to ``out`` through a temporary folder beside it (replacing what is there only once the new
    folder is complete), with the slow-tokenizer files of ``tokenizers`` and ``extra_files`` (name → text)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for leftover in (tmp, old):  # from a run that crashed mid-write
        if leftover.exists():
            shutil.rmtree(leftover)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for sub in tokenizers:
        write_slow_tokenizer_files(tmp / sub)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return pipe


def write_slow_tokenizer_files(folder: Path) -> None:
    """Add vocab.json and merges.txt beside tokenizer.json: transformers 4 builds its slow ``CLIPTokenizer``
    from them (transformers 5 saves only tokenizer.json)."""
    from ..tokenizer import _vocab_and_merges

    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def flatten(out: Path, flat: Path) -> None:
    """Copy the exported pipeline folder ``out``'s weights and records into the flat folder ``flat``
    (``--flat-out``, e.g. a device run's ``$OUT``); :func:`assemble` rebuilds the folder from them."""
    flat.mkdir(parents=True, exist_ok=True)
    for name, rel in FLAT_FILES.items():
        tmp = flat / f".{name}.tmp"
        shutil.copy(out / rel, tmp)
        os.replace(tmp, flat / name)


def assemble(flat: Path, out: Path) -> StableDiffusionPipeline:
    """Build the pipeline folder ``out`` from a flat copy of a GPU run's files (what a device run can send back:
    unet/vae/text_encoder ``.safetensors``, the VAE's and UNet's ``config.json``, ``training.json``,
    ``latent_rgb.json``; see :data:`FLAT_FILES`)."""
    from safetensors.torch import load_file

    flat = Path(flat)
    missing = [name for name in FLAT_FILES if not (flat / name).is_file()]
    if missing:  # flat copies from before 2026-11-26 lack unet_config.json (and hold a three-level UNet)
        raise ModelNotAvailableError(
            f"{flat} lacks {', '.join(missing)}: copy the files --flat-out wrote ({', '.join(FLAT_FILES)}) there "
            "(unet_config.json is the UNet's config.json of the run that wrote the weights)"
        )
    unet = UNet2DConditionModel.from_config(json.loads((flat / "unet_config.json").read_text()))
    vae, text_encoder = build_vae(), build_text_encoder()
    vae.load_state_dict(load_file(flat / "vae.safetensors"))
    unet.load_state_dict(load_file(flat / "unet.safetensors"))
    text_encoder.load_state_dict(load_file(flat / "text_encoder.safetensors"))
    vae.register_to_config(
        scaling_factor=json.loads((flat / "vae_config.json").read_text())["scaling_factor"]
    )
    records = {
        name: (flat / name).read_text(encoding="utf-8") for name in ("training.json", "latent_rgb.json")
    }
    return save_pipeline(out, vae, text_encoder, unet, extra_files=records)

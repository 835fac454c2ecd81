"""benchmarks/bench_scale.py: the real-shaped pipelines have the published shapes (on the meta device, nothing
built), the peak-memory meter sees an allocation, the growth-law extrapolations, and the row code path on the tiny
fixtures (``--dry``), in process and through the one-subprocess-per-row driver."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the benchmark modules import each other by bare name

import _shaped  # noqa: E402
import bench_scale  # noqa: E402

# parameters of each published denoiser (config.json of the checkpoint; Flux.1-dev: 19 + 38 blocks)
PUBLISHED = {"sd15": 859_520_964, "sdxl": 2_567_463_684, "sd35m": 2_243_171_520, "flux1": 11_901_408_320}


@pytest.mark.parametrize("model", _shaped.MODELS)
def test_denoisers_have_the_published_parameter_counts(model):
    assert sum(p.numel() for p in _shaped.meta_denoiser(model).parameters()) == PUBLISHED[model]


def test_denoisers_have_the_published_structure():
    sdxl = _shaped.meta_denoiser("sdxl")
    cross = [n for n in sdxl.attn_processors if n.endswith("attn2.processor")]
    assert len(cross) == 70  # 2×2 + 2×10 down, 10 mid, 3×10 + 3×2 up
    assert {sdxl.get_submodule(n.removesuffix(".processor")).heads for n in cross} == {10, 20}
    sd35 = _shaped.meta_denoiser("sd35m")
    assert len(sd35.transformer_blocks) == 24
    assert sum(b.attn2 is not None for b in sd35.transformer_blocks) == 13  # dual attention in layers 0..12
    assert sd35.transformer_blocks[0].attn.heads == 24 and sd35.pos_embed.pos_embed_max_size == 384
    flux = _shaped.meta_denoiser("flux1")
    assert (len(flux.transformer_blocks), len(flux.single_transformer_blocks)) == (19, 38)
    assert flux.transformer_blocks[0].attn.heads == 24 and flux.inner_dim == 3072
    reduced = _shaped.meta_denoiser("flux1", (2, 4))
    assert (len(reduced.transformer_blocks), len(reduced.single_transformer_blocks)) == (2, 4)
    # the reduced Flux is the real one's blocks, fewer of them: the published count less 17 + 34 blocks
    double, single = (
        sum(p.numel() for p in blocks[0].parameters())
        for blocks in (flux.transformer_blocks, flux.single_transformer_blocks)
    )
    assert sum(p.numel() for p in reduced.parameters()) == PUBLISHED["flux1"] - 17 * double - 34 * single


@pytest.mark.parametrize(
    "model, embeds",
    [
        ("sdxl", [(1, 77, 2048), (1, 77, 2048), (1, 1280), (1, 1280)]),  # CLIP-L ‖ bigG, bigG pooled
        ("sd35m", [(1, 333, 4096), (1, 333, 4096), (1, 2048), (1, 2048)]),  # 77 CLIP + 256 T5 tokens
        ("flux1", [(1, 512, 4096), (1, 768), (512, 3)]),  # 512 T5 tokens, CLIP-L pooled, text ids
    ],
)
def test_pipelines_on_the_meta_device_encode_prompts_of_the_real_shapes(model, embeds):
    shaped = _shaped.build(model, device="meta")
    pipe = shaped.pipe
    assert shaped.denoiser_params == (
        sum(p.numel() for p in _shaped.meta_denoiser("flux1", _shaped.FLUX_BLOCKS).parameters())
        if model == "flux1"
        else PUBLISHED[model]
    )
    assert pipe.vae_scale_factor == 8 and getattr(pipe, shaped.denoiser).dtype == torch.bfloat16
    # the schedule is built on the host in float32, outside the modules' dtype and device
    assert pipe.scheduler.sigmas.dtype == torch.float32 and pipe.scheduler.sigmas.device.type == "cpu"
    kw = {"prompt_2": None, **({"prompt_3": None} if model == "sd35m" else {})}
    if model != "flux1":
        kw["do_classifier_free_guidance"] = True
    out = pipe.encode_prompt("a red circle", device=torch.device("meta"), **kw)
    assert [tuple(t.shape) for t in out] == embeds


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="Unknown model"):
        _shaped.build("sd2")


@pytest.mark.skipif(not bench_scale.peak_memory_supported(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_sees_a_transient_allocation_and_starts_each_window_afresh():
    meter = bench_scale.PeakMemory()
    meter.start()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del x
    peak = meter.stop()["peak"]
    assert 60 * 2**20 < peak < 200 * 2**20  # freed before the window closed, still seen
    meter.start()
    small = meter.stop()["peak"]
    assert small < 16 * 2**20  # the last window's peak does not carry over


def _fake_row(steps: int) -> dict:
    mib = bench_scale.MIB
    return {
        "steps": steps,
        "extra_mib": {v: {"median": m} for v, m in (("steps", 1.0), ("attention", 10.0), ("both", 11.0))},
        "ratio": {"attention": {"median": 1.5}},
        "plain_s_per_step": {"median": 2.0},
        "stored": {
            "steps": {"trace_bytes": 3 * mib, "trace_final_bytes": mib},
            "attention": {
                "attention_bytes": 8 * mib,
                "attention_step_bytes": 2 * mib,
                "attention_layer_bytes": [mib] * 6,
                "layers": 6,
            },
            "both": {"trace_bytes": 3 * mib, "trace_final_bytes": mib, "attention_step_bytes": 2 * mib},
        },
    }


def test_extrapolation_to_50_steps_grows_only_the_per_step_parts():
    mib = bench_scale.MIB
    r = _fake_row(steps=2)
    at = bench_scale._at_steps(r, 50)
    assert at["trace_bytes"] == mib + 2 * mib * 25  # final latents once, the steps' records 25 times
    assert at["attention_bytes"] == 6 * mib + 2 * mib * 25  # layers and aggregate once
    assert at["steps_extra_mib"] == 1.0 + 2 * 24
    assert at["attention_extra_mib"] == 10.0 + 2 * 24
    assert at["both_extra_mib"] == 11.0 + 4 * 24
    assert bench_scale._at_steps(r, 2)["steps_extra_mib"] == 1.0  # no extrapolation at the measured steps


def test_extrapolation_to_flux_depth_is_linear_in_layers():
    mib = bench_scale.MIB
    r = _fake_row(steps=2)
    r["at50"] = bench_scale._at_steps(r, 50)
    full = bench_scale._at_depth(r, (2, 4), (19, 38))
    assert full["layers"] == 57 and full["attention_layer_bytes"] == mib
    assert full["attention_bytes"] == 8 * mib + 51 * mib
    assert full["attention_extra_mib"] == 10.0 + 51
    assert full["attention_ms_per_layer_step"] == pytest.approx(1000 * 0.5 * 2.0 / 6)


@pytest.mark.parametrize("row", ["sd15-256", "sdxl-512", "sd35m-512", "flux1-512"])
def test_row_code_path_on_the_tiny_fixtures(row):
    r = bench_scale.run_row(row, steps=2, pairs=2, dry=True, log=None)
    assert r["dry"] and r["size"] == 64 and r["pairs"] == 2 and r["orders"] == ["AB", "BA"]
    for name, _ in bench_scale.VARIANTS:
        ratio = r["ratio"][name]
        assert ratio["n"] == 2 and 0 < ratio["lo"] <= ratio["median"] <= ratio["hi"]
        assert r["extra_mib"][name]["n"] == 2
    st = r["stored"]
    assert (
        st["steps"]["trace_records"] == 2
        and st["steps"]["trace_bytes"] > st["steps"]["trace_final_bytes"] > 0
    )
    assert "attention_bytes" not in st["steps"] and "trace_bytes" not in st["attention"]
    a = st["attention"]
    assert a["attention_bytes"] > sum(a["attention_layer_bytes"]) > 0 and a["calls"] == 2
    assert st["both"]["attention_bytes"] == a["attention_bytes"]  # the same maps with the steps recorder on
    # the text keys are the family's: CLIP's 77; SD3: 77 + 256 T5 tokens; Flux: T5's 512
    assert r["text_keys"] == {"sd15": 77, "sdxl": 77, "sd35m": 333, "flux1": 512}[r["model"]]
    assert r["at50"]["trace_bytes"] > st["steps"]["trace_bytes"]
    assert "full_depth" not in r  # dry rows are not extrapolated to Flux's depth
    assert "not measured" not in bench_scale.format_rows([r])


def test_quick_dry_run_through_the_row_subprocess(tmp_path, capsys):
    out = tmp_path / "scale.json"
    assert bench_scale.main(["--dry", "--quick", "--steps", "2", "--pairs", "1", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["row"] for r in got["rows"]] == [bench_scale.QUICK_ROW]
    r = got["rows"][0]
    assert r["dry"] and r["pairs"] == 1 and r["orders"] == ["AB"] and r["stored"]["attention"]["layers"] == 4
    assert "sd15-256: UNet2DConditionModel" in capsys.readouterr().out


def test_until_in_the_past_starts_no_row(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench_scale, "_deadline", lambda until: 0.0)
    monkeypatch.setattr(bench_scale, "_run_child", lambda *a: calls.append(a))
    out = tmp_path / "scale.json"
    assert (
        bench_scale.main(["--dry", "--rows", "sd15-256", "sdxl-512", "--until", "00:00", "--json", str(out)])
        == 1
    )
    assert calls == []
    rows = json.loads(out.read_text())["rows"]
    assert [r["error"] for r in rows] == ["not started: the time limit (--until / --budget) was reached"] * 2
    assert (
        rows[1]["command"]
        == "nice -n 10 python benchmarks/bench_scale.py --rows sdxl-512 --json sdxl-512.json"
    )


def test_a_row_starts_no_pair_past_its_stop_time_but_keeps_ab_and_ba_balanced():
    r = bench_scale.run_row("sd15-256", steps=1, pairs=6, dry=True, stop_at=time.time(), log=None)
    assert r["orders"] == ["AB", "BA"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be ≥ 1"),
        (["--pairs", "0"], "--pairs must be ≥ 1"),
        (["--threads", "0"], "--threads must be ≥ 1"),
        (["--flux-blocks", "0", "4"], "at least one block"),
        (["--gpu", "--dry"], "drop --gpu"),
        (["--until", "25:99"], "HH:MM"),
        (["--rows", "sd2-512"], "invalid choice"),
    ],
)
def test_bad_flags_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit):
        bench_scale.main(argv)
    assert message in capsys.readouterr().err

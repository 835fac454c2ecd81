"""The benchmark instruments: paired ABBA statistics, the host-read counter, and the GPU set's code path on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from sdexplore.fixtures import tiny_pipeline

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the benchmark modules import each other by bare name, as run.py does

import _paired  # noqa: E402
import bench_overhead  # noqa: E402


def _run_module():
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCH / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- statistics ---------------------------------------------------------------------------------------------------


def test_median_interval_is_the_sign_test_interval():
    s = _paired.median_interval([float(x) for x in range(20, 0, -1)])  # 20..1, unsorted on purpose
    assert s.median == 10.5
    # ranks 6 and 15 of 20: P(6 ≤ Binomial(20, ½) ≤ 14) = 1 − 2 · P(K ≤ 5)
    assert (s.lo, s.hi) == (6.0, 15.0)
    assert s.coverage == pytest.approx(1 - 2 * sum(math.comb(20, k) for k in range(6)) / 2**20)
    assert s.coverage >= 0.95 and s.n == 20
    # one rank narrower would fall under 95%
    assert 1 - 2 * sum(math.comb(20, k) for k in range(7)) / 2**20 < 0.95


def test_median_interval_small_samples_and_bad_input():
    few = _paired.median_interval([3.0, 1.0, 2.0, 5.0, 4.0])
    assert (few.median, few.lo, few.hi) == (3.0, 1.0, 5.0)
    assert few.coverage == pytest.approx(1 - 2 / 32)  # below 95%: reported, not hidden
    assert _paired.median_interval([2.0, 4.0]).scaled(10).median == 30.0
    with pytest.raises(ValueError, match="at least one"):
        _paired.median_interval([])


def test_run_pairs_alternates_abba_and_visits_variants_round_robin():
    log: list[str] = []

    def make(name: str):
        def call() -> dict[str, float]:
            log.append(name)
            return {"time": float(len(log))}

        return call

    series = _paired.run_pairs(make("p"), {"x": make("x"), "y": make("y")}, pairs=4, warmup=1)
    assert log[:3] == ["p", "x", "y"]  # the warm-up
    assert "".join(log[3:]) == "pxpy" + "xpyp" + "pxpy" + "xpyp"
    assert series["x"].orders == ["AB", "BA", "AB", "BA"]
    # the differences pair each variant call with its own plain call
    assert series["x"].differences() == [1.0, -1.0, 1.0, -1.0]


def test_run_pairs_stops_only_after_a_balanced_number_of_pairs():
    calls = {"n": 0}

    def one() -> dict[str, float]:
        calls["n"] += 1
        return {"time": 1.0}

    series = _paired.run_pairs(one, {"v": one}, pairs=50, warmup=0, keep_going=lambda s: False, min_pairs=3)
    assert len(series["v"].orders) == 4  # min 3, rounded up to an even count (AB and BA equally often)


# ---- host reads ---------------------------------------------------------------------------------------------------


def test_host_read_counter_counts_each_kind_of_read_and_nothing_else():
    t = torch.tensor([1.5])
    counter = bench_overhead.HostReadCounter()
    with counter:
        t.item()  # not active yet: not counted
        counter.active = True
        t.item(), t.cpu(), t.tolist(), t.numpy(), float(t), bool(t), int(t), t.to("cpu")
        [0, 1, 2][torch.tensor(1)]
        f"{t[0]:.1f}"
        # not reads: device-following copies, non-blocking copies, arithmetic
        t.to(device=t.device), t.to("cpu", non_blocking=True), t * 2
        counter.active = False
    kinds = sorted(site.split(" ")[0] for site in counter.sites)
    assert kinds == sorted(
        [
            "item",
            "cpu",
            "tolist",
            "numpy",
            "__float__",
            "__bool__",
            "__int__",
            "to",
            "__index__",
            "__format__",
        ]
    )
    assert counter.count == 10 and counter.device_count == 0  # every tensor here lives on the CPU
    assert all("test_benchmarks.py" in site for site in counter.sites)


def test_count_host_reads_counts_from_the_second_step_on():
    pipe = tiny_pipeline("sd1")
    steps = 4

    def read_each_step(module, args, output):  # a recorder that would make the GPU wait every step
        (output[0] if isinstance(output, tuple) else output.sample).mean().item()

    handle = pipe.unet.register_forward_hook(read_each_step)
    try:
        got = bench_overhead.count_host_reads(pipe, bench_overhead._pipe_call(pipe, steps, 64), steps)
    finally:
        handle.remove()
    ours = {k: v for k, v in got["sites"].items() if "(read_each_step)" in k}
    assert list(ours.values()) == [steps - 1]  # steps 1..3 of 0..3: the first step's reads are set-up
    assert next(iter(ours)).startswith("item [cpu]: ") and "test_benchmarks.py:" in next(iter(ours))
    assert got["per_step"] == got["count"] / (steps - 1) and got["device_count"] == 0


# ---- run.py -------------------------------------------------------------------------------------------------------


def test_gpu_set_dry_run_on_the_cpu(tmp_path, capsys):
    """`run.py --gpu --dry`: the GPU set's whole code path, 2 ABBA pairs on the tiny fixture, host clock."""
    out = tmp_path / "gpu.json"
    assert _run_module().main(["--gpu", "--dry", "--steps", "3", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["gpu"]
    assert r["dry"] is True and r["pairs"] == 2 and r["orders"] == ["AB", "BA"] and r["steps"] == 3
    for name in ("steps", "attention", "both"):
        ratio = r["ratio"][name]
        assert ratio["n"] == 2 and ratio["lo"] <= ratio["median"] <= ratio["hi"]
        assert 0 < ratio["median"] < 100
        reads = r["host_reads"][name]
        assert reads["steps_counted"] == 2 and reads["device_per_step"] == 0  # no accelerator here
    assert r["extra_mib"] is None  # no CUDA: peak memory is not measured, and says so
    printed = capsys.readouterr().out
    assert "target ≤ 1.02" in printed and "peak memory extra: not measured" in printed


def test_loop_clock_times_the_denoising_loop_only(monkeypatch):
    pipe = tiny_pipeline("sd1")
    call = bench_overhead._pipe_call(pipe, 2, 64)
    encode = pipe.encode_prompt

    def slow_encode(*args, **kwargs):  # text encoding sits before the loop: outside the window
        time.sleep(0.3)
        return encode(*args, **kwargs)

    def slow_exit(pipe, call, options):  # a recorder's end-of-call work, after the pipeline returns
        def run():
            out = call()
            time.sleep(0.3)
            return out

        return run

    pipe.encode_prompt = slow_encode
    monkeypatch.setattr(bench_overhead, "_observed", slow_exit)
    got = bench_overhead._LoopClock(pipe, call, cuda=False, options={"steps": True})()
    assert set(got) == {"time", "wall", "peak_mib"}
    assert math.isfinite(got["time"]) and got["time"] > 0  # the loop itself was timed
    assert math.isnan(got["peak_mib"])  # no CUDA: no peak memory
    # both 0.3 s sleeps fall outside the loop's window (a bound on the sleeps, never on how fast the loop ran)
    assert got["wall"] - got["time"] >= 0.6


def test_run_refuses_bad_flag_combinations(capsys):
    run = _run_module()
    for argv in (["--dry"], ["--gpu", "--dry", "--only", "walks"], ["--only", "nonsense"], ["--pairs", "0"]):
        with pytest.raises(SystemExit) as e:
            run.main(argv)
        assert e.value.code == 2, argv
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            run.main(["--gpu"])
        assert "--dry" in capsys.readouterr().err  # says how to check the GPU set without a GPU

"""The fixed costs of an observed call (issue 31's ≤ 1.15× on the tiny fixtures): what each call must not redo.

No timing here: each test asserts that a piece of per-call work is gone (a signature read again, a slower kernel)
while the values it gives are unchanged.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

import sdexplore as sdx
from sdexplore.families import signature_of
from sdexplore.fixtures import fixture_call_defaults, tiny_pipeline
from sdexplore.heatmaps import resize
from sdexplore.record.attention import _upsized
from sdexplore.record.joint import joint_attention_layers


class _Pipe:
    def __call__(self, prompt: str, max_sequence_length: int = 77, *, flag: bool = False) -> None: ...


def test_signature_of_equals_inspect_and_is_worked_out_once() -> None:
    pipe = _Pipe()
    for fn in (_Pipe.__call__, pipe.__call__):
        assert signature_of(fn) == inspect.signature(fn)
        assert signature_of(fn) is signature_of(fn)  # remembered, keyed on the function
    assert signature_of(_Pipe().__call__) is signature_of(pipe.__call__)  # never on the instance
    assert "self" not in signature_of(pipe.__call__).parameters


def _count_signatures(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Callers (file names) of inspect.signature made from sdexplore's modules from now on."""
    seen: list[str] = []
    real = inspect.signature

    def counting(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if "sdexplore" in caller and not caller.endswith("families.py"):
            seen.append(caller)
        elif caller.endswith("families.py") and sys._getframe(1).f_code.co_name != "_signature":
            seen.append(caller)
        return real(*args, **kwargs)

    monkeypatch.setattr(inspect, "signature", counting)
    return seen


@pytest.mark.parametrize("name", ["qwen-image", "pixart-sigma"])
def test_a_second_observed_call_reads_no_signature(name, monkeypatch) -> None:
    pipe = tiny_pipeline(name)
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
    kw.update(fixture_call_defaults(name))

    def observed():
        with sdx.observe(pipe, steps=True, attention=True) as obs, torch.no_grad():
            pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kw)
        return obs.attention

    observed()  # the first call works out the pipeline's signatures
    seen = _count_signatures(monkeypatch)
    maps = observed()
    assert seen == []
    assert maps.token_lists[0].positions("circle", None)  # still labelled from the call's prompt


def test_joint_layers_are_found_by_the_class_first() -> None:
    """The scan asks each module's class for set_processor before anything slower: the same layers as asking
    each module itself."""
    den = tiny_pipeline("qwen-image").transformer
    want = [
        (f"{n}.processor", "qwen")
        for n, m in den.named_modules()
        if hasattr(m, "set_processor") and hasattr(m, "to_q") and getattr(m, "add_k_proj", None) is not None
    ]
    assert joint_attention_layers(den) == want and want


@pytest.mark.parametrize(
    ("shape", "size"),
    [((2, 5, 4, 4), (8, 8)), ((3, 4, 6), (7, 13)), ((2, 8, 8), (8, 8)), ((2, 8, 8), (4, 4))],
)
def test_upsized_maps_equal_the_antialiased_resize(shape, size) -> None:
    maps = torch.rand(shape)
    got = _upsized(maps, size)
    want = resize(maps, size)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if size[0] < shape[-2]:  # shrinking: the very same antialiased kernel
        assert torch.equal(got, want)


@pytest.mark.parametrize("float_mask", [False, True])
def test_masked_kernel_gives_sdpa_output_and_the_kept_keys_log_sum_exp(float_mask) -> None:
    """With a mask, the CPU flash kernel's own log-sum-exp replaces a second explicit pass over the keys; its
    output is SDPA's bit for bit (the image stays the plain call's)."""
    from sdexplore.record.joint import sdpa_with_lse

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 16) for _ in range(3))
    keep = torch.ones(2, 1, 1, 37, dtype=torch.bool)
    keep[0, ..., 3:9] = False
    mask = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf")) if float_mask else keep
    out, lse = sdpa_with_lse(q, k, v, True, mask)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert lse is not None and lse.shape == (2, 4, 37)
    scores = (q @ k.transpose(-1, -2)) * 16**-0.5
    want = scores.masked_fill(~keep, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, want, rtol=0, atol=1e-5)
    _, none = sdpa_with_lse(q, k, v, False, mask)  # no log-sum-exp asked: SDPA alone
    assert none is None


def test_a_packed_family_without_cfg_unpacks_its_prediction_once() -> None:
    """Qwen-Image without true CFG steps with the denoiser's raw output: the step's prediction and the raw output
    are one unpacked tensor, not two copies."""
    from sdexplore.record.attach import Subscriber, attach

    pipe = tiny_pipeline("qwen-image")
    seen = []
    sub = Subscriber(
        kind="listener", step=lambda step: seen.append(step.run.denoiser_out is step.model_output)
    )
    kw = dict(num_inference_steps=2, height=64, width=64, output_type="latent")
    with attach(pipe, sub), torch.no_grad():
        pipe(prompt="a red circle", generator=torch.Generator().manual_seed(0), **kw)
    assert seen == [True, True]


def test_the_memory_check_reads_free_memory_about_once_a_second(monkeypatch) -> None:
    """Each call's plan is checked against the host's free memory; a reading under a second old that leaves
    twice the room is trusted (no /proc read per call), and a plan close to it reads afresh and is refused."""
    from sdexplore.errors import MemoryBudgetError
    from sdexplore.record import attention, budget

    monkeypatch.delenv("SDEXPLORE_AVAILABLE_BYTES", raising=False)
    monkeypatch.setattr(attention, "_FREE_CPU", [-float("inf"), 0.0])
    free = [10 << 20]
    reads = []

    def available(device):
        reads.append(device)
        return free[0]

    monkeypatch.setattr(budget, "available_bytes", available)
    small = budget.Plan(["a"], [], None, None, 1 << 10, {"a": 1 << 10}, 0)
    cpu = torch.device("cpu")
    for _ in range(3):
        attention._check_fits(small, cpu, None)
    assert len(reads) == 2  # the first check reads once for the cache, once in budget.check_fits
    free[0] = 1 << 10  # memory ran out meanwhile: a plan near the cached reading reads afresh
    large = budget.Plan(["a"], [], None, None, 3 << 20, {"a": 3 << 20}, 0)
    with pytest.raises(MemoryBudgetError):
        attention._check_fits(large, cpu, None)


def test_the_layers_mean_is_resized_a_few_layers_at_a_time(monkeypatch) -> None:
    """Building the maps resizes a run of layers at a time (at most RESIZE_BYTES of resized maps), never every layer
    at the latent size at once: SD3.5-medium at 1024² would hold 24 × 333 × 128² floats twice (about 1 GiB). The
    mean is the same as resizing each layer alone."""
    from sdexplore.record import attention

    torch.manual_seed(0)
    maps = [torch.rand(1, 7, 4, 4) for _ in range(5)] + [torch.rand(1, 7, 2, 2) for _ in range(3)]
    one = 4 * 7 * 8 * 8  # bytes of one resized map (float32)
    monkeypatch.setattr(attention, "RESIZE_BYTES", 2 * one)
    held = []
    real = attention._upsized
    monkeypatch.setattr(attention, "_upsized", lambda m, s: held.append(m.shape[0] * one) or real(m, s))
    got = attention._resized_mean(maps, (8, 8))
    assert max(held) <= 2 * one and len(held) == 5  # 2 + 2 + 1 of the first grid, 2 + 1 of the second
    want = torch.stack([resize(m, (8, 8)) for m in maps]).mean(0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("negative", [False, True])
def test_built_maps_are_each_their_own_tensor(negative) -> None:
    """Without a second copy of every map at the end of a call, the result's tensors still share no storage with
    each other or with the recorder (a later run or an edit of one never changes another)."""
    pipe = tiny_pipeline("sd1")
    opts = {"per_head": True, "negative": negative}
    with sdx.observe(pipe, steps=False, attention=opts) as obs, torch.no_grad():
        pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="latent")
    maps = obs.attention
    parts = [maps] + ([maps.negative] if negative else [])
    tensors = [t for m in parts for t in (m.aggregate, m.steps, *m.layers.values(), *m.layer_heads.values())]
    ptrs = [t.untyped_storage().data_ptr() for t in tensors]
    assert len(set(ptrs)) == len(ptrs)

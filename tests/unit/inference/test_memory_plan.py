"""Memory plan of a case, streamed prediction under a RAM budget, and the GPU out-of-memory fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg import faults
from medseg.errors import MedsegError
from medseg.inference import EnsembleMember, Predictor
from medseg.inference.memory_plan import PROCESS_BYTES, WindowJob, budget_bytes, plan_case_memory
from medseg.inference.scratch import ScratchSpace, release_pages
from medseg.inference.sliding_window import fallback_steps, predict_sliding_window
from medseg.io.image import ImageGeometry
from tests.unit.inference.conftest import build_plan, conv_net

MB = 2**20


def _job(shape=(20, 30, 40), members=1, padded=False) -> WindowJob:
    return WindowJob("3d_fullres", shape, 1, members, (8, 16, 16), 2, 4, padded=padded)


def test_plan_counts_each_stage_from_the_shapes():
    shape, k = (20, 30, 40), 3
    v = 20 * 30 * 40
    plan = plan_case_memory((40, 30, 40), 1, k, [_job(shape)], budget_bytes=None)
    big_v = 40 * 30 * 40
    assert plan.stages["read"] == PROCESS_BYTES + 2 * big_v * 4
    assert plan.stages["preprocess"] == PROCESS_BYTES + big_v * 4 + 2 * v * 4
    forward = 2 * 8 * 16 * 16 * 4 * (2 * k + 8 * 4)
    # input, weights, forward pass, float32 accumulator, softmax's two float32 temporaries
    assert plan.stages["network"] == PROCESS_BYTES + v * 4 + v * 4 + forward + k * v * 4 + 2 * v * 4
    assert plan.stages["revert"] == PROCESS_BYTES + k * v * 4 + 4 * big_v * 4 + big_v + v * 4
    assert plan.stages["export"] == PROCESS_BYTES + 3 * big_v
    assert plan.accumulator == "float32" and not plan.stream and plan.fits
    # a second member adds the running sum; padding another accumulator
    two = plan_case_memory((40, 30, 40), 1, k, [_job(shape, members=2)], budget_bytes=None)
    assert two.stages["network"] - plan.stages["network"] == k * v * 4
    padded = plan_case_memory((40, 30, 40), 1, k, [_job(shape, padded=True)], budget_bytes=None)
    assert padded.stages["network"] > plan.stages["network"] + k * v * 4


def test_mirror_tta_adds_its_tile_buffers_streamed_or_not():
    shape, k, patch = (20, 30, 40), 3, 8 * 16 * 16
    plain = WindowJob("3d_fullres", shape, 1, 1, (8, 16, 16), 2, 4)
    for flips, batch, tiles in [(8, 2, 3), (2, 4, 4), (4, 9, 5)]:
        job = WindowJob("3d_fullres", shape, 1, 1, (8, 16, 16), batch, 4, flips=flips)
        base = WindowJob("3d_fullres", shape, 1, 1, (8, 16, 16), batch, 4)
        with_tta = plan_case_memory((40, 30, 40), 1, k, [job], budget_bytes=1)
        without = plan_case_memory((40, 30, 40), 1, k, [base], budget_bytes=1)
        extra = tiles * k * patch * 4  # ceil(batch / flips) + 1 tile sums and one flipped output, float32
        assert with_tta.stages["network"] - without.stages["network"] == extra
        assert with_tta.streamed_stages["network"] - without.streamed_stages["network"] == extra
    assert (
        plan_case_memory((40, 30, 40), 1, k, [plain], None).stages
        == plan_case_memory(
            (40, 30, 40), 1, k, [WindowJob("3d_fullres", shape, 1, 1, (8, 16, 16), 2, 4, flips=1)], None
        ).stages
    )


def test_plan_streams_over_budget_and_keeps_the_streamed_peak_smaller():
    k, shape = 118, (200, 136, 136)  # float32 would be 1.7 GB: a float16 accumulator
    plan = plan_case_memory((200, 256, 256), 1, k, [_job(shape)], budget_bytes=None)
    assert plan.accumulator == "float16"
    budget = plan.peak_bytes - 1
    streamed = plan_case_memory((200, 256, 256), 1, k, [_job(shape)], budget_bytes=budget)
    assert streamed.stream and streamed.fits
    assert streamed.streamed_peak_bytes < plan.peak_bytes
    assert streamed.streamed_peak_bytes <= budget
    record = streamed.to_dict()
    assert record["streamed"] is True and record["budget_gb"] == round(budget / 1e9, 3)
    # probabilities written to disk are full-grid float32 whatever the budget: not streamable
    saved = plan_case_memory((200, 256, 256), 1, k, [_job(shape)], budget_bytes=budget, save_probabilities=True)
    assert saved.stream and not saved.fits


def test_budget_of_the_option():
    assert budget_bytes(None) is None
    assert budget_bytes(4) == 4_000_000_000
    auto = budget_bytes("auto")
    assert auto is None or auto > 0
    with pytest.raises(MedsegError):
        budget_bytes(-1)


def test_scratch_buffers_start_at_zero_and_give_pages_back(tmp_path: Path):
    scratch = ScratchSpace(tmp_path, window_bytes=MB)
    t = scratch.zeros((3, 64, 64, 64), torch.float16)
    assert t.dtype == torch.float16 and float(t.abs().sum()) == 0.0
    t[1] += 2.0
    scratch.touched(2 * MB)  # over the window: released, the values stay
    release_pages(t)
    assert float(t[1].float().mean()) == 2.0 and float(t[0].float().abs().sum()) == 0.0
    assert list(tmp_path.iterdir()) == []  # the files are unlinked: nothing is left beside the output


def _resident_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_released_scratch_pages_leave_the_resident_set(tmp_path: Path):
    scratch = ScratchSpace(tmp_path, window_bytes=2**40)  # released only when asked
    t = scratch.zeros((64, 2**18), torch.float32)  # 64 MiB
    before = _resident_file_bytes()
    t += 1.0
    assert _resident_file_bytes() - before > 48 * MB
    scratch.release()
    assert _resident_file_bytes() - before < 16 * MB
    t[3] += 1.0
    release_pages(t.numpy()[3])  # through an array view of the buffer
    assert _resident_file_bytes() - before < 16 * MB
    assert float(t[3, :5].sum()) == 10.0 and float(t[5, :5].sum()) == 5.0


def _many_class_predictor(max_ram_gb, members=1, tta=False) -> Predictor:
    plan = build_plan(
        label_ids=tuple(range(6)), spacings={"3d_fullres": (2.0, 1.0, 1.0)}, median_spacing=(3.0, 1.0, 1.0)
    )
    return Predictor(
        [EnsembleMember(conv_net(classes=6, seed=s), plan, "3d_fullres", "unet") for s in range(members)],
        use_tta=tta,
        max_ram_gb=max_ram_gb,
    )


@pytest.mark.parametrize("members", [1, 2])
def test_streamed_prediction_equals_the_unconstrained_one(members, tmp_path: Path, monkeypatch):
    monkeypatch.setattr("medseg.inference.memory_plan.MIN_WINDOW_BYTES", 4096)  # pages given back often
    monkeypatch.setattr("medseg.inference.scratch.SLAB_BYTES", 6 * 30 * 20 * 4 * 3)  # 3 slices per slab
    rng = np.random.default_rng(0)
    image = rng.normal(0, 1, (1, 10, 30, 20)).astype(np.float32)
    geometry = ImageGeometry((10, 30, 20), (3.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    free = _many_class_predictor(None, members)
    tight = _many_class_predictor(1e-3, members)  # 1 MB: every case streams
    tight.scratch_dir = tmp_path
    prepared = tight.preprocess(image, geometry, "c")
    assert tight.memory_plan(prepared).stream and not free.memory_plan(prepared).stream
    assert tight.memory_plan(prepared).window_bytes == 4096
    streamed = tight._infer(prepared)
    reference = free._infer(free.preprocess(image, geometry, "c"))
    np.testing.assert_array_equal(np.asarray(streamed[0][0]), reference[0][0])
    np.testing.assert_array_equal(tight._combine_labels(streamed), free._combine_labels(reference))
    assert tight.predict_labels(image, geometry).tolist() == free.predict_labels(image, geometry).tolist()


def test_streamed_float16_softmax_equals_the_whole_buffer(tmp_path: Path, monkeypatch):
    """Large outputs accumulate in float16 (softmax computed a few classes at a time): on the scratch space,
    with shift TTA's padded accumulators, the same probabilities as in memory."""
    monkeypatch.setattr("medseg.inference.sliding_window.HALF_ACCUMULATOR_BYTES", 1)
    data = torch.from_numpy(np.random.default_rng(1).normal(0, 1, (1, 14, 20, 20)).astype(np.float32))
    model = conv_net(classes=7, seed=3)
    kwargs = dict(mirror_axes=(2,), shifts=[(-1, 0, 2), (1, 0, -2)], batch_size=4)
    whole = predict_sliding_window(model, data, (8, 16, 16), 7, **kwargs)
    monkeypatch.setattr("medseg.inference.scratch.SLAB_BYTES", 20 * 20 * 7 * 2 * 3)  # 3 slices per slab
    scratch = ScratchSpace(tmp_path, window_bytes=20 * 20 * 7 * 2 * 3)
    slabs = predict_sliding_window(model, data, (8, 16, 16), 7, scratch=scratch, **kwargs)
    assert whole.dtype == slabs.dtype == torch.float16
    assert torch.equal(whole, slabs)


def test_fallback_steps_per_device():
    cuda = fallback_steps(2, "cuda")
    assert [s.name for s in cuda] == ["as_asked", "batch_1", "cpu_accumulation", "cpu"]
    assert cuda[2].device.type == "cuda" and cuda[2].accumulate_on.type == "cpu"
    assert cuda[3].device.type == cuda[3].accumulate_on.type == "cpu"
    assert [s.name for s in fallback_steps(2, "cpu")] == ["as_asked", "batch_1"]
    assert [s.name for s in fallback_steps(1, "cpu")] == ["as_asked"]


def test_out_of_memory_falls_back_with_one_warning(caplog):
    data = torch.from_numpy(np.random.default_rng(2).normal(0, 1, (1, 12, 20, 20)).astype(np.float32))
    model = conv_net(classes=3, seed=1)
    reference = predict_sliding_window(model, data, (8, 16, 16), 3, batch_size=4)
    faults.arm("window_batch:as_asked@2=oom")  # the second batch of the first way runs out of memory
    try:
        with caplog.at_level(logging.WARNING, logger="medseg.inference.sliding_window"):
            out = predict_sliding_window(model, data, (8, 16, 16), 3, batch_size=4)
    finally:
        faults.arm(None)
    warnings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(warnings) == 1 and "batch 1" in warnings[0].getMessage()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.argmax(0), reference.argmax(0))


def test_out_of_memory_in_the_last_way_is_raised():
    data = torch.zeros((1, 8, 16, 16))
    faults.arm("window_batch=oom")
    try:
        with pytest.raises(faults.InjectedOutOfMemory):
            predict_sliding_window(conv_net(classes=2), data, (8, 16, 16), 2, batch_size=2)
    finally:
        faults.arm(None)

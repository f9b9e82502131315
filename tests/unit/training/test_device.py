"""Device, precision and thread defaults of a run: the intra-op thread tuner."""

from __future__ import annotations

import torch

from medseg.training.device import ThreadTuner


def test_thread_tuner_switches_to_the_faster_thread_count():
    before = torch.get_num_threads()
    try:
        for slow_threads, expected in ((2, 1), (1, 2)):
            tuner = ThreadTuner(2, probe_every=5)
            for _ in range(40):
                tuner.before_step()
                tuner.after_step(1.0 if torch.get_num_threads() == slow_threads else 0.3)
            assert tuner.current == expected
            assert torch.get_num_threads() == expected or tuner.probing is not None
        pinned = ThreadTuner(2, enabled=False)
        pinned.before_step()
        pinned.after_step(5.0)
        assert pinned.current == 2
    finally:
        torch.set_num_threads(before)

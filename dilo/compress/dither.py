"""Random dither for stochastic rounding: uniform 16-bit integers, drawn four to a 64-bit word.

    dither = Dither(ctx.worker_seed(), x.device)
    r = dither.lanes(n)               # n integers, uniform over [-32768, 32767]
    u = (r + 32768.5) * 2**-16        # uniform on a 2^-16 grid, mean exactly 1/2

A stochastic codec's cost on the CPU is its random generator's. torch's CPU generator (MT19937)
draws 16M fp32 uniforms in about 3.5x the time of a 16M-value fp32 copy; numpy's PCG64
(`random_raw`) draws a 64-bit word in under half of MT19937's time, and a word holds four 16-bit
lanes: 16M lanes take about 0.6x the copy. PCG64's stream for a seed is fixed across numpy
releases, so a codec's output is a pure function of (seed, input).
On an accelerator the lanes come from torch's device generator, where they are cheap.

Rounding x up with probability frac(x) through u = (r + 32768.5) / 65536 (floor(x + u)) is
unbiased to within 2^-17 of a step: u's grid has 65536 points, offset by half a step so that
its mean is exactly 1/2.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

LANE_STEP = 2.0**-16
"""u = r * LANE_STEP + LANE_MEAN for a lane r: the grid step of the uniform draws."""
LANE_MEAN = 0.5 + 2.0**-17
"""The constant of u: its mean, 1/2, plus half a grid step (the lanes' mean is -1/2)."""


class Dither:
    """A stream of uniform int16 lanes from one seed; successive `lanes` calls continue it."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            self._bits: np.random.PCG64 | None = np.random.PCG64(seed)
            self._gen: torch.Generator | None = None
        else:
            self._bits = None
            self._gen = torch.Generator(device).manual_seed(seed)

    def lanes(self, n: int) -> Tensor:
        """n int16 values, each uniform over [-32768, 32767] and independent of the others."""
        if self._bits is None:
            return device_lanes(n, self._gen, self.device)
        words = self._bits.random_raw((n + 3) // 4)  # uint64, every bit uniform
        return torch.from_numpy(words.view(np.int16)[:n])


def device_lanes(n: int, gen: torch.Generator | None, device: torch.device) -> Tensor:
    """The lanes from torch's generator on `device` (one draw per lane: cheap on an accelerator)."""
    return torch.randint(-(1 << 15), 1 << 15, (n,), dtype=torch.int16, device=device, generator=gen)

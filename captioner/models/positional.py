"""Sinusoidal position encodings: 1-D for token sequences, 2-D for image grids.

Both are computed on demand for whatever length or grid the input has, so there is no fixed table
that runs out for long captions or images larger than the ones seen in training.
"""

from __future__ import annotations

import math

import torch

# Vaswani et al.'s base: wavelengths run geometrically from 2*pi to 10000*2*pi.
BASE = 10000.0


def sinusoidal_1d(T: int, D: int, *, offset: int = 0, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sinusoidal encoding of positions offset .. offset+T-1 (Vaswani et al.): (T, D).

    PE[pos, 2i] = sin(pos / BASE^(2i/D)) and PE[pos, 2i+1] = cos(pos / BASE^(2i/D)). `offset` lets an
    incremental decoding step encode its absolute position without building the whole prefix.
    """
    assert T >= 0 and D >= 1 and offset >= 0, f"need T >= 0, D >= 1, offset >= 0; got {T}, {D}, {offset}"
    # Computed in float32 whatever the target dtype: positions and angles lose precision in half types.
    positions = torch.arange(offset, offset + T, device=device, dtype=torch.float32)  # (T,)
    inv_freq = torch.exp(torch.arange(0, D, 2, device=device, dtype=torch.float32) * (-math.log(BASE) / D))
    angles = positions[:, None] * inv_freq[None, :]  # (T, ceil(D/2))
    pe = torch.empty(T, D, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : D // 2])  # an odd D has one more sine column than cosine columns
    return pe.to(dtype) if dtype is not None else pe


def sinusoidal_2d(h: int, w: int, D: int, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sinusoidal encoding of an h x w grid, row-major (index = row*w + col): (h*w, D).

    The first half of the D channels encodes the row, the second half the column, so regions in the
    same row share half their code and attention can tell "left of" from "above".
    """
    assert h >= 1 and w >= 1 and D >= 2, f"need h, w >= 1 and D >= 2; got {h}, {w}, {D}"
    d_row = D // 2
    rows = sinusoidal_1d(h, d_row, device=device, dtype=dtype)  # (h, D/2)
    cols = sinusoidal_1d(w, D - d_row, device=device, dtype=dtype)  # (w, D/2)
    grid = torch.cat([rows[:, None, :].expand(h, w, d_row), cols[None, :, :].expand(h, w, D - d_row)], dim=-1)
    return grid.reshape(h * w, D)  # (h*w, D) row-major

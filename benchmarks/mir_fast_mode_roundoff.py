"""Round-off of the MIR reference script's fast mode, against the value it returns in exact arithmetic.

The script's fast mode runs a coupled Newton-Schulz loop (Y0 = M = S_V S_T, Z0 = I, 5 steps, float32,
explicit inverses). Started at its own fixed point it returns M, so its FID is
||mu_V - mu_T||^2 + tr S_V + tr S_T - 2 tr(S_V S_T) (what ``sqrt="reference_fast"`` computes in float64)
plus float32 round-off. This prints that round-off, relative to one layer's FID, on synthetic features.

Run: python benchmarks/mir_fast_mode_roundoff.py   (figures quoted in docs/mir.md)
"""

from __future__ import annotations

import statistics

import torch


def _cov(x: torch.Tensor) -> torch.Tensor:
    c = x - x.mean(0)
    return c.T @ c / (x.shape[0] - 1)


def fast_mode_fid(v: torch.Tensor, t: torch.Tensor, steps: int = 5) -> float:
    """The fast mode's steps, written from its description, in float32."""
    v, t = v.float(), t.float()
    cv, ct = _cov(v), _cov(t)
    m = cv @ ct
    y, z = m, torch.eye(m.shape[0])
    for _ in range(steps):
        y = 0.5 * (y + torch.linalg.inv(z) @ m)
        z = 0.5 * (z + torch.linalg.inv(y) @ m)
    return float(((v.mean(0) - t.mean(0)) ** 2).sum() + cv.trace() + ct.trace() - 2 * y.trace())


def exact_arithmetic_value(v: torch.Tensor, t: torch.Tensor) -> float:
    v, t = v.double(), t.double()
    cv, ct = _cov(v), _cov(t)
    return float(((v.mean(0) - t.mean(0)) ** 2).sum() + cv.trace() + ct.trace() - 2 * (cv * ct.T).sum())


def main() -> None:
    g = torch.Generator().manual_seed(0)
    for d in (32, 64, 128, 256):
        errors = []
        for _ in range(5):
            mix = torch.eye(d) + torch.randn(d, d, generator=g) / d**0.5
            v = torch.randn(4000, d, generator=g) @ mix * 0.05 + 0.1
            t = torch.randn(3000, d, generator=g) * 0.04
            ideal = exact_arithmetic_value(v, t)
            errors.append(abs(fast_mode_fid(v, t) - ideal) / abs(ideal))
        print(f"D={d}: |fast - tr(S_V S_T) value| / FID: median {statistics.median(errors):.1e}, max {max(errors):.1e}")


if __name__ == "__main__":
    main()

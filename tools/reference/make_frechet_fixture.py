#!/usr/bin/env python3
"""Reference Fréchet distances for fewstep's eval::frechet, computed the standard way (pytorch-fid's
`calculate_frechet_distance`: numpy mean/cov with n-1, scipy.linalg.sqrtm of Σ1·Σ2, real part).

    python tools/reference/make_frechet_fixture.py tests/fixtures/reference/frechet.json

Three cases of two feature sets each (seeded numpy normals, correlated by a random mixing matrix): widths 4, 8
and 16, 64 and 96 rows. Writes {"cases": [{"a": [[...]], "b": [[...]], "fid": x}, ...]} with the features as
float32 values (what fewstep reads).
"""

import json
import sys

import numpy as np
from scipy import linalg


def fid(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def main():
    rng = np.random.default_rng(2026)
    cases = []
    for d, n1, n2 in [(4, 64, 96), (8, 96, 64), (16, 96, 96)]:
        mix1 = rng.normal(size=(d, d))
        mix2 = mix1 + 0.3 * rng.normal(size=(d, d))
        a = (rng.normal(size=(n1, d)) @ mix1).astype(np.float32)
        b = (rng.normal(size=(n2, d)) @ mix2 + 0.5).astype(np.float32)
        cases.append({"a": a.tolist(), "b": b.tolist(), "fid": fid(a.astype(np.float64), b.astype(np.float64))})
    with open(sys.argv[1], "w") as f:
        json.dump({"cases": cases}, f)


if __name__ == "__main__":
    main()

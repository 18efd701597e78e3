"""Sets of byte ranges (:mod:`pyvirtiofsd.backends.opendal.ranges`), against a model."""

from __future__ import annotations

import random

from pyvirtiofsd.backends.opendal.ranges import Ranges


def test_ranges_against_a_model() -> None:
    rng = random.Random(9)
    for _ in range(2000):
        r = Ranges()
        model: set[int] = set()
        for _ in range(rng.randint(1, 12)):
            a = rng.randint(0, 60)
            b = a + rng.randint(0, 20)
            op = rng.random()
            if op < 0.6:
                assert r.add(a, b) == len(set(range(a, b)) - model)
                model |= set(range(a, b))
            elif op < 0.8:
                gone = {x for x in model if x >= a}
                assert r.cut(a) == len(gone)
                model -= gone
            else:
                gone = model & set(range(a, b))
                assert r.remove(a, b) == len(gone)
                model -= gone
            assert r.total() == len(model)
            s, e = sorted((rng.randint(0, 90), rng.randint(0, 90)))
            got: set[int] = set()
            for x, y in r.missing(s, e):
                got |= set(range(x, y))
            assert got == set(range(s, e)) - model

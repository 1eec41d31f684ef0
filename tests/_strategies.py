"""Hypothesis strategies shared by the property tests (``test_plan_props``, ``test_fuzz``).

Helpers only (no tests).
"""

from __future__ import annotations

from hypothesis import strategies as st

#: A chunk as (offsets, sizes), one entry per dim.
Box = tuple[tuple[int, ...], tuple[int, ...]]


@st.composite
def tiling(draw: st.DrawFn, shape: tuple[int, ...]) -> list[Box]:
    """A random guillotine tiling of ``shape`` (not only grids), in a shuffled order."""

    def split(offs: tuple[int, ...], sizes: tuple[int, ...], level: int) -> list[Box]:
        cuttable = [d for d, s in enumerate(sizes) if s > 1]
        if level > 3 or not cuttable or not draw(st.booleans()):
            return [(offs, sizes)]
        d = draw(st.sampled_from(cuttable))
        at = draw(st.integers(1, sizes[d] - 1))
        o2 = list(offs)
        o2[d] += at
        s1, s2 = list(sizes), list(sizes)
        s1[d], s2[d] = at, sizes[d] - at
        return split(offs, tuple(s1), level + 1) + split(tuple(o2), tuple(s2), level + 1)

    boxes = split(tuple(0 for _ in shape), tuple(shape), 0)
    return list(draw(st.permutations(boxes)))

"""Hypothesis strategies shared by the tests."""

from hypothesis import strategies as st


@st.composite
def shape_and_box(draw, min_dims=0, max_dims=4, max_size=5):
    """A shape and a non-empty box (offsets, sizes) inside it."""
    shape = tuple(draw(st.lists(st.integers(1, max_size), min_size=min_dims, max_size=max_dims)))
    offsets, sizes = [], []
    for d in shape:
        o = draw(st.integers(0, d - 1))
        offsets.append(o)
        sizes.append(draw(st.integers(1, d - o)))
    return shape, tuple(offsets), tuple(sizes)

"""Group geometry: one helper for group length, count and padding."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from awq_ao.lowering.quant_math import group_geometry, num_groups


@given(k=st.integers(1, 5000), group_size=st.one_of(st.just(-1), st.integers(1, 1024)))
def test_group_geometry_covers_the_columns_with_one_ragged_group_at_most(k, group_size):
    size, count, pad = group_geometry(k, group_size)
    assert size == (k if group_size == -1 else group_size)
    assert count * size == k + pad and 0 <= pad < size
    assert (count - 1) * size < k  # the last group holds at least one real column
    assert num_groups(k, group_size) == count

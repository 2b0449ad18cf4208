"""The instance order is a function of (seed, cursor): resuming reproduces it exactly."""

from hypothesis import given
from hypothesis import strategies as st

from finemem.sampler import InstanceSampler


@given(n=st.integers(1, 30), seed=st.integers(0, 5), sizes=st.lists(st.integers(1, 12), min_size=1, max_size=8),
       cut=st.integers(0, 7))
def test_resume_reproduces_order(n, seed, sizes, cut):
    full = InstanceSampler(n, seed)
    expected = [full.next_batch(k) for k in sizes]
    first = InstanceSampler(n, seed)
    got = [first.next_batch(k) for k in sizes[:cut]]
    resumed = InstanceSampler.from_state(n, seed, first.state_dict())
    got += [resumed.next_batch(k) for k in sizes[cut:]]
    assert got == expected


def test_each_epoch_is_a_permutation():
    s = InstanceSampler(7, 3)
    a, b = s.next_batch(7), s.next_batch(7)
    assert sorted(a) == sorted(b) == list(range(7))
    assert a != b

"""runtime/device_graph.py prefetch_ranges: which later weights each prefetching op part asks L2 for."""

from __future__ import annotations

from onnxopt.runtime.device_graph import prefetch_ranges

MB = 2 ** 20


def test_each_part_claims_the_next_unclaimed_weight_up_to_its_budget():
    # one llama-like layer and the next one's q/k/v: qkv, attention, o, gate/up, down, qkv'
    weights = [(1000 * MB, 12 * MB), None, (2000 * MB, 8 * MB), (3000 * MB, 58 * MB), (4000 * MB, 29 * MB),
               (5000 * MB, 12 * MB)]
    capable = [True, True, True, True, True, True]
    ranges = prefetch_ranges(weights, capable, 16 * MB)
    assert ranges == [
        (2000 * MB, 8 * MB),  # q/k/v: all of o
        (3000 * MB, 16 * MB),  # attention: o is claimed, so gate/up's first 16 MB
        (3000 * MB + 16 * MB, 16 * MB),  # o: gate/up's next 16 MB
        (4000 * MB, 16 * MB),  # gate/up: down's first 16 MB (never its own weight)
        (5000 * MB, 12 * MB),  # down: the next q/k/v
        None,  # the last part: nothing after it
    ]


def test_parts_without_the_kernel_argument_and_budgets_below_a_line_take_nothing():
    weights = [(0, 4 * MB), (8 * MB, 4 * MB), (16 * MB, 4 * MB)]
    assert prefetch_ranges(weights, [False, True, True], 1 * MB) == [None, (16 * MB, 1 * MB), None]
    assert prefetch_ranges(weights, [True, True, True], 100) == [None, None, None]


def test_ranges_are_whole_lines_within_their_buffer():
    weights = [None, (4096, 1000)]  # 7 whole lines and a partial one
    assert prefetch_ranges(weights, [True, False], 10 ** 6) == [(4096, 896), None]
    # a claim continues where the last one ended, and a fully claimed weight passes to the next
    weights = [None, None, None, (4096, 256), (8192, 512)]
    assert prefetch_ranges(weights, [True, True, True, False, False], 128) == [(4096, 128), (4096 + 128, 128),
                                                                               (8192, 128), None, None]


def test_only_the_kernels_that_issue_the_range_claim_one():
    import numpy as np

    from onnxopt.custom_ops import group_query_attention, linear

    assert linear.takes_prefetch(np.zeros(4, np.uint8))  # the packed decode GEMV
    assert not linear.takes_prefetch(np.zeros(4, np.float16))  # the float GEMV ignores it
    assert group_query_attention.takes_prefetch()

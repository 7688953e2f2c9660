import torch
from torch import nn

from fewbit_dist.memory import SavedTensorMeter, format_bytes, peak_memory_bytes, saved_activation_bytes


def test_counts_distinct_storages_once():
    x = torch.randn(100, requires_grad=True)
    with SavedTensorMeter() as meter:
        y = x * 2  # saves nothing of x (constant factor)
        z = y.exp()  # saves its output
        w = y.sin()  # saves y
        v = (z * w).sum()  # saves z and w
    assert meter.nbytes == 3 * 400  # y, exp(y), sin(y): each storage once
    assert meter.saved_count >= 4
    v.backward()


def test_views_count_their_whole_storage_and_parameters_are_excluded():
    lin = nn.Linear(8, 4)
    x = torch.randn(10, 8)
    with SavedTensorMeter(lin) as meter:
        lin(x).sum()
    assert meter.nbytes == x.numel() * 4  # the input; never the weight
    big = torch.randn(100, 10, requires_grad=True)
    with SavedTensorMeter() as meter:
        big[:1].exp()  # saves a (1, 10) result: its own storage
        (big * 1)[:1].sin()  # saves a view of a (100, 10) temporary: the whole storage stays alive
    assert meter.nbytes == 40 + 4000


def test_explicit_tensor_exclusion_and_helpers():
    x = torch.randn(50, requires_grad=True)
    y = x * 1
    with SavedTensorMeter(exclude=[y]) as meter:
        y.sin()
    assert meter.nbytes == 0
    assert saved_activation_bytes(nn.Sequential(nn.Linear(4, 4), nn.Tanh()), torch.randn(3, 4)) == 3 * 4 * 4 * 2
    assert peak_memory_bytes() > 0
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(12) == "12 B"


def test_a_forward_without_backward_under_the_meter_leaks_nothing():
    """The meter's pack hook must not tie a saved output to its own node (a cycle the GC cannot see)."""
    import gc

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))

    w = torch.randn(20, 20, requires_grad=True)
    x = torch.randn(8, 20)
    with SavedTensorMeter() as meter:
        torch.sigmoid(x @ w).sum()
    before = live_tensors()
    for _ in range(5):
        with SavedTensorMeter() as meter:
            torch.sigmoid(x @ w).sum()  # sigmoid saves its output
    assert live_tensors() == before and meter.nbytes == 2 * 8 * 20 * 4  # x (for grad w) and the output

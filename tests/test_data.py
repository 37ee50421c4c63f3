"""core/data.py: in-memory arrays and data loaders as sources of chunks."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from marginalize.core.data import ArrayData, LoaderData, as_data, is_loader
from marginalize.errors import DataError


def test_loader_pass_reads_every_row_once_in_chunks():
    x, y = torch.arange(30.0).reshape(10, 3), torch.arange(10)
    src = as_data(DataLoader(TensorDataset(x, y), batch_size=4))
    assert isinstance(src, LoaderData) and src.n == 10 and src.has_targets
    xs, ys = zip(*src.chunks(3), strict=True)
    assert max(b.shape[0] for b in xs) == 3
    assert torch.equal(torch.cat(xs), x) and torch.equal(torch.cat(ys), y)


def test_arrays_chunks_and_example():
    x, y = torch.randn(7, 2), torch.randn(7)
    src = as_data(x, y)
    assert isinstance(src, ArrayData) and src.in_memory
    assert [b.shape[0] for b, _ in src.chunks(3)] == [3, 3, 1]
    ex, ey = src.example(2)
    assert torch.equal(ex, x[:2]) and torch.equal(ey, y[:2])


def test_plain_reiterable_needs_n_and_one_shot_refused():
    batches = [(torch.randn(4, 2), torch.randn(4)) for _ in range(3)]
    with pytest.raises(DataError, match="n=NUMBER_OF_ROWS"):
        as_data(batches_wrapper(batches))
    assert as_data(batches_wrapper(batches), n=12).n == 12
    with pytest.raises(DataError, match="one-shot"):
        as_data(iter(batches))


def test_loader_with_y_refused_and_arrays_not_loaders():
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    with pytest.raises(DataError, match="y=None"):
        as_data(loader, torch.randn(4))
    assert not is_loader([[1.0, 2.0]]) and not is_loader(torch.randn(3)) and is_loader(loader)
    assert not as_data(loader).has_targets


class batches_wrapper:  # a re-iterable without a length
    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

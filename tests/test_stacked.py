"""`mlora.ops.stacked`: which tensors are parts of one buffer, found without copying."""

from __future__ import annotations

import torch

from mlora.ops.stacked import side_by_side, stacked_rows


def test_stacked_rows_finds_consecutive_row_blocks_of_one_buffer() -> None:
    buf = torch.randn(10, 4)
    parts = [buf[0:3], buf[3:7], buf[7:10]]
    whole = stacked_rows(parts)
    assert whole is not None and whole.shape == (10, 4) and whole.data_ptr() == buf.data_ptr()
    assert torch.equal(whole, buf)
    assert stacked_rows(parts[:2]).shape == (7, 4)  # a prefix of the buffer is fine
    assert stacked_rows([buf[3:7], buf[7:10]]) is not None  # so is one that starts further in
    assert stacked_rows([buf[3:7], buf[0:3]]) is None  # out of order
    assert stacked_rows([buf[0:3], buf[4:7]]) is None  # a gap
    assert stacked_rows([buf[0:3]]) is None  # one tensor is no stack
    assert stacked_rows([buf[0:3], torch.randn(4, 4)]) is None  # another storage
    assert stacked_rows([buf[0:3, :2], buf[3:7, :2]]) is None  # rows not contiguous
    assert stacked_rows([buf[0:3], buf[3:7].double()]) is None


def test_side_by_side_finds_consecutive_column_blocks_of_one_buffer() -> None:
    buf = torch.randn(2, 5, 9)  # leading dims flatten to 10 rows of 9
    parts = [buf[..., 0:4], buf[..., 4:6], buf[..., 6:9]]
    whole = side_by_side(parts)
    assert whole is not None and whole.shape == (10, 9) and torch.equal(whole, buf.view(10, 9))
    assert side_by_side(parts[:2]) is None  # the rows are 9 wide, not 6
    assert side_by_side([parts[1], parts[0], parts[2]]) is None  # out of order
    assert side_by_side([buf[:, :3, 0:4], buf[:, :3, 4:9]]) is None  # rows of the buffer skipped
    assert side_by_side([buf[..., 0:4], torch.randn(2, 5, 5)]) is None  # another storage
    assert side_by_side([buf[..., 0:4], buf[..., 4:4]]) is None  # an empty member
    t = torch.randn(9, 10).t()  # columns contiguous, not rows
    assert side_by_side([t[:, 0:4], t[:, 4:9]]) is None

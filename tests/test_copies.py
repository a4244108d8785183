"""neurons.copies.first_good_copy: the one loop every reader of a decided object uses (states,
checkpoints, merged updates, published models): the first copy that reads and decodes wins."""
from __future__ import annotations

import pytest

from neurons.copies import first_good_copy
from neurons.transfer import HashMismatch, TransferError
from resbm.outer import OuterError


def test_bad_missing_and_undecodable_copies_are_skipped_for_the_first_good_one():
    tried = []

    def read(url: str) -> str:
        tried.append(url)
        if url == "gone":
            raise TransferError("404", 404)
        if url == "altered":
            raise HashMismatch("sha256 differs")
        if url == "garbage":
            raise OuterError("not a state")
        return f"bytes of {url}"

    assert first_good_copy(["gone", "altered", "garbage", "good", "never"], read, "state") == "bytes of good"
    assert tried == ["gone", "altered", "garbage", "good"]  # stops at the first good copy


def test_when_no_copy_is_usable_the_error_names_the_object_and_keeps_the_last_failure():
    def read(url: str) -> bytes:
        raise TransferError(f"{url}: 404", 404)

    with pytest.raises(TransferError, match=r"stage 1 state: no copy of 2 is readable \(b: 404\)") as info:
        first_good_copy(["a", "b"], read, "stage 1 state")
    assert info.value.status == 404 and isinstance(info.value.__cause__, TransferError)


def test_an_unexpected_error_is_not_mistaken_for_a_bad_copy():
    def read(url: str) -> bytes:
        raise MemoryError("out of memory")

    with pytest.raises(MemoryError):
        first_good_copy(["a", "b"], read, "checkpoint")

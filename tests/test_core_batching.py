"""nnsight_av.batching (the core helpers for lists of inputs): as_list, padding, position specs, layer checks."""

from __future__ import annotations

import pytest
import torch

from nnsight_av.batching import (as_list, batch_tensors, check_layers, check_positions, collate_right, pad_id,
                                 per_item, positions_of, progress_batches)
from nnsight_av.errors import InputError, LayerIndexError, TokenSelectionError


def test_as_list_accepts_one_input_or_an_iterable_and_names_the_bad_item(av_example):
    assert as_list(av_example) == ([av_example], True)
    assert as_list((av_example, av_example))[0] == [av_example, av_example]
    assert as_list(x for x in [av_example]) == ([av_example], False)
    with pytest.raises(InputError, match="empty"):
        as_list([])
    with pytest.raises(InputError, match="input 1 is a str"):
        as_list([av_example, "clip.mp4"])
    with pytest.raises(InputError, match="got dict"):
        as_list({"input_ids": torch.zeros(1, 3)})


def test_batches_and_padding(tiny):
    short, long = tiny.prepare(text="hi"), tiny.prepare(text="What is making the sound in this clip?")
    assert [len(b) for b in progress_batches([1, 2, 3], 2, True, "t")] == [2, 1]
    with pytest.raises(InputError, match="batch_size"):
        list(progress_batches([1], 0, False, "t"))
    data = collate_right(tiny, [long, short])
    assert len(long) > len(short) and data["input_ids"].shape == (2, len(long))
    assert torch.equal(data["input_ids"][1, :len(short)], short.data["input_ids"][0])
    assert (data["input_ids"][1, len(short):] == pad_id(tiny)).all()
    single = collate_right(tiny, [short])
    assert single is not short.data and single["input_ids"] is short.data["input_ids"]
    assert batch_tensors([0, 1], [torch.tensor([4]), torch.tensor([5, 6])], -1).tolist() == [[4, -1], [5, 6]]


def test_specs_and_layers(tiny, av_example):
    assert torch.equal(positions_of("audio", av_example, "column"), av_example.spans.audio.long())
    assert positions_of(torch.tensor([2, 1]), av_example, "column").tolist() == [2, 1]
    with pytest.raises(TokenSelectionError, match=r"column positions must lie in \[0, "):
        check_positions([len(av_example)], len(av_example), "column")
    assert per_item(["video", "audio"], [av_example, av_example], single=False) == ["video", "audio"]
    assert per_item([1, 2], [av_example, av_example], single=False) == [[1, 2], [1, 2]]
    assert check_layers(tiny, None) == list(range(tiny.num_layers)) and check_layers(tiny, [-1]) == [tiny.num_layers - 1]
    with pytest.raises(LayerIndexError):
        check_layers(tiny, [tiny.num_layers])

"""batches: token id lists into padded tensors, checked on literal ids."""

from instructcli import batches


def test_collate_pads_right_for_training_and_left_for_prompts():
    b = batches.collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    p = batches.collate_prompts([[1, 2, 3], [4]], pad_id=0)
    assert p["input_ids"].tolist() == [[1, 2, 3], [0, 0, 4]]
    assert p["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rollout_rows_start_their_response_at_one_column():
    ids, attn, pos, start = batches.collate_rollout([[5, 6], [7]], [[1], [2, 3]], pad_id=0)
    assert start == 2  # the longest prompt
    assert ids.tolist() == [[5, 6, 1, 0], [0, 7, 2, 3]]
    assert attn.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert pos.tolist() == [[0, 1, 2, 2], [0, 0, 1, 2]]  # positions count real tokens only
    _, attn, _, _ = batches.collate_rollout([[5]], [[]], pad_id=0)  # an empty response: one masked pad
    assert attn.tolist() == [[1, 0]]


def test_length_chunks_group_similar_lengths():
    assert batches.length_chunks([5, 1, 4, 2, 3], 2) == [[1, 3], [4, 2], [0]]

import pytest
import torch

from analysis.layout import IMAGE, PADDING, SYSTEM, TEXT, LayoutError, token_layout

IMG = 9


def test_groups_with_left_padding_and_two_images():
    input_ids = torch.tensor(
        [
            [0, 0, 5, 6, IMG, IMG, 7, IMG, 8],
            [5, 6, 7, IMG, IMG, IMG, 8, 8, 8],
        ]
    )
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    layout = token_layout(input_ids, mask, IMG)
    assert layout.group[0].tolist() == [PADDING, PADDING, SYSTEM, SYSTEM, IMAGE, IMAGE, TEXT, IMAGE, TEXT]
    assert layout.group[1].tolist() == [SYSTEM] * 3 + [IMAGE] * 3 + [TEXT] * 3
    assert layout.last_index.tolist() == [8, 8]
    assert layout.query_counts().tolist() == [[2, 3, 2, 1], [3, 3, 3, 1]]
    assert layout.key_counts().tolist() == [[2, 3, 2], [3, 3, 3]]
    assert layout.text_mask_excluding_last()[0].nonzero().flatten().tolist() == [6]


def test_right_padding_last_token_is_last_real_token():
    input_ids = torch.tensor([[5, IMG, 7, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    layout = token_layout(input_ids, mask, IMG)
    assert layout.last_index.tolist() == [3]
    assert layout.group[0].tolist() == [SYSTEM, IMAGE, TEXT, TEXT, PADDING, PADDING]


def test_image_id_inside_padding_is_not_an_image():
    input_ids = torch.tensor([[IMG, 5, IMG, 7]])
    mask = torch.tensor([[0, 1, 1, 1]])
    layout = token_layout(input_ids, mask, IMG)
    assert layout.group[0].tolist() == [PADDING, SYSTEM, IMAGE, TEXT]


def test_row_without_image_tokens_names_the_expected_id():
    input_ids = torch.tensor([[5, IMG, 7], [5, 6, 7]])
    with pytest.raises(LayoutError, match=r"row 1 has no image token.*image token id 9"):
        token_layout(input_ids, None, IMG)


def test_shape_mismatch_and_empty_rows_are_errors():
    with pytest.raises(LayoutError, match="same shape"):
        token_layout(torch.tensor([[5, IMG]]), torch.tensor([[1, 1, 1]]), IMG)
    with pytest.raises(LayoutError, match="all zeros"):
        token_layout(torch.tensor([[5, IMG]]), torch.tensor([[0, 0]]), IMG)
    with pytest.raises(LayoutError, match=r"\(batch, seq\)"):
        token_layout(torch.tensor([5, IMG]), None, IMG)

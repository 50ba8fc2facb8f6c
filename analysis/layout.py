"""Token groups of every row of a batch, derived from input_ids and the attention mask.

Groups (the DyVTE paper's token groups; its study reads attention between them):
  system  tokens before the first image token of the row
  image   tokens equal to the image token id (several images: all of them)
  text    non-image tokens after the first image token (text between images included)
  last    the final prompt token of the row, which predicts the answer; a query group of one
Padding (left or right, wherever the attention mask is 0) belongs to no group. No position is
assumed: every row is read on its own. The rule is the same for every model family: tokens a
processor writes around images (vision start/end, <img>/</img>, [IMG_BREAK], ...) are not image
tokens but system or text by position; image-newline tokens carry the image token id and are
image tokens (``analysis.adapters`` says it per family).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.errors import DyVTEError
from analysis.vocabulary import KEY_GROUPS, QUERY_GROUPS  # noqa: F401 (re-exported: the groups are the layout's)

PADDING, SYSTEM, IMAGE, TEXT = -1, 0, 1, 2


class LayoutError(DyVTEError, ValueError):
    """input_ids and attention mask do not describe a prompt with image tokens."""


@dataclass(frozen=True)
class TokenLayout:
    """Per-row token groups of one batch.

    Attributes:
        group: (batch, seq) int64; -1 padding, 0 system, 1 image, 2 text.
        last_index: (batch,) int64 position of each row's last prompt token.
        image_token_id: the id that marked image positions.
    """

    group: torch.Tensor
    last_index: torch.Tensor
    image_token_id: int

    @property
    def batch_size(self) -> int:
        return int(self.group.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.group.shape[1])

    def to(self, device: torch.device | str) -> TokenLayout:
        return TokenLayout(self.group.to(device), self.last_index.to(device), self.image_token_id)

    def query_membership(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(batch, seq, len(QUERY_GROUPS)) 0/1 weights; the columns follow QUERY_GROUPS."""
        columns = [self.group == SYSTEM, self.group == IMAGE, self.group == TEXT, self.last_mask()]
        return torch.stack(columns, dim=-1).to(dtype)

    def key_membership(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(batch, seq, len(KEY_GROUPS)) 0/1 weights; the columns follow KEY_GROUPS."""
        columns = [self.group == SYSTEM, self.group == IMAGE, self.group == TEXT]
        return torch.stack(columns, dim=-1).to(dtype)

    def last_mask(self) -> torch.Tensor:
        """(batch, seq) bool, True at each row's last prompt token."""
        positions = torch.arange(self.seq_len, device=self.group.device)
        return positions[None, :] == self.last_index[:, None]

    def text_mask_excluding_last(self) -> torch.Tensor:
        """(batch, seq) bool: the text tokens after the first image, without the last token."""
        return (self.group == TEXT) & ~self.last_mask()

    def query_counts(self) -> torch.Tensor:
        """(batch, len(QUERY_GROUPS)) int64 number of queries per group."""
        return self.query_membership(torch.int64).sum(dim=1)

    def key_counts(self) -> torch.Tensor:
        """(batch, len(KEY_GROUPS)) int64 number of keys per group."""
        return self.key_membership(torch.int64).sum(dim=1)


def token_layout(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_token_id: int,
) -> TokenLayout:
    """Derive the token groups of every row.

    Args:
        input_ids: (batch, seq) token ids, image positions already expanded to one id per patch.
        attention_mask: (batch, seq) 1 for real tokens, 0 for padding; None means no padding.
        image_token_id: the id marking image positions (``config.image_token_id``).

    Raises:
        LayoutError: a shape is wrong, a row is empty, or a row has no image token.
    """
    if input_ids.dim() != 2:
        raise LayoutError(f"expected input_ids of shape (batch, seq), found shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise LayoutError(
            f"expected an attention mask of the same shape as input_ids {tuple(input_ids.shape)}, "
            f"found {tuple(attention_mask.shape)}"
        )
    real = attention_mask.bool()
    is_image = (input_ids == image_token_id) & real
    n_real = real.sum(dim=1)
    for row in range(input_ids.shape[0]):
        if int(n_real[row]) == 0:
            raise LayoutError(f"row {row} of the batch has no real tokens: its attention mask is all zeros")
        if not bool(is_image[row].any()):
            raise LayoutError(
                f"row {row} has no image token: expected at least one token with the image token id "
                f"{image_token_id}, found none among its {int(n_real[row])} tokens; build the prompt with "
                "the processor so that each image placeholder is expanded"
            )
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    first_image = torch.where(is_image, positions, input_ids.shape[1]).min(dim=1).values
    after_first_image = positions >= first_image[:, None]
    group = torch.full_like(input_ids, PADDING, dtype=torch.int64)
    group[real & ~after_first_image] = SYSTEM
    group[real & after_first_image & ~is_image] = TEXT
    group[is_image] = IMAGE
    last_index = torch.where(real, positions, -1).max(dim=1).values
    return TokenLayout(group=group, last_index=last_index, image_token_id=int(image_token_id))

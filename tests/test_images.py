"""Image grids: layout of the tiles and the captioned grid the demo writes."""
import numpy as np
import pytest
import torch

from tpgrpo.images import captioned_grid, image_grid


def test_image_grid_places_each_image_in_its_cell():
    images = torch.stack([torch.full((3, 4, 4), value) for value in (0.0, 0.25, 0.5, 0.75, 1.0)])
    grid = image_grid(images, columns=3, padding=2)
    assert grid.shape == (3, 2 * 6 + 2, 3 * 6 + 2)
    # image i sits at row i // 3, column i % 3, offset by the padding
    for i, value in enumerate((0.0, 0.25, 0.5, 0.75, 1.0)):
        top, left = 2 + (i // 3) * 6, 2 + (i % 3) * 6
        assert torch.all(grid[:, top : top + 4, left : left + 4] == value)
    assert torch.all(grid[:, 8:, 14:] == 1.0)  # the empty sixth cell stays white


def test_captioned_grid_puts_text_above_each_column_and_keeps_the_images():
    images = torch.zeros(4, 3, 8, 8)  # black tiles: any dark pixel outside them is text
    picture = captioned_grid(images, 2, ["a photo of a red circle", "two squares"], scale=4, row_labels=["before", "after"])
    pixels = np.asarray(picture.convert("L")).astype(int)
    grid_width, grid_height = 2 * (8 + 2) * 4 + 2 * 4, 2 * (8 + 2) * 4 + 2 * 4
    top, left = pixels.shape[0] - grid_height, pixels.shape[1] - grid_width
    assert top > 0 and left > 0
    caption_band = pixels[:top, left:]
    # text in each column's caption area, none in the grid's padding column between them
    assert (caption_band[:, : grid_width // 2] < 128).any() and (caption_band[:, grid_width // 2 :] < 128).any()
    assert (pixels[top:, :left] < 128).any()  # row labels
    tile = pixels[top + 2 * 4 : top + 10 * 4, left + 2 * 4 : left + 10 * 4]
    assert (tile == 0).all()


def test_captioned_grid_wraps_long_prompts_to_the_column():
    images = torch.zeros(1, 3, 8, 8)
    short = captioned_grid(images, 1, ["a circle"], scale=4)
    long = captioned_grid(images, 1, ["a photo of a blue circle to the left of a green triangle"], scale=4)
    assert long.width == short.width  # wrapped, not widened
    assert long.height > short.height


def test_captioned_grid_needs_one_caption_per_column():
    with pytest.raises(ValueError, match="one caption per column: 2 columns, 1 captions"):
        captioned_grid(torch.zeros(2, 3, 4, 4), 2, ["only one"])
    with pytest.raises(ValueError, match="one label per row: 1 rows, 2 labels"):
        captioned_grid(torch.zeros(2, 3, 4, 4), 2, ["a", "b"], row_labels=["x", "y"])

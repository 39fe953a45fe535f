"""Labelled image grids: the demo's, the CLI's and the training sample grids."""

from __future__ import annotations

import PIL.Image
import PIL.ImageDraw


def labelled_grid(images: list[PIL.Image.Image], labels: list[str], columns: int | None = None) -> PIL.Image.Image:
    """Images in a grid with each image's label written under it (white background, black text)."""
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    caption = 12
    grid = PIL.Image.new("RGB", (columns * width, rows * (height + caption)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for i, (image, label) in enumerate(zip(images, labels)):
        x, y = (i % columns) * width, (i // columns) * (height + caption)
        grid.paste(image.convert("RGB"), (x, y))
        draw.text((x + 2, y + height), str(label)[: max(1, width // 6)], fill="black")
    return grid

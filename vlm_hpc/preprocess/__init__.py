"""Image bytes to tiles: decoding as the original does, InternVL's dynamic tiling, the exact bicubic resize."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def image_folder(tmp_path):
    """40 tiny 8x8 RGB PNGs with some structure (a bright square at a random place)."""
    from PIL import Image
    import numpy as np

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        img = np.full((8, 8, 3), 30, dtype=np.uint8)
        r, c = rng.integers(0, 5, size=2)
        img[r:r + 3, c:c + 3] = rng.integers(150, 255, size=3)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return str(folder)

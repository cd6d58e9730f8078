"""A 3-D .npy file of images (n, H, W) is read as rows of H * W values."""
import re

import numpy as np
import pytest

from flashsae import io
from flashsae.data import open_source
from flashsae.errors import ConfigError, DataError


def test_images_are_rows_and_give_their_shape(tmp_path):
    images = np.arange(5 * 3 * 4, dtype=np.float32).reshape(5, 3, 4)
    np.save(tmp_path / "images.npy", images)
    src = open_source(tmp_path / "images.npy")
    assert (src.n_rows, src.d_in, src.image_shape) == (5, 12, (3, 4))
    assert isinstance(src._array, np.memmap)  # never loaded whole
    np.testing.assert_array_equal(src.read(1, 4), images[1:4].reshape(3, 12))
    np.testing.assert_array_equal(src.take(np.array([4, 0])), images[[4, 0]].reshape(2, 12))
    assert open_source(tmp_path / "images.npy", image_shape=(2, 6)).image_shape == (2, 6)  # given wins
    with pytest.raises(ConfigError, match=re.escape("image_shape (5, 5) does not fit rows of 12 values")):
        open_source(tmp_path / "images.npy", image_shape=(5, 5))


def test_four_or_more_dimensions_and_fortran_order_are_refused(tmp_path):
    np.save(tmp_path / "video.npy", np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(DataError, match=re.escape("video.npy has shape (2, 3, 4, 5); expected 2-D data (rows, "
                                                  "features) or 3-D images (n, H, W)")):
        open_source(tmp_path / "video.npy")
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((3, 2, 2), np.float32)))
    with pytest.raises(DataError, match=re.escape("f.npy holds images (n, H, W) in Fortran order; save it in C "
                                                  "order")):
        open_source(tmp_path / "f.npy")


def test_training_on_images_draws_the_atom_atlas(tmp_path):
    import flashsae

    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.random((600, 4, 6), dtype=np.float32))
    _, result = flashsae.train(tmp_path / "images.npy", out=tmp_path / "run", latents=16, k=2, rows=600,
                               quiet=True)
    assert io.read_config(result.run_dir)["data_stats"]["image_shape"] == [4, 6]
    assert (result.run_dir / io.ATLAS_FILE).is_file()

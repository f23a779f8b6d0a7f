"""Real images from disk: an .npz pack (JPEG bytes, or decoded uint8 arrays) or an image folder; everything else
is named before any work."""
import numpy as np
import pytest
import torch
from PIL import Image

from dfqvit.data import load_images
from dfqvit.errors import DFQViTError

SIZE, MEAN, STD = (8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _pixels(n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def test_decoded_arrays_in_an_npz_read_like_the_same_images_in_a_folder(tmp_path):
    pixels, labels = _pixels(), np.array([0, 1, 0, 1, 0, 1])
    np.savez(tmp_path / "arrays.npz", images=pixels, labels=labels)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        (tmp_path / "folder" / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "folder" / str(label) / f"{i}.png")
    arrays = load_images(str(tmp_path / "arrays.npz"), SIZE, MEAN, STD)
    folder = load_images(str(tmp_path / "folder"), SIZE, MEAN, STD)
    assert [arrays[i][1] for i in range(6)] == labels.tolist()
    by_label = sorted(range(6), key=lambda i: (labels[i], i))  # the folder lists class 0 first
    for j, i in enumerate(by_label):
        assert torch.equal(arrays[i][0], folder[j][0])
    expected = (torch.from_numpy(pixels[0]).permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(arrays[0][0], expected, atol=1e-6)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: _write(p.with_suffix(".png"), b"x"), "is a file, not an .npz pack"),
    (lambda p: _write(p, b"not a zip"), r"is not a readable .npz image pack \(ValueError\)"),
    (lambda p: np.savez(p, foo=np.zeros(2)) or p, r"holds \['foo'\]; an image pack needs the keys blob, offsets"),
    (lambda p: np.savez(p, images=np.zeros((2, 8, 8, 3)), labels=np.zeros(2)) or p, "images of dtype float64"),
    (lambda p: np.savez(p, images=_pixels(2), labels=np.zeros(3)) or p, "2 images but labels of shape"),
    # float labels were truncated (0.7 -> class 0), string labels raised numpy's ValueError
    (lambda p: np.savez(p, images=_pixels(3), labels=np.array([0.7, 1.2, 2.9])) or p, "labels of dtype float64"),
    (lambda p: np.savez(p, blob=np.zeros(9, np.uint8), offsets=np.array([0, 3, 6, 9]), labels=np.array(["a"] * 3))
     or p, "labels of dtype <U1"),
    (lambda p: np.savez(p, blob=np.zeros(9, np.uint8), offsets=np.array([0, 3]), labels=np.zeros(3, int)) or p,
     "3 labels need 4 integer offsets"),  # was an IndexError when the images were read
])
def test_files_that_are_not_image_data_are_named(tmp_path, make, message):
    """A .png as the data path raised NotADirectoryError; a non-npz file numpy's allow_pickle ValueError; missing
    keys read "lacks key 'blob is not a file in the archive'"."""
    path = make(tmp_path / "data.npz")
    with pytest.raises(DFQViTError, match=message):
        load_images(str(path), SIZE, MEAN, STD)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit pixels at 255: a uniform image read as mean 0.997 instead of ~0.5."""
    pixels = np.random.default_rng(0).integers(0, 65536, size=(16, 16), dtype=np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(pixels).save(tmp_path / "a" / "g16.png")
    x, _ = load_images(str(tmp_path), (16, 16), (0.0,) * 3, (1.0,) * 3)[0]
    expected = torch.from_numpy(np.rint(pixels / 257.0) / 255.0).float()
    assert torch.allclose(x[0], expected, atol=1e-6) and torch.equal(x[0], x[2])


def test_a_file_that_is_not_an_image_is_named_by_verify_and_by_reading(tmp_path):
    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a" / "ok.png")
    (tmp_path / "a" / "junk.png").write_bytes(b"not an image")
    data = load_images(str(tmp_path), (8, 8), (0.0,) * 3, (1.0,) * 3)
    for read in (data.verify, lambda: data[0]):  # was PIL's UnidentifiedImageError traceback
        with pytest.raises(DFQViTError, match="junk.png' cannot be read as an image.*remove or replace it"):
            read()
    assert data[1][0].shape == (3, 8, 8)


def test_hidden_and_empty_class_folders(tmp_path):
    """A hidden folder (.ipynb_checkpoints) was taken as class 0 and shifted every label; an empty class folder took a
    label silently."""
    for i, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(_pixels(1, seed=i)[0]).save(tmp_path / "data" / name / "a.png")
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()
    data = load_images(str(tmp_path / "data"), SIZE, MEAN, STD)
    assert data.classes == ["cat", "dog"] and data.labels == [0, 1]
    (tmp_path / "data" / "dog" / "more").mkdir()  # images in a class's sub-folders belong to it (as ImageFolder)
    Image.fromarray(_pixels(1, seed=5)[0]).save(tmp_path / "data" / "dog" / "more" / "b.png")
    assert load_images(str(tmp_path / "data"), SIZE, MEAN, STD).labels == [0, 1, 1]
    (tmp_path / "data" / "bird").mkdir()
    with pytest.raises(DFQViTError, match="bird' holds no .png"):
        load_images(str(tmp_path / "data"), SIZE, MEAN, STD)

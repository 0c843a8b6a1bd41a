"""Reading input images: bounded memory, upright proportions, messages without server paths."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.config import INPUT_IMAGE_MAX_SIDE
from engine.errors import InputError
from test_folder.conftest import REPO_ROOT
from utils import OutputFolders, load_image

# A fresh interpreter reads one file and prints its peak RSS growth in MiB and the size it kept.
_PEAK_SCRIPT = """
import resource, sys
sys.path.insert(0, sys.argv[2])
from utils import OutputFolders, load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(sys.argv[1], "image")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, *image.size)
"""


def _peak_mib(path: Path) -> tuple[int, tuple[int, int]]:
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(path), str(REPO_ROOT)], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[0]), (int(out[1]), int(out[2]))


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "12000.jpg"
    Image.linear_gradient("L").resize((12000, 12000)).save(path, quality=80)
    return path


def test_huge_jpeg_is_reduced_while_decoding(huge_jpeg: Path) -> None:
    peak, size = _peak_mib(huge_jpeg)
    assert size == (INPUT_IMAGE_MAX_SIDE, INPUT_IMAGE_MAX_SIDE)
    # Full size in L mode is 137 MiB, and the old read-then-copy held two of them.
    assert peak < 100, f"reading a 12000x12000 JPEG grew RSS by {peak} MiB"


def test_large_png_keeps_its_proportions_at_a_bounded_size(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    Image.new("RGB", (6000, 2000), (10, 20, 30)).save(path)
    image = load_image(path, "image")
    assert image.size == (INPUT_IMAGE_MAX_SIDE, INPUT_IMAGE_MAX_SIDE // 3)


def test_small_image_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    source = Image.fromarray(np.random.RandomState(0).randint(0, 255, (50, 70, 3), np.uint8))
    source.save(path)
    assert np.array_equal(np.asarray(load_image(path, "image")), np.asarray(source))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    """A phone photo stored landscape with 'rotate 90' is portrait to its owner, and to us."""
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (300, 200)).save(path, exif=exif.tobytes())
    assert load_image(path, "image").size == (200, 300)


def test_over_the_pixel_cap_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(path)  # 50 KB on disk, 400 megapixels
    with pytest.raises(InputError, match="too large: at most 150 megapixels"):
        load_image(path, "image")


@pytest.mark.parametrize(
    "data", [b"", b"hello world", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"\x89PNG\r\n\x1a\n" + b"\0" * 40]
)
def test_unreadable_names_the_input_not_the_path(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "tmpabc123file.txt"
    path.write_bytes(data)
    with pytest.raises(InputError) as err:
        load_image(path, "mask")
    message = str(err.value)
    assert message.startswith("mask could not be read as an image") and "PNG, JPEG or WebP" in message
    assert "tmp" not in message and "/" not in message


def test_damaged_files_are_read_or_refused_never_crash(tmp_path: Path) -> None:
    rng = random.Random(0)
    pixels = Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 48, 3), np.uint8))
    sources = {}
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"):
        buf = io.BytesIO()
        pixels.save(buf, fmt)
        sources[fmt] = buf.getvalue()
    path = tmp_path / "damaged"
    for _ in range(300):
        data = bytearray(sources[rng.choice(list(sources))])
        if rng.random() < 0.5:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(data)
        try:
            load_image(path, "image").convert("RGB")
        except InputError as exc:
            assert str(path) not in str(exc)


def test_each_prediction_writes_a_new_folder_and_the_previous_one_stays() -> None:
    """The runtime may still send the previous prediction's files: its folder is kept whole, and
    only older ones are removed, so disk use stays flat over many predictions."""
    folders = OutputFolders()
    first = folders.new()
    (first / "out-0.png").write_bytes(b"first")
    second = folders.new()
    assert second != first and not any(second.iterdir())
    assert (first / "out-0.png").read_bytes() == b"first"
    for _ in range(5):
        last = folders.new()
    assert not first.exists()
    assert sorted(folders.root.iterdir()) == sorted([last.parent / f"{folders.count - 1:09d}", last])

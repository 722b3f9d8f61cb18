"""Slide headers no real slide has (a 2 000 000 px wide image, more tiles declared than
stored) fail at once with one line, before any pixel is read, instead of running for minutes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile

from napari_dismm.cli import main
from napari_dismm.errors import SlideError
from napari_dismm.slide import open_slide
from napari_dismm.slide.sources import MAX_SIDE_PX


def forged_tiff(path, *, width: int, height: int = 512):
    """A real 512 x 512 tiled TIFF whose header is then rewritten to declare ``width`` px."""
    tifffile.imwrite(path, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb",
                     compression="zlib", metadata=None)
    with tifffile.TiffFile(path, mode="r+") as tif:
        tif.pages[0].tags["ImageWidth"].overwrite(width)
        if height != 512:
            tif.pages[0].tags["ImageLength"].overwrite(height)
    return path


@pytest.mark.parametrize(("width", "height", "says"), [
    (2_000_000, 512, "2000000 x 512 px"),
    (512, 3_000_000, "512 x 3000000 px"),
    (40_000, 512, "stores 4 tile offsets"),
], ids=["wide", "tall", "tiles-missing"])
def test_implausible_header_fails_fast(tmp_path, width, height, says):
    path = forged_tiff(tmp_path / "forged.tif", width=width, height=height)
    started = time.perf_counter()
    with pytest.raises(SlideError) as exc:
        open_slide(path, mpp=0.5)
    assert time.perf_counter() - started < 5
    message = str(exc.value)
    assert "\n" not in message and "forged.tif" in message and says in message


def test_limit_is_above_real_slides(tmp_path):
    assert MAX_SIDE_PX >= 750_000  # 75 mm of glass at 0.1 µm/px
    path = tmp_path / "fine.tif"
    tifffile.imwrite(path, np.full((600, 900, 3), 200, np.uint8), tile=(256, 256), photometric="rgb", metadata=None)
    with open_slide(path, mpp=0.5) as slide:
        assert slide.info.dimensions == (900, 600)


@pytest.mark.parametrize("command", ["predict", "extract"])
def test_cli_refuses_forged_slide_quickly(tmp_path, capsys, command):
    path = forged_tiff(tmp_path / "wide.tif", width=2_000_000)
    out = tmp_path / "out"
    args = [command, str(path), "--out", str(out), "--mpp", "0.5"]
    if command == "predict":
        args += ["--model", "demo"]
    started = time.perf_counter()
    code = main(args)
    err = capsys.readouterr().err
    assert time.perf_counter() - started < 60
    assert "Traceback" not in err and "wide.tif" in err and "2000000" in err
    assert code == (2 if command == "predict" else 1)
    if command == "predict":
        assert not out.exists()

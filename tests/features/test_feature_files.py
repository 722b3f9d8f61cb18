"""Feature files: our round trip, files written the way CLAM and TRIDENT write them, atomic
writes and the cache key."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import h5py
import numpy as np
import pytest

from napari_dismm.errors import DismmError, FeatureFileError
from napari_dismm.features import cache as cache_mod
from napari_dismm.features import h5 as h5_mod
from napari_dismm.features.cache import cache_key, cached, feature_path, parse_magnification
from napari_dismm.features.h5 import FeatureFile, read_coords, read_features, write_features
from napari_dismm.tissue import TissueParams


def _ff(n: int = 7, d: int = 5, **kw) -> FeatureFile:
    rng = np.random.default_rng(0)
    base = dict(
        features=rng.normal(size=(n, d)).astype(np.float32),
        coords=(np.arange(2 * n).reshape(n, 2) * 448).astype(np.int64),
        patch_size=224,
        patch_size_level0=448,
        target_magnification=20.0,
        level0_magnification=40.0,
        name="slide-a",
        level0_width=3000,
        level0_height=2500,
        mpp=0.25,
        encoder="efficientnet-lite0",
        encoder_weights_hash="abc123",
        slide_id="quickhash-1",
        tissue_params={"mask_mpp": 8.0, "saturation_threshold": None},
        min_tissue=0.25,
        cache_key="k" * 64,
    )
    base.update(kw)
    return FeatureFile(**base)


def test_round_trip_keeps_arrays_and_attributes(tmp_path: Path) -> None:
    ff = _ff()
    path = write_features(tmp_path / "a" / "s.h5", ff)
    back = read_features(path)
    assert back.source_format == "dismm"
    np.testing.assert_array_equal(back.features, ff.features)
    np.testing.assert_array_equal(back.coords, ff.coords)
    assert back.features.dtype == np.float32 and back.coords.dtype == np.int64
    for key in (
        "patch_size", "patch_size_level0", "target_magnification", "level0_magnification",
        "name", "level0_width", "level0_height", "mpp", "encoder", "encoder_weights_hash",
        "slide_id", "tissue_params", "min_tissue", "cache_key", "overlap",
    ):
        assert getattr(back, key) == getattr(ff, key), key
    np.testing.assert_array_equal(read_coords(path), ff.coords)


def test_written_file_has_trident_and_clam_attributes(tmp_path: Path) -> None:
    path = write_features(tmp_path / "s.h5", _ff())
    with h5py.File(path) as h5:
        c = h5["coords"].attrs
        assert h5["features"].dtype == np.float32 and h5["coords"].dtype == np.int64
        assert c["patch_size"] == 224 and c["patch_size_level0"] == 448
        assert c["target_magnification"] == 20 and c["level0_magnification"] == 40
        assert c["overlap"] == 0 and c["name"] == "slide-a"
        assert c["level0_width"] == 3000 and c["level0_height"] == 2500
        # CLAM's rule patch_size x downsample gives the level-0 footprint
        assert c["patch_level"] == 0
        assert c["patch_size"] * c["downsample"][0] == 448
        assert h5["features"].attrs["encoder"] == "efficientnet-lite0"
        assert h5["features"].attrs["name"] == "slide-a"
        assert h5.attrs["slide_id"] == "quickhash-1"
        assert h5.attrs["encoder_weights_hash"] == "abc123"


def test_empty_slide_is_n0(tmp_path: Path) -> None:
    ff = _ff(n=0, d=1280)
    back = read_features(write_features(tmp_path / "e.h5", ff))
    assert back.features.shape == (0, 1280) and back.coords.shape == (0, 2)
    assert back.n_patches == 0 and back.dim == 1280


def test_clam_file_without_attributes_and_int32_coords_loads(tmp_path: Path) -> None:
    path = tmp_path / "clam.h5"
    feats = np.random.default_rng(1).normal(size=(4, 1024)).astype(np.float32)
    coords = np.array([[0, 0], [256, 0], [0, 256], [256, 256]], dtype=np.int32)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=feats)
        h5.create_dataset("coords", data=coords)
    back = read_features(path)
    assert back.source_format == "bare"
    assert back.coords.dtype == np.int64 and back.features.dtype == np.float32
    np.testing.assert_array_equal(back.coords, coords)
    assert back.patch_size is None and back.patch_size_level0 is None


def test_clam_attributes_patch_size_times_downsample(tmp_path: Path) -> None:
    path = tmp_path / "clam_attrs.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("features", data=np.ones((2, 8), np.float32))
        c = h5.create_dataset("coords", data=np.array([[0, 0], [1024, 0]], np.int32))
        c.attrs["patch_size"] = 256
        c.attrs["patch_level"] = 1
        c.attrs["downsample"] = np.array([4.0, 4.0])
        c.attrs["name"] = np.bytes_(b"TCGA-01")
    back = read_features(path)
    assert back.source_format == "clam"
    assert back.patch_size == 256 and back.patch_size_level0 == 1024
    assert back.name == "TCGA-01"


def test_trident_float16_features_with_its_attributes(tmp_path: Path) -> None:
    path = tmp_path / "trident.h5"
    feats16 = np.random.default_rng(2).normal(size=(3, 16)).astype(np.float16)
    with h5py.File(path, "w") as h5:
        f = h5.create_dataset("features", data=feats16)
        f.attrs["name"] = "slide-t"
        f.attrs["savetodir"] = "/somewhere"
        c = h5.create_dataset("coords", data=np.array([[0, 0], [512, 0], [1024, 0]], np.int64))
        for key, value in dict(
            patch_size=256, patch_size_level0=512, level0_magnification=40,
            target_magnification=20, overlap=0, name="slide-t",
            level0_width=5000, level0_height=4000,
        ).items():
            c.attrs[key] = value
    back = read_features(path)
    assert back.source_format == "trident"
    assert back.features.dtype == np.float32
    np.testing.assert_array_equal(back.features, feats16.astype(np.float32))
    assert back.patch_size_level0 == 512 and back.target_magnification == 20.0
    assert back.level0_width == 5000 and back.name == "slide-t"
    assert back.extra["features.savetodir"] == "/somewhere"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda h5: h5.create_dataset("features", data=np.ones((2, 3), np.float32)), "no 'coords'"),
        (
            lambda h5: (
                h5.create_dataset("features", data=np.ones((2, 3), np.float32)),
                h5.create_dataset("coords", data=np.zeros((3, 2), np.int64)),
            ),
            "2 feature rows but 3 coordinates",
        ),
        (
            lambda h5: (
                h5.create_dataset("features", data=np.ones((2, 3), np.float32)),
                h5.create_dataset("coords", data=np.zeros((2, 3), np.int64)),
            ),
            "coords must be (N, 2)",
        ),
        (
            lambda h5: (
                h5.create_dataset("features", data=np.full((2, 3), np.nan, np.float32)),
                h5.create_dataset("coords", data=np.zeros((2, 2), np.int64)),
            ),
            "NaN",
        ),
    ],
)
def test_malformed_files_name_the_file(tmp_path: Path, build, message: str) -> None:
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as h5:
        build(h5)
    with pytest.raises(FeatureFileError, match="bad.h5") as info:
        read_features(path)
    assert message in str(info.value)


def test_not_h5_and_missing_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(FeatureFileError, match="junk.h5"):
        read_features(junk)
    with pytest.raises(FeatureFileError, match="not found"):
        read_features(tmp_path / "missing.h5")


def test_atomic_write_leaves_nothing_when_writer_fails(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "s.h5"
    old = _ff(n=3)
    write_features(path, old)
    real = h5_mod._write_into

    def half_then_fail(h5, ff):
        h5.create_dataset("features", data=ff.features)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(h5_mod, "_write_into", half_then_fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_features(path, _ff(n=9))
    with pytest.raises(RuntimeError):
        write_features(tmp_path / "new.h5", _ff(n=9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # no temp, no half file
    np.testing.assert_array_equal(read_features(path).features, old.features)  # old file intact
    monkeypatch.setattr(h5_mod, "_write_into", real)


def test_stale_temp_of_a_killed_writer_is_cleaned(tmp_path: Path) -> None:
    path = tmp_path / "s.h5"
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    stale = tmp_path / f".s.h5.{socket.gethostname()}.{dead_pid}.deadbeef.tmp"
    stale.write_bytes(b"half")
    live = tmp_path / f".s.h5.{socket.gethostname()}.{os.getpid()}.cafecafe.tmp"
    live.write_bytes(b"in progress")
    write_features(path, _ff())
    assert not stale.exists() and live.exists()


def _key(**over) -> str:
    base = dict(
        slide_id="q", slide_mpp=0.25, encoder="e", weights_hash="w", magnification=20.0,
        patch_size=224, overlap=0, tissue_params=TissueParams(), min_tissue=0.25,
    )
    base.update(over)
    return cache_key(**base)


def test_cache_key_is_stable_and_content_addressed() -> None:
    assert _key() == _key() and len(_key()) == 64
    assert _key() == _key(tissue_params=TissueParams())
    for change in (
        dict(slide_id="other"), dict(slide_mpp=0.5), dict(weights_hash="w2"),
        dict(magnification=10.0), dict(patch_size=256), dict(overlap=16),
        dict(tissue_params=TissueParams(sigma_um=4.0)), dict(min_tissue=0.5), dict(encoder="f"),
    ):
        assert _key(**change) != _key(), change


def test_cached_checks_the_stored_key(tmp_path: Path) -> None:
    path = feature_path(tmp_path, encoder="efficientnet-lite0", magnification=20.0, slide_stem="s 1")
    assert path == tmp_path / "efficientnet-lite0" / "20x" / "s_1.h5"
    assert not cached(path, "k" * 64)
    write_features(path, _ff(cache_key="k" * 64))
    assert cached(path, "k" * 64)
    assert not cached(path, "j" * 64)
    path.write_bytes(b"garbage")
    assert not cached(path, "k" * 64)


def test_parse_magnification() -> None:
    assert parse_magnification("20x") == 20.0 == parse_magnification(20)
    assert parse_magnification(" 10X ") == 10.0
    assert cache_mod.magnification_label(2.5) == "2.5x"
    with pytest.raises(DismmError, match="magnification"):
        parse_magnification("twenty")

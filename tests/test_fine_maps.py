"""Finer maps without a viewer: option checks, the progress of the two phases, the panel's
sentence, and `dismm predict --overlap` refusing what it cannot do in one line."""

from __future__ import annotations

import pytest

from napari_dismm.errors import DismmError
from napari_dismm.fine_maps import _scaled, check_overlap, overlap_pixels, scope_text


@pytest.mark.parametrize("bad", [-0.1, 0.95, float("nan")])
def test_overlap_out_of_range_is_refused(bad):
    with pytest.raises(DismmError, match="overlap must be a fraction"):
        check_overlap(bad)


def test_stride_is_patch_times_one_minus_overlap():
    assert 224 - overlap_pixels(0.5, 224) == 112
    assert 224 - overlap_pixels(0.75, 224) == 56
    assert overlap_pixels(0.9, 224) == 202


def test_two_phases_report_one_rising_progress():
    seen = []
    report = lambda stage, fraction: seen.append((stage, fraction))  # noqa: E731
    first, second = _scaled(report, 0.0, 0.2), _scaled(report, 0.2, 1.0)
    for phase in (first, second):
        phase("features", 0.0)
        phase("encode", 0.5)
        phase("encode", 1.0)
        phase("features", 1.0)
        phase("model", 0.0)
    encode = [f for stage, f in seen if stage == "encode"]
    assert encode == sorted(encode) and encode[0] == 0.0 and encode[-1] == 1.0
    assert 0.1 in encode and any(abs(f - 0.6) < 1e-12 for f in encode)
    assert seen[-1] == ("model", 0.0)  # only the last phase's model step reaches the model stage


def test_scope_sentence():
    assert scope_text({}) is None
    text = scope_text({"overlap": 0.5, "stride_px": 112, "bag": "grid", "bag_patches": 68, "map_patches": 274})
    assert "overlap 0.5, stride 112 px, 274 patches" in text and "non-overlapping grid (68 patches)" in text
    assert "from the overlapping grid" in scope_text({"overlap": 0.5, "bag": "overlap"})


def test_cli_overlap_bad_input_is_one_line(tmp_path, capsys, cmu_slide_path):
    from napari_dismm.cli import main

    features = tmp_path / "a.h5"
    features.write_bytes(b"")
    assert main(["predict", str(features), "--model", "demo", "--out", str(tmp_path / "b"), "--overlap", "0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overlap needs the slide" in err
    assert main(["predict", str(cmu_slide_path), "--model", "demo", "--out", str(tmp_path / "b"),
                 "--overlap", "1.5"]) == 2
    assert "overlap must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()

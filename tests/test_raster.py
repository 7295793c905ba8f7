"""RasterSource on real rasters: CRS kept, band choice, 8-bit stretch, nodata, clear refusals, bounded memory."""

import os
import tracemalloc

import numpy as np
import pytest
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.windows import Window

from core.errors import InputError
from core.raster import RasterSource

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def write_tif(path, data, transform=None, crs=None, nodata=None, **kw):
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype.name, transform=transform, crs=crs, nodata=nodata, **kw)
    if transform is None:
        profile.pop("transform")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return str(path)


@pytest.fixture(scope="module")
def zanzibar(shared_data):
    return str(shared_data / "oam_mosaics" / "zanzibar.tif")


@pytest.fixture(scope="module")
def atlanta(shared_data):
    return str(shared_data / "spacenet_atlanta" / "full" / "sample_geotiff.tif")


def test_uint8_rgb_passes_through_and_keeps_crs(zanzibar):
    with RasterSource(zanzibar) as src, rasterio.open(zanzibar) as ds:
        assert (src.width, src.height, src.count) == (4096, 4096, 3)
        assert src.crs.to_epsg() == 3857 and src.georeferenced
        assert src.dtype == "uint8" and src.stretch is None and src.bands == (1, 2, 3)
        assert src.transform == ds.transform and src.res == ds.res
        win = Window(1000, 2000, 300, 200)
        rgb, valid = src.read_rgb8(win)
        assert rgb.shape == (200, 300, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
        assert valid.all()
        np.testing.assert_array_equal(rgb, np.moveaxis(ds.read(window=win), 0, -1))
        # resampled read = rasterio's resampled read, window transform scaled
        rgb2, _ = src.read_rgb8(win, out_shape=(100, 150))
        ref = ds.read(window=win, out_shape=(3, 100, 150), resampling=Resampling.bilinear)
        np.testing.assert_array_equal(rgb2, np.moveaxis(ref, 0, -1))
        t = src.window_transform(win, (100, 150))
        assert t.a == pytest.approx(2 * ds.transform.a) and t.c == pytest.approx(ds.transform.c + 1000 * ds.transform.a)
        gx, gy = src.ground_pixel_size()
        assert 0.07 < gx < 0.075 and 0.07 < gy < 0.075  # 7.46 cm Web Mercator "metres" at 6 deg S


def test_uint16_single_band_is_stretched_and_replicated(atlanta):
    with RasterSource(atlanta) as src, rasterio.open(atlanta) as ds:
        assert src.crs.to_epsg() == 32616 and src.dtype == "uint16" and src.bands == (1,)
        full = ds.read(1)
        ok = full != ds.nodata
        lo, hi = np.percentile(full[ok].astype(float), (2, 98))
        (slo, shi), = src.stretch
        assert slo == pytest.approx(lo, abs=1) and shi == pytest.approx(hi, abs=1)
        rgb, valid = src.read_rgb8(Window(0, 0, 900, 900))
        assert np.array_equal(valid, ok)
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
        expect = np.clip((full.astype(np.float32) - slo) * (255.0 / (shi - slo)), 0, 255) + 0.5
        assert np.abs(rgb[..., 0][ok].astype(int) - expect.astype(np.uint8)[ok].astype(int)).max() <= 1
        assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255


def test_nodata_is_ignored_by_stretch_and_marked_invalid(atlanta, tmp_path):
    with rasterio.open(atlanta) as ds:
        data = ds.read(1)
        profile = ds.profile
    data = data.copy()
    data[:300, :450] = 65535  # a nodata block with an extreme value
    path = write_tif(tmp_path / "nd.tif", data, profile["transform"], profile["crs"], nodata=65535)
    with RasterSource(path) as src:
        lo, hi = np.percentile(data[data != 65535].astype(float), (2, 98))
        assert src.stretch[0][1] == pytest.approx(hi, rel=0.02)  # not pulled up to 65535
        rgb, valid = src.read_rgb8(Window(0, 0, 900, 900))
        assert not valid[:300, :450].any() and valid[300:].all()
        assert (rgb[:300, :450] == 0).all()


def test_float_with_nan(tmp_path, atlanta):
    with rasterio.open(atlanta) as ds:
        data = ds.read(1).astype(np.float32) / 1000.0
        t, crs = ds.transform, ds.crs
    data[100:200, 100:200] = np.nan
    path = write_tif(tmp_path / "f.tif", data, t, crs)
    with RasterSource(path) as src:
        assert src.dtype == "float32" and all(np.isfinite(v) for v in src.stretch[0])
        rgb, valid = src.read_rgb8(Window(0, 0, 300, 300))
        assert not valid[100:200, 100:200].any() and valid[:100].all()
        assert (rgb[100:200, 100:200] == 0).all()


def test_band_choice(zanzibar, tmp_path):
    win = Window(512, 512, 64, 64)
    with RasterSource(zanzibar) as a, RasterSource(zanzibar, bands=(3, 2, 1)) as b:
        ra, _ = a.read_rgb8(win)
        rb, _ = b.read_rgb8(win)
        np.testing.assert_array_equal(ra[..., ::-1], rb)
    with RasterSource(zanzibar, bands=(2,)) as one:
        r1, _ = one.read_rgb8(win)
        for k in range(3):
            np.testing.assert_array_equal(r1[..., k], ra[..., 1])
    with RasterSource(zanzibar, bands=(1, 2)) as two:
        r2, _ = two.read_rgb8(win)
        np.testing.assert_array_equal(r2[..., :2], ra[..., :2])
        mean = (ra[..., 0].astype(int) + ra[..., 1]) // 2
        np.testing.assert_array_equal(r2[..., 2], mean)
    with pytest.raises(InputError, match="Band 4 does not exist"):
        RasterSource(zanzibar, bands=(1, 4))
    with pytest.raises(InputError, match="1, 2 or 3 bands"):
        RasterSource(zanzibar, bands=(1, 2, 3, 1))


def test_alpha_band_is_skipped_and_gives_validity(zanzibar, tmp_path):
    with rasterio.open(zanzibar) as ds:
        rgb = ds.read(window=Window(0, 0, 128, 128))
        t = ds.window_transform(Window(0, 0, 128, 128))
        crs = ds.crs
    alpha = np.full((1, 128, 128), 255, np.uint8)
    alpha[0, :, :40] = 0
    path = write_tif(tmp_path / "rgba.tif", np.concatenate([rgb, alpha]), t, crs, photometric="RGB", alpha="YES")
    with rasterio.open(path) as ds:
        assert ds.colorinterp[3] == ColorInterp.alpha
    with RasterSource(path) as src:
        assert src.bands == (1, 2, 3)
        out, valid = src.read_rgb8(Window(0, 0, 128, 128))
        assert not valid[:, :40].any() and valid[:, 40:].all()
        np.testing.assert_array_equal(out[:, 40:], np.moveaxis(rgb, 0, -1)[:, 40:])


def test_refusals(tmp_path, zanzibar):
    with pytest.raises(InputError, match="does not exist"):
        RasterSource(str(tmp_path / "nope.tif"))
    with pytest.raises(InputError, match="folder"):
        RasterSource(str(tmp_path))
    txt = tmp_path / "notes.txt"
    txt.write_text("not a raster at all\n")
    with pytest.raises(InputError, match="not a raster"):
        RasterSource(str(txt))
    for url in (
        "https://example.com/ortho.tif",
        "/vsicurl/https://example.com/ortho.tif",
        "crs=EPSG:3857&format&type=xyz&url=https://tile.openstreetmap.org/%7Bz%7D/%7Bx%7D/%7By%7D.png",
        "contextualWMSLegend=0&crs=EPSG:4326&format=image/png&layers=ortho&url=https://wms.example.com/wms",
        "WMS:https://wms.example.com/wms?",
    ):
        with pytest.raises(InputError, match="web service"):
            RasterSource(url)


def test_truncated_file_is_reported_as_corrupted(tmp_path, shared_data):
    src = shared_data / "oam_mosaics" / "kampala.tif"
    bad = tmp_path / "kampala_truncated.tif"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(os.path.getsize(src) // 3))
    with pytest.raises(InputError, match="corrupted"):
        RasterSource(str(bad))
    header_only = tmp_path / "header_only.tif"
    with open(src, "rb") as f:
        header_only.write_bytes(f.read(200))
    with pytest.raises(InputError, match="corrupted|not a raster"):
        RasterSource(str(header_only))


def test_rotated_and_gcp_only_are_refused_plain_image_is_flagged(tmp_path):
    img = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    rotated = rasterio.Affine(0.5, 0.1, 1000.0, 0.1, -0.5, 2000.0)
    p = write_tif(tmp_path / "rot.tif", img, rotated, "EPSG:32616")
    with pytest.raises(InputError, match="rotated"):
        RasterSource(p)
    plain = write_tif(tmp_path / "plain.tif", img)
    with RasterSource(plain) as src:
        assert src.georeferenced is False and src.crs is None
        assert src.ground_pixel_size() is None
        rgb, valid = src.read_rgb8(Window(0, 0, 32, 32))
        np.testing.assert_array_equal(rgb, np.moveaxis(img, 0, -1))
    from rasterio.control import GroundControlPoint

    gcp = write_tif(tmp_path / "gcp.tif", img)
    with rasterio.open(gcp, "r+") as ds:
        ds.gcps = ([GroundControlPoint(0, 0, 10.0, 50.0), GroundControlPoint(32, 32, 10.1, 49.9),
                    GroundControlPoint(0, 32, 10.0, 49.9)], rasterio.crs.CRS.from_epsg(4326))
    with pytest.raises(InputError, match="ground control points"):
        RasterSource(gcp)


def _repeat_vrt(path, src_path, n, dtype, bands):
    """A VRT mosaic of n x n copies of one real image (no pixel is duplicated on disk)."""
    with rasterio.open(src_path) as ds:
        w, h, t, crs = ds.width, ds.height, ds.transform, ds.crs.to_wkt()
    W, H = w * n, h * n
    parts = [f'<VRTDataset rasterXSize="{W}" rasterYSize="{H}">',
             f"<SRS>{crs.replace('&', '&amp;').replace('<', '&lt;').replace('>', '&gt;')}</SRS>",
             f"<GeoTransform>{t.c}, {t.a}, 0, {t.f}, 0, {t.e}</GeoTransform>"]
    for b in range(1, bands + 1):
        parts.append(f'<VRTRasterBand dataType="{dtype}" band="{b}">')
        for i in range(n):
            for j in range(n):
                parts.append(
                    f'<SimpleSource><SourceFilename relativeToVRT="0">{src_path}</SourceFilename>'
                    f"<SourceBand>{b}</SourceBand>"
                    f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
                    f'<DstRect xOff="{j * w}" yOff="{i * h}" xSize="{w}" ySize="{h}"/></SimpleSource>'
                )
        parts.append("</VRTRasterBand>")
    parts.append("</VRTDataset>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return str(path)


def test_huge_raster_is_never_read_whole(tmp_path, atlanta):
    """A 16200 x 16200 uint16 mosaic (525 MB as uint16, 787 MB as RGB8): statistics and reads stay small."""
    vrt = _repeat_vrt(tmp_path / "huge.vrt", atlanta, 18, "UInt16", 1)
    tracemalloc.start()
    try:
        with RasterSource(vrt) as src:
            assert (src.width, src.height) == (16200, 16200) and src.stretch is not None
            rgb, valid = src.read_rgb8(Window(8000, 8000, 1024, 1024))
            small, _ = src.read_rgb8(Window(0, 0, 4096, 4096), out_shape=(512, 512))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rgb.shape == (1024, 1024, 3) and small.shape == (512, 512, 3)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    # the stretch from sampled windows matches the one of the single (repeated) image
    with RasterSource(atlanta) as one, RasterSource(vrt) as src:
        (lo1, hi1), (lo2, hi2) = one.stretch[0], src.stretch[0]
        assert abs(lo1 - lo2) < 0.1 * (hi1 - lo1) and abs(hi1 - hi2) < 0.1 * (hi1 - lo1)


def test_stretch_from_overviews(tmp_path, atlanta):
    """A uint16 raster with overviews: percentiles from the overview agree with the full-resolution ones."""
    with rasterio.open(atlanta) as ds:
        data = np.tile(ds.read(1), (3, 3))
        t, crs = ds.transform, ds.crs
    path = write_tif(tmp_path / "ovr.tif", data, t, crs, nodata=0, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "r+") as ds:
        ds.build_overviews([2, 4], Resampling.nearest)
    with RasterSource(path) as src:
        assert src._ds.overviews(1) == [2, 4]
        lo, hi = np.percentile(data[data != 0].astype(float), (2, 98))
        (slo, shi), = src.stretch
        assert abs(slo - lo) < 0.03 * (hi - lo) and abs(shi - hi) < 0.03 * (hi - lo)

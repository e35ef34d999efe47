"""The synthetic world: procedural, seeded fields over lon/lat with a known SOC function (docs/synthetic-world.md).

Every field is a smooth function of position built from seeded sums of sinusoids, so any point anywhere has a
value, neighbouring pixels are correlated, and the same seed always gives the same world:

- ``elevation`` (m): a regional relief plus hills of about 1 km wavelength; ``slope`` (degree) from its gradient.
- Landsat reflectance ``SR_B1..SR_B7`` (unitless): a linear mix of a soil spectrum (brightness varies in space)
  and a vegetation spectrum, by a vegetation fraction that rises with wetness; the five indices follow from the
  reflectance exactly as the schema defines them.
- Monthly TerraClimate variables in the schema's units, from a mean temperature that falls with latitude and
  elevation, a seasonal cycle, a precipitation field, and smooth inter-annual anomalies.
- SOC (g/kg), the known function::

      log(SOC) = 2.9 + 1.6 (NDVI_mean - 0.35) + 0.5 elevation_km - 0.04 (tmean - 10) + 0.5 (P_year / 700 - 1) + e
      e ~ N(0, NOISE_SD),  NOISE_SD = 0.08

  where NDVI_mean is the patch's mean NDVI, elevation_km the patch's mean elevation in km, tmean the mean of
  (tmmx + tmmn) / 2 over the months and P_year the mean annual precipitation in mm. The noise is seeded by the
  point's position, so a point's SOC is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pyproj import Transformer

from shards.sources.base import Patch
from soilnet import __version__
from soilnet.schema import SampleSchema, compute_indices

NOISE_SD = 0.08
M_PER_DEG_LAT = 110_540.0
M_PER_DEG_LON_EQUATOR = 111_320.0
SOIL_SPECTRUM = np.array([0.55, 0.65, 0.8, 0.95, 1.05, 1.3, 1.15], dtype=np.float32)  # x soil brightness
VEG_SPECTRUM = np.array([0.02, 0.035, 0.07, 0.04, 0.42, 0.2, 0.09], dtype=np.float32)


@dataclass(frozen=True)
class Waves:
    """A sum of ``len(amp)`` sinusoids over (lon, lat) in degrees, roughly in [-1, 1]."""

    kx: np.ndarray
    ky: np.ndarray
    phase: np.ndarray
    amp: np.ndarray

    @classmethod
    def random(cls, rng: np.random.Generator, n: int, wavelength_deg: float) -> Waves:
        k = 2 * np.pi / wavelength_deg * rng.uniform(0.6, 1.4, n)
        angle = rng.uniform(0, 2 * np.pi, n)
        amp = rng.uniform(0.5, 1.0, n)
        return cls(k * np.cos(angle), k * np.sin(angle), rng.uniform(0, 2 * np.pi, n), amp / np.sqrt((amp**2).sum()))

    def __call__(self, lon: np.ndarray | float, lat: np.ndarray | float) -> np.ndarray:
        arg = np.asarray(lon)[..., None] * self.kx + np.asarray(lat)[..., None] * self.ky + self.phase
        return (np.sin(arg) * self.amp).sum(-1) * np.sqrt(2)


class SyntheticWorld:
    """The synthetic world as a :class:`~shards.sources.base.Source`. ``bbox``: (west, south, east, north)."""

    name = "synthetic"

    def __init__(self, schema: SampleSchema, seed: int = 0, bbox=(5.0, 45.0, 15.0, 55.0)):
        self.schema = schema
        self.seed = seed
        self.bbox = tuple(float(v) for v in bbox)
        rng = np.random.default_rng(seed)
        self.relief = Waves.random(rng, 4, 4.0)
        self.hills = Waves.random(rng, 6, 0.012)
        self.wetness = Waves.random(rng, 4, 3.0)
        self.veg_texture = Waves.random(rng, 6, 0.008)
        self.brightness = Waves.random(rng, 4, 2.0)
        self.warmth = Waves.random(rng, 3, 5.0)
        self.rain = Waves.random(rng, 4, 3.5)
        self.wind = Waves.random(rng, 3, 4.0)
        self.anomaly = [Waves.random(rng, 3, 6.0) for _ in range(2)]

    # -- fields ------------------------------------------------------------------------------------------------
    def pixel_grid(self, lon: float, lat: float) -> tuple[np.ndarray, np.ndarray]:
        """lon/lat of the patch's pixel centres, ``(H, W)`` each; north up, ``pixel_size_m`` spacing."""
        n, size = self.schema.patch_size, self.schema.pixel_size_m
        offsets = (np.arange(n) - (n - 1) / 2) * size
        dlon = offsets / (M_PER_DEG_LON_EQUATOR * np.cos(np.radians(lat)))
        dlat = -offsets / M_PER_DEG_LAT
        return np.meshgrid(lon + dlon, lat + dlat)

    def elevation(self, lon, lat) -> np.ndarray:
        """metres above sea level, >= 0."""
        return np.maximum(0.0, 450 + 380 * self.relief(lon, lat) + 35 * self.hills(lon, lat))

    def vegetation(self, lon, lat) -> np.ndarray:
        """vegetation fraction in (0, 1)."""
        return 1 / (1 + np.exp(-(1.4 * self.wetness(lon, lat) + 0.8 * self.veg_texture(lon, lat))))

    def mean_temperature(self, lon, lat, elevation) -> np.ndarray:
        """annual mean air temperature, degC."""
        return 24 - 0.55 * (lat - 35) - 0.0065 * elevation + 1.5 * self.warmth(lon, lat)

    # -- the Source interface ------------------------------------------------------------------------------------
    def patch(self, lon: float, lat: float) -> Patch:
        glon, glat = self.pixel_grid(lon, lat)
        image = self.image(glon, glat, self.schema.pixel_size_m)
        return Patch(image=image, scene_date="2015-01-07", qa={"clear_fraction": 1.0})

    def image(self, glon: np.ndarray, glat: np.ndarray, pixel_m: float) -> np.ndarray:
        """``(C, H, W)`` float32: the schema's channels at pixel centres ``glon``/``glat`` ``(H, W)`` (north up,
        ``pixel_m`` metres apart; slope from the elevation's gradient over the grid)."""
        elev = self.elevation(glon, glat)
        veg = self.vegetation(glon, glat)
        soil = 0.16 + 0.06 * self.brightness(glon, glat)
        refl = (1 - veg)[None] * soil[None] * SOIL_SPECTRUM[:, None, None] + veg[None] * VEG_SPECTRUM[:, None, None]
        bands = {f"SR_B{i + 1}": refl[i].astype(np.float32) for i in range(7)}
        dy, dx = np.gradient(elev, pixel_m)
        layers = {
            **bands,
            **compute_indices(bands, self.schema.channels),
            "elevation": elev.astype(np.float32),
            "slope": np.degrees(np.arctan(np.hypot(dx, dy))).astype(np.float32),
        }
        return np.stack([layers[c] for c in self.schema.channels])

    def read_window(self, crs, transform, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """The tile path's read (:mod:`soilnet.evaluate.tiles`): the channels on a north-up grid in ``crs``
        (``transform``: the window's affine, metres) and a valid mask (the world has data everywhere)."""
        cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
        x, y = transform.c + cols * transform.a, transform.f + rows * transform.e
        glon, glat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
        image = self.image(np.asarray(glon), np.asarray(glat), abs(transform.a))
        return image, np.ones((height, width), dtype=bool)

    def climate(self, lon: float, lat: float) -> np.ndarray:
        """``(T, F)`` for the schema's months and variables, in TerraClimate's units."""
        return self.climate_many(np.array([lon], dtype=np.float64), np.array([lat], dtype=np.float64))[0][0]

    def climate_many(self, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T, F)`` climate of ``N`` points at once, and an all-true ok mask (the tile path's read)."""
        lon, lat = np.asarray(lon, np.float64)[:, None], np.asarray(lat, np.float64)[:, None]
        years = np.array([int(m[:4]) for m in self.schema.months])
        months = np.array([int(m[5:]) for m in self.schema.months])
        elev = self.elevation(lon[:, 0], lat[:, 0])[:, None]
        t_year = self.mean_temperature(lon[:, 0], lat[:, 0], elev[:, 0])[:, None]
        season = np.cos(2 * np.pi * (months - 7) / 12)
        anomaly = (
            np.sin(years * 1.7) * self.anomaly[0](lon[:, 0], lat[:, 0])[:, None]
            + np.cos(years * 0.9) * self.anomaly[1](lon[:, 0], lat[:, 0])[:, None]
        )
        tmean = t_year + (7 + 0.15 * (lat - 35)) * season + 0.8 * anomaly
        p_year = 700 * (1 + 0.45 * self.rain(lon[:, 0], lat[:, 0])[:, None]) + 0.2 * elev
        pr = np.maximum(0.0, p_year / 12 * (1 + 0.3 * np.cos(2 * np.pi * (months - 1) / 12) + 0.25 * anomaly))
        tmmx, tmmn = tmean + 5.0, tmean - 5.0
        srad = np.broadcast_to(180 + 110 * season - 1.5 * (lat - 35), tmean.shape)
        pet = np.maximum(0.0, 12 + 5.2 * np.maximum(tmean, 0) + 0.05 * srad)
        snow = tmean < 0
        swe = np.where(snow, np.cumsum(np.where(snow, pr, 0.0), axis=1) % 400, 0.0)
        soil = np.clip(60 + 0.9 * (pr - pet), 0, 300)
        aet = np.minimum(pet, pr + 0.3 * soil)
        ro = np.maximum(0.0, pr - aet - 20)
        vap = 0.6108 * np.exp(17.27 * tmmn / (tmmn + 237.3))
        es = 0.6108 * np.exp(17.27 * tmean / (tmean + 237.3))
        values = {
            "aet": aet,
            "def": np.maximum(0.0, pet - aet),
            "pdsi": np.clip(2.5 * anomaly + (pr - pet) / 40, -10, 10),
            "pet": pet,
            "pr": pr,
            "ro": ro,
            "soil": soil,
            "srad": srad,
            "swe": swe,
            "tmmn": tmmn,
            "tmmx": tmmx,
            "vap": vap,
            "vpd": np.maximum(0.0, es - vap),
            "vs": np.maximum(0.2, 3.5 + 1.2 * self.wind(lon[:, 0], lat[:, 0])[:, None] + 0.4 * season),
        }
        out = np.stack([values[v] for v in self.schema.climate_variables], axis=2).astype(np.float32)
        return out, np.ones(len(lon), dtype=bool)

    def targets(self, lon: float, lat: float, patch: Patch | None = None, climate=None) -> dict[str, float]:
        """``{"soc": g/kg}`` by the module's documented function, from the full-schema fields at the point."""
        return {"soc": float(soc(self, lon, lat))}

    def versions(self) -> dict[str, str]:
        return {"synthetic_world": f"soilnet {__version__}, seed {self.seed}"}


def soc(world: SyntheticWorld, lon: float, lat: float) -> float:
    """The known SOC (g/kg) at a point; see the module docstring for the function."""
    full = SyntheticWorld(SampleSchema(), world.seed, world.bbox) if world.schema != SampleSchema() else world
    image = full.patch(lon, lat).image
    ch = full.schema.channels
    ndvi = float(image[ch.index("NDVI")].mean())
    elev_km = float(image[ch.index("elevation")].mean()) / 1000
    clim = full.climate(lon, lat)
    v = full.schema.climate_variables
    tmean = float(((clim[:, v.index("tmmx")] + clim[:, v.index("tmmn")]) / 2).mean())
    p_year = float(clim[:, v.index("pr")].mean()) * 12
    noise = np.random.default_rng([world.seed, int(round(lon * 1e6)) % 2**32, int(round(lat * 1e6)) % 2**32])
    log_soc = (
        2.9
        + 1.6 * (ndvi - 0.35)
        + 0.5 * elev_km
        - 0.04 * (tmean - 10)
        + 0.5 * (p_year / 700 - 1)
        + noise.normal(0, NOISE_SD)
    )
    return float(np.exp(log_soc))


def sample_bbox(bbox, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points uniform by area on the sphere inside a lon/lat box: lon uniform, sin(lat) uniform."""
    west, south, east, north = bbox
    rng = np.random.default_rng(seed)
    lon = rng.uniform(west, east, n)
    lat = np.degrees(np.arcsin(rng.uniform(np.sin(np.radians(south)), np.sin(np.radians(north)), n)))
    return lon, lat

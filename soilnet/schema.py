"""The sample schema: the one source of truth for what a SoilNet sample holds.

A sample is one location with
- an image patch ``(C, H, W)``: the channels below, in this order, on a ``patch_size x patch_size`` grid of
  ``pixel_size_m`` metre pixels centred on the location;
- a climate series ``(T, F)``: ``T`` monthly steps of ``F`` TerraClimate variables;
- optional targets (soil properties measured at the location).

Packing, loading, normalisation and model input sizes all derive from a :class:`SampleSchema`. Subsets of
channels or variables are chosen by name, never by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import numpy as np


@dataclass(frozen=True)
class Channel:
    """One image channel.

    ``kind`` is ``reflectance`` (Landsat 8 Collection 2 Level 2 surface reflectance, unitless, roughly
    0..1), ``index`` (a normalised difference ``(a - b) / (a + b)`` of two reflectance bands, -1..1) or
    ``topography``.
    """

    name: str
    kind: str
    unit: str
    definition: str
    bands: tuple[str, str] | None = None  # (a, b) of a normalised difference


def _nd(name: str, a: str, b: str) -> Channel:
    return Channel(name, "index", "1", f"ND({a},{b}) = ({a} - {b}) / ({a} + {b})", ("SR_" + a, "SR_" + b))


LANDSAT_BANDS = {
    "SR_B1": "coastal aerosol, 0.43-0.45 um",
    "SR_B2": "blue, 0.45-0.51 um",
    "SR_B3": "green, 0.53-0.59 um",
    "SR_B4": "red, 0.64-0.67 um",
    "SR_B5": "near infrared, 0.85-0.88 um",
    "SR_B6": "shortwave infrared 1, 1.57-1.65 um",
    "SR_B7": "shortwave infrared 2, 2.11-2.29 um",
}

CHANNELS: tuple[Channel, ...] = (
    *(
        Channel(band, "reflectance", "1", f"Landsat 8 C2 L2 surface reflectance, {desc}; DN * 2.75e-5 - 0.2")
        for band, desc in LANDSAT_BANDS.items()
    ),
    _nd("clayIndex", "B6", "B7"),
    _nd("ferrousIndex", "B6", "B5"),
    _nd("carbonateIndex", "B4", "B3"),
    _nd("rockOutcropIndex", "B6", "B3"),
    _nd("NDVI", "B5", "B4"),
    Channel("elevation", "topography", "m", "height above the EGM2008 geoid (Copernicus GLO-30 DEM)"),
    Channel("slope", "topography", "degree", "terrain slope from the DEM, in degrees (0..90)"),
)


@dataclass(frozen=True)
class ClimateVariable:
    """One TerraClimate monthly variable: ``scale`` turns the stored integer into ``unit``."""

    name: str
    unit: str
    scale: float
    description: str


CLIMATE_VARIABLES: tuple[ClimateVariable, ...] = (
    ClimateVariable("aet", "mm", 0.1, "actual evapotranspiration"),
    ClimateVariable("def", "mm", 0.1, "climate water deficit"),
    ClimateVariable("pdsi", "1", 0.01, "Palmer drought severity index"),
    ClimateVariable("pet", "mm", 0.1, "reference evapotranspiration"),
    ClimateVariable("pr", "mm", 1.0, "precipitation accumulation"),
    ClimateVariable("ro", "mm", 1.0, "runoff"),
    ClimateVariable("soil", "mm", 0.1, "soil moisture"),
    ClimateVariable("srad", "W/m2", 0.1, "downward surface shortwave radiation"),
    ClimateVariable("swe", "mm", 1.0, "snow water equivalent"),
    ClimateVariable("tmmn", "degC", 0.1, "minimum temperature"),
    ClimateVariable("tmmx", "degC", 0.1, "maximum temperature"),
    ClimateVariable("vap", "kPa", 0.001, "vapour pressure"),
    ClimateVariable("vpd", "kPa", 0.01, "vapour pressure deficit"),
    ClimateVariable("vs", "m/s", 0.01, "wind speed at 10 m"),
)


@dataclass(frozen=True)
class Target:
    """A soil property that fine-tuning can regress."""

    name: str
    unit: str
    description: str


TARGETS: tuple[Target, ...] = (
    Target("soc", "g/kg", "soil organic carbon content of the topsoil (LUCAS `OC`)"),
    Target("soc_stock", "Mg/ha", "soil organic carbon stock to 100 cm (RaCA `SOCstock100`)"),
)

CHANNELS_BY_NAME = {c.name: c for c in CHANNELS}
CLIMATE_BY_NAME = {v.name: v for v in CLIMATE_VARIABLES}
TARGETS_BY_NAME = {t.name: t for t in TARGETS}

DEFAULT_FIRST_MONTH = "2010-01"
DEFAULT_LAST_MONTH = "2015-01"
PATCH_SIZE = 64
PIXEL_SIZE_M = 30.0


class SchemaError(ValueError):
    """A name, month or shape that does not fit the schema."""


def month_range(first: str, last: str) -> tuple[str, ...]:
    """Every month from ``first`` to ``last`` inclusive, as ``YYYY-MM`` strings."""
    try:
        y0, m0 = (int(x) for x in first.split("-"))
        y1, m1 = (int(x) for x in last.split("-"))
        date(y0, m0, 1), date(y1, m1, 1)
    except ValueError as err:
        raise SchemaError(f"months must be 'YYYY-MM', got {first!r} .. {last!r}") from err
    start, stop = y0 * 12 + m0 - 1, y1 * 12 + m1 - 1
    if stop < start:
        raise SchemaError(f"last month {last} is before first month {first}")
    return tuple(f"{k // 12:04d}-{k % 12 + 1:02d}" for k in range(start, stop + 1))


def check_names(kind: str, names: tuple[str, ...], known: dict) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SchemaError(f"unknown {kind} {unknown}; known: {list(known)}")
    if len(set(names)) != len(names):
        raise SchemaError(f"duplicate {kind} in {list(names)}")
    if not names:
        raise SchemaError(f"no {kind} selected")


@dataclass(frozen=True)
class SampleSchema:
    """Which channels, climate variables and months a data set or model uses, and the patch geometry.

    Shapes: image ``(len(channels), patch_size, patch_size)``, climate ``(len(months),
    len(climate_variables))``. Channel and variable order always follows the canonical order above, so two
    schemas with the same names are equal.
    """

    channels: tuple[str, ...] = tuple(c.name for c in CHANNELS)
    climate_variables: tuple[str, ...] = tuple(v.name for v in CLIMATE_VARIABLES)
    months: tuple[str, ...] = field(default_factory=lambda: month_range(DEFAULT_FIRST_MONTH, DEFAULT_LAST_MONTH))
    patch_size: int = PATCH_SIZE
    pixel_size_m: float = PIXEL_SIZE_M

    def __post_init__(self) -> None:
        check_names("channels", tuple(self.channels), CHANNELS_BY_NAME)
        check_names("climate variables", tuple(self.climate_variables), CLIMATE_BY_NAME)
        canonical_c = tuple(c.name for c in CHANNELS if c.name in self.channels)
        canonical_v = tuple(v.name for v in CLIMATE_VARIABLES if v.name in self.climate_variables)
        object.__setattr__(self, "channels", canonical_c)
        object.__setattr__(self, "climate_variables", canonical_v)
        object.__setattr__(self, "months", tuple(self.months))
        if not self.months:
            raise SchemaError("no months selected")
        if self.patch_size <= 0 or self.pixel_size_m <= 0:
            raise SchemaError("patch_size and pixel_size_m must be positive")

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_months(self) -> int:
        return len(self.months)

    @property
    def n_climate(self) -> int:
        return len(self.climate_variables)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return (self.n_channels, self.patch_size, self.patch_size)

    @property
    def climate_shape(self) -> tuple[int, int]:
        """``(T, F)``."""
        return (self.n_months, self.n_climate)

    def channel_indices(self, names: tuple[str, ...] | list[str]) -> list[int]:
        """Positions of ``names`` in this schema's channels; raises naming any that are absent."""
        missing = [n for n in names if n not in self.channels]
        if missing:
            raise SchemaError(f"channels {missing} are not in this data set's channels {list(self.channels)}")
        return [self.channels.index(n) for n in names]

    def climate_indices(self, names: tuple[str, ...] | list[str]) -> list[int]:
        """Positions of ``names`` in this schema's climate variables; raises naming any that are absent."""
        missing = [n for n in names if n not in self.climate_variables]
        if missing:
            raise SchemaError(
                f"climate variables {missing} are not in this data set's variables {list(self.climate_variables)}"
            )
        return [self.climate_variables.index(n) for n in names]

    def month_indices(self, months: tuple[str, ...] | list[str]) -> list[int]:
        missing = [m for m in months if m not in self.months]
        if missing:
            raise SchemaError(f"months {missing[:3]}... are not in this data set's months")
        return [self.months.index(m) for m in months]

    def subset_of(self, other: SampleSchema) -> bool:
        """Whether every channel, variable and month of ``self`` is available in ``other``."""
        return (
            set(self.channels) <= set(other.channels)
            and set(self.climate_variables) <= set(other.climate_variables)
            and set(self.months) <= set(other.months)
            and self.patch_size == other.patch_size
            and self.pixel_size_m == other.pixel_size_m
        )

    def differences(self, other: SampleSchema) -> list[str]:
        """Human-readable list of what differs between two schemas (empty when equal)."""
        out = []
        for attr in ("channels", "climate_variables", "months", "patch_size", "pixel_size_m"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                if isinstance(a, tuple):
                    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
                    out.append(f"{attr}: only in first {only_a}, only in second {only_b}")
                else:
                    out.append(f"{attr}: {a} != {b}")
        return out

    def to_dict(self) -> dict:
        return {
            "channels": list(self.channels),
            "climate_variables": list(self.climate_variables),
            "months": list(self.months),
            "patch_size": self.patch_size,
            "pixel_size_m": self.pixel_size_m,
        }

    @classmethod
    def from_dict(cls, d: dict) -> SampleSchema:
        return cls(
            channels=tuple(d["channels"]),
            climate_variables=tuple(d["climate_variables"]),
            months=tuple(d["months"]),
            patch_size=int(d["patch_size"]),
            pixel_size_m=float(d["pixel_size_m"]),
        )

    def check_image(self, image: np.ndarray, where: str = "image") -> None:
        if tuple(image.shape) != self.image_shape:
            raise SchemaError(f"{where}: shape {tuple(image.shape)} != schema image shape {self.image_shape}")

    def check_climate(self, climate: np.ndarray, where: str = "climate") -> None:
        if tuple(climate.shape) != self.climate_shape:
            raise SchemaError(f"{where}: shape {tuple(climate.shape)} != schema climate shape {self.climate_shape}")


def normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(a - b) / (a + b)``, with 0 where ``a + b == 0``."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    total = a + b
    with np.errstate(divide="ignore", invalid="ignore"):
        nd = np.where(total != 0, (a - b) / total, 0.0)
    return nd.astype(np.float32)


def compute_indices(reflectance: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The schema's spectral indices in ``names`` from a dict of ``SR_B*`` reflectance arrays."""
    out = {}
    for name in names:
        ch = CHANNELS_BY_NAME[name]
        if ch.kind == "index" and ch.bands is not None:
            a, b = ch.bands
            out[name] = normalized_difference(reflectance[a], reflectance[b])
    return out

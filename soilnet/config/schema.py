"""The config section that picks a :class:`~soilnet.schema.SampleSchema` by name."""

from __future__ import annotations

from pydantic import ValidationInfo, field_validator

from soilnet.config.base import Section
from soilnet.schema import (
    CHANNELS_BY_NAME,
    CLIMATE_BY_NAME,
    DEFAULT_FIRST_MONTH,
    DEFAULT_LAST_MONTH,
    PATCH_SIZE,
    PIXEL_SIZE_M,
    SampleSchema,
    check_names,
    month_range,
)

# field -> (what its names are, in messages; the names the schema knows)
NAMED: dict[str, tuple[str, dict]] = {
    "channels": ("channels", CHANNELS_BY_NAME),
    "climate_variables": ("climate variables", CLIMATE_BY_NAME),
}


class SchemaConfig(Section):
    """Channels and climate variables by name (``null`` = all of the schema's), and the month range."""

    channels: list[str] | None = None
    climate_variables: list[str] | None = None
    first_month: str = DEFAULT_FIRST_MONTH
    last_month: str = DEFAULT_LAST_MONTH
    patch_size: int = PATCH_SIZE
    pixel_size_m: float = PIXEL_SIZE_M

    @field_validator("channels", "climate_variables")
    @classmethod
    def _known_names(cls, v, info: ValidationInfo):
        if v is not None:
            kind, known = NAMED[str(info.field_name)]
            check_names(kind, tuple(v), known)
        return v

    @field_validator("first_month", "last_month")
    @classmethod
    def _month(cls, v):
        month_range(v, v)
        return v

    def build(self) -> SampleSchema:
        default = SampleSchema()
        return SampleSchema(
            channels=tuple(self.channels) if self.channels is not None else default.channels,
            climate_variables=(
                tuple(self.climate_variables) if self.climate_variables is not None else default.climate_variables
            ),
            months=month_range(self.first_month, self.last_month),
            patch_size=self.patch_size,
            pixel_size_m=self.pixel_size_m,
        )

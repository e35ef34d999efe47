"""The config section that picks a :class:`~soilnet.schema.SampleSchema` by name."""

from __future__ import annotations

from pydantic import field_validator

from soilnet import schema as S
from soilnet.config.base import Section


class SchemaConfig(Section):
    """Channels and climate variables by name (``null`` = all of the schema's), and the month range."""

    channels: list[str] | None = None
    climate_variables: list[str] | None = None
    first_month: str = S.DEFAULT_FIRST_MONTH
    last_month: str = S.DEFAULT_LAST_MONTH
    patch_size: int = S.PATCH_SIZE
    pixel_size_m: float = S.PIXEL_SIZE_M

    @field_validator("channels")
    @classmethod
    def _known_channels(cls, v):
        if v is not None:
            S._check_names("channels", tuple(v), S.CHANNELS_BY_NAME)
        return v

    @field_validator("climate_variables")
    @classmethod
    def _known_variables(cls, v):
        if v is not None:
            S._check_names("climate variables", tuple(v), S.CLIMATE_BY_NAME)
        return v

    @field_validator("first_month", "last_month")
    @classmethod
    def _month(cls, v):
        S.month_range(v, v)
        return v

    def build(self) -> S.SampleSchema:
        default = S.SampleSchema()
        return S.SampleSchema(
            channels=tuple(self.channels) if self.channels is not None else default.channels,
            climate_variables=(
                tuple(self.climate_variables) if self.climate_variables is not None else default.climate_variables
            ),
            months=S.month_range(self.first_month, self.last_month),
            patch_size=self.patch_size,
            pixel_size_m=self.pixel_size_m,
        )

"""The sample schema: channel definitions, subsets by name, months and shapes."""

from __future__ import annotations

import numpy as np
import pytest

from soilnet.schema import CHANNELS_BY_NAME, SampleSchema, SchemaError, compute_indices, month_range


def test_default_schema_has_the_papers_channels_variables_and_months():
    s = SampleSchema()
    assert s.channels[:7] == tuple(f"SR_B{i}" for i in range(1, 8))
    assert s.channels[7:] == (
        "clayIndex",
        "ferrousIndex",
        "carbonateIndex",
        "rockOutcropIndex",
        "NDVI",
        "elevation",
        "slope",
    )
    assert s.climate_variables == tuple("aet def pdsi pet pr ro soil srad swe tmmn tmmx vap vpd vs".split())
    assert s.n_months == 61 and s.months[0] == "2010-01" and s.months[-1] == "2015-01"
    assert s.image_shape == (14, 64, 64) and s.climate_shape == (61, 14)
    assert s.pixel_size_m == 30.0


@pytest.mark.parametrize(
    "name, a, b",
    [
        ("clayIndex", "SR_B6", "SR_B7"),
        ("ferrousIndex", "SR_B6", "SR_B5"),
        ("carbonateIndex", "SR_B4", "SR_B3"),
        ("rockOutcropIndex", "SR_B6", "SR_B3"),
        ("NDVI", "SR_B5", "SR_B4"),
    ],
)
def test_indices_are_the_documented_normalised_differences(name, a, b):
    assert CHANNELS_BY_NAME[name].bands == (a, b)
    rng = np.random.default_rng(0)
    refl = {f"SR_B{i}": rng.uniform(0.01, 0.5, (4, 4)).astype(np.float32) for i in range(1, 8)}
    got = compute_indices(refl, (name,))[name]
    np.testing.assert_allclose(got, (refl[a] - refl[b]) / (refl[a] + refl[b]), rtol=1e-6)


def test_subsets_are_chosen_by_name_and_kept_in_canonical_order():
    s = SampleSchema(channels=("NDVI", "SR_B1"), climate_variables=("vs", "aet"))
    assert s.channels == ("SR_B1", "NDVI")
    assert s.climate_variables == ("aet", "vs")
    full = SampleSchema()
    assert full.channel_indices(["NDVI", "SR_B1"]) == [11, 0]
    assert s.subset_of(full) and not full.subset_of(s)


def test_unknown_or_missing_names_are_errors_that_name_them():
    with pytest.raises(SchemaError, match="NDWI"):
        SampleSchema(channels=("SR_B1", "NDWI"))
    twelve = SampleSchema(channels=tuple(c for c in SampleSchema().channels if c not in ("elevation", "slope")))
    with pytest.raises(SchemaError, match="elevation"):
        twelve.channel_indices(["elevation"])


def test_month_range_and_schema_round_trip():
    assert month_range("2014-11", "2015-02") == ("2014-11", "2014-12", "2015-01", "2015-02")
    with pytest.raises(SchemaError):
        month_range("2015-02", "2014-11")
    s = SampleSchema(climate_variables=("aet", "pr"), months=month_range("2012-01", "2012-12"))
    assert SampleSchema.from_dict(s.to_dict()) == s
    assert SampleSchema().differences(s)  # non-empty, names what differs

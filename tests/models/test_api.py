"""The model API: whole models built from a config by registry name, sized by the schema."""

import pytest
import torch

from soilnet.config.model import ComponentConfig, ModelConfig
from soilnet.models import build_contrastive_model, build_regression_model, names
from soilnet.schema import SampleSchema, month_range


@pytest.mark.parametrize("modalities", ["both", "image", "climate"])
def test_regression_model_shapes_for_each_modality(modalities):
    schema = SampleSchema(channels=("SR_B1", "NDVI", "elevation"), months=month_range("2014-01", "2014-12"))
    model = build_regression_model(ModelConfig(), schema, modalities)
    image = torch.randn(3, 3, 64, 64) if modalities != "climate" else None
    climate = torch.randn(3, 12, 14) if modalities != "image" else None
    assert model(image, climate).shape == (3, 1)
    assert (model.image_encoder is None) == (modalities == "climate")
    assert (model.climate_encoder is None) == (modalities == "image")


def test_contrastive_model_projects_both_modalities_to_one_size():
    schema = SampleSchema()
    model = build_contrastive_model(ModelConfig(projection_dim=16), schema)
    z_img, z_clim = model(torch.randn(4, *schema.image_shape), torch.randn(4, *schema.climate_shape))
    assert z_img.shape == z_clim.shape == (4, 16)


def test_unknown_name_lists_the_known_ones():
    cfg = ModelConfig(image_encoder=ComponentConfig(name="resnet9000"))
    with pytest.raises(ValueError, match="tiny_cnn"):
        build_contrastive_model(cfg, SampleSchema())
    assert "regressor_v1" in names("regressor")


def test_mismatched_embeddings_without_projection_are_an_error():
    cfg = ModelConfig(
        image_encoder=ComponentConfig(name="tiny_cnn", kwargs={"out": 8}),
        climate_encoder=ComponentConfig(name="tiny_gru", kwargs={"out": 16}),
        projection_dim=None,
    )
    with pytest.raises(ValueError, match="projection_dim"):
        build_contrastive_model(cfg, SampleSchema())

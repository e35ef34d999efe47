"""Config of ``soilnet finetune`` and ``soilnet evaluate``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from soilnet.config.base import Section
from soilnet.config.model import ModelConfig, lift_model_file_schema
from soilnet.config.schema import SchemaConfig


class GroundTruthConfig(Section):
    """A ground-truth CSV joined onto the shards by point ID; its target replaces the shards' own.

    LUCAS 2015: ``id_column: Point_ID``, ``target_column: OC`` (g/kg; the file starts with a UTF-8 BOM, which
    ``utf-8-sig`` removes). RaCA: ``id_column: rcasiteid``, ``target_column: SOCstock100``.
    """

    path: str
    id_column: str
    target_column: str
    lon_column: str | None = None
    lat_column: str | None = None
    encoding: str = "utf-8-sig"


class FinetuneDataConfig(Section):
    """``shards``: a labelled shard folder (or its manifest.json). ``schema`` picks channels/variables by name
    (null = all that the shards hold). ``target`` names the label in each sample's ``meta.json`` ``targets``.

    ``normalisation``: the per-channel / per-variable mean and std inputs are scaled with. ``pretrained`` (with a
    ``pretrained`` export): the pretraining shards' statistics recorded in the export, so the encoders see inputs
    scaled as in pretraining; an export without them falls back to ``data`` with a warning in the report.
    ``data``: the fine-tuning shards' own statistics (always, without an export)."""

    shards: str = "outputs/labelled"
    schema_: SchemaConfig = Field(default_factory=SchemaConfig, alias="schema")
    target: str = "soc"
    ground_truth: GroundTruthConfig | None = None
    use_coordinates: bool = True
    normalisation: Literal["pretrained", "data"] = "pretrained"


class TargetConfig(Section):
    """How targets are transformed for training (metrics are always in original units).

    ``scale`` is the seed's ``y / max_value`` with ``max_value`` 87 (LUCAS OC, g/kg) or 4115 (RaCA
    SOCstock100); ``log1p`` trains on ``log(1 + y)``; ``none`` on ``y``. The result is then standardised with
    the training fold's moments (except under the RMSLE loss, which needs non-negative targets).

    ``max_value``, when set (any transform), bounds the targets: one above it is an error (``out_of_range:
    error``) or left out and listed in the report (``drop``); never clipped. ``bias_correction: smearing``
    multiplies the ``log1p`` back-transform by Duan's smearing factor (:mod:`soilnet.train.targets`), for the
    model and the random forest alike.
    """

    transform: Literal["scale", "log1p", "none"] = "log1p"
    max_value: float | None = None
    out_of_range: Literal["error", "drop"] = "error"
    bias_correction: Literal["none", "smearing"] = "none"

    @model_validator(mode="after")
    def _needs_max(self):
        if self.transform == "scale" and (self.max_value is None or self.max_value <= 0):
            raise ValueError("target.transform=scale needs a positive target.max_value (87 LUCAS, 4115 RaCA)")
        if self.bias_correction == "smearing" and self.transform != "log1p":
            raise ValueError(
                f"target.bias_correction=smearing corrects the back-transform of target.transform=log1p; "
                f"transform={self.transform} has no retransformation bias (use bias_correction=none)"
            )
        return self


class FinetuneTrainConfig(Section):
    """Optimisation. ``encoders``: ``frozen`` (only the regressor learns), ``full``, or ``lrd`` (layer-wise LR
    decay: the regressor gets ``lr``, the encoder layer ``d`` below the top gets ``lr * layer_decay ** d``)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    loss: Literal["rmse", "mse", "huber", "rmsle"] = "rmse"
    huber_delta: float = 1.0
    encoders: Literal["frozen", "full", "lrd"] = "full"
    layer_decay: float = 0.75
    patience: int = 5
    # the validation score that picks the epoch kept and stops training: RMSE in the target's original units, or
    # the training loss in the transformed space (with log1p: log units, where a skewed target's R² is judged)
    early_stopping: Literal["val_rmse", "val_loss"] = "val_rmse"
    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    label_fraction: float = Field(
        default=1.0, gt=0, le=1
    )  # share of each fold's labelled non-test points used (few-label studies)
    threads: int | None = None  # torch CPU threads; 1 is fastest for the tiny models on a busy node
    device: Literal["auto", "cpu", "cuda"] = "auto"
    augment: bool = True
    # TensorBoard logs per fold (losses, validation RMSE, learning rates) under output_dir/tensorboard/fold<k> and
    # final, as pretraining's train.tensorboard
    tensorboard: bool = True


class SplitConfig(Section):
    """``auto`` = spatial when every point has coordinates, random otherwise (the report says which)."""

    kind: Literal["auto", "random", "spatial"] = "auto"
    folds: int = Field(default=5, ge=2)
    block_km: float = Field(default=50.0, gt=0)
    buffer_km: float | None = None
    seed: int = 0


class ConformalConfig(Section):
    """Split-conformal intervals at ``level``; ``space: log`` makes them multiplicative (wider for high SOC)."""

    level: float = Field(default=0.9, gt=0, lt=1)
    space: Literal["original", "log"] = "original"
    calibration_fraction: float = Field(default=0.15, gt=0, lt=1)


class BaselineConfig(Section):
    enabled: bool = True
    n_estimators: int = 200
    min_samples_leaf: int = 1


class EvalConfig(Section):
    split: SplitConfig = SplitConfig()
    conformal: ConformalConfig = ConformalConfig()
    baseline: BaselineConfig = BaselineConfig()
    plots: bool = True


class FinetuneConfig(Section):
    """``pretrained``: a ``soilnet export`` .safetensors (encoders), or null to train from scratch.

    ``final_model``: after cross-validation, also fit one model on all labelled points and save it as
    ``output_dir/model.safetensors`` for ``soilnet predict-map``.
    """

    output_dir: str = "outputs/finetune"
    pretrained: str | None = None
    modalities: Literal["image", "climate", "both"] = "both"
    data: FinetuneDataConfig = FinetuneDataConfig()
    model: ModelConfig = ModelConfig()
    target: TargetConfig = TargetConfig()
    train: FinetuneTrainConfig = FinetuneTrainConfig()
    eval: EvalConfig = EvalConfig()
    final_model: bool = True

    @model_validator(mode="before")
    @classmethod
    def _model_file_schema(cls, tree: Any) -> Any:
        """An included model file's top-level ``schema`` is the data schema (:func:`lift_model_file_schema`)."""
        return lift_model_file_schema(tree)

    @model_validator(mode="after")
    def _relu_output_needs_nonnegative_targets(self):
        r = self.model.regressor
        if r.name == "regressor_v2" and r.kwargs.get("relu_output", True) and self.train.loss != "rmsle":
            raise ValueError(
                "model.regressor regressor_v2 ends in the seed's ReLU, which cannot output the negative values of "
                "standardised targets (every train.loss but rmsle standardises): set "
                "model.regressor.kwargs.relu_output=false, or train.loss=rmsle"
            )
        return self


class EvaluateConfig(FinetuneConfig):
    """Evaluation reads the same tree as fine-tuning, so a run's resolved config re-evaluates it.

    With ``checkpoint`` (a fine-tuning ``output_dir``), the saved model is scored on every point of
    ``data.shards`` (an independent test set); without it, cross-validation runs as in fine-tuning.
    """

    checkpoint: str | None = None
    final_model: bool = False

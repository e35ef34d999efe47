"""``report.md``: the metrics tables (model beside the baseline), intervals, data counts, and the resolved
config, in one Markdown file a reviewer can read without running anything."""

from __future__ import annotations

from pathlib import Path

import yaml

from soilnet.atomic import write_text
from soilnet.evaluate.metrics import METRIC_NAMES

LABELS = {
    "rmse": "RMSE",
    "mae": "MAE",
    "r2": "R²",
    "bias": "bias",
    "rpiq": "RPIQ",
    "ccc": "CCC",
    "log_rmse": "logRMSE",
    "log_r2": "logR²",
    "n": "n",
}


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return f"{v:.4g}"


def _metric_table(rows: list[tuple[str, dict | None]]) -> list[str]:
    lines = ["| | " + " | ".join(LABELS[m] for m in METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    for name, m in rows:
        if m:
            lines.append(f"| {name} | " + " | ".join(_fmt(m.get(k)) for k in METRIC_NAMES) + " |")
    return lines


def _identical_inputs(split: dict) -> list[str]:
    g = split.get("identical_inputs")
    if not g:
        return []
    how = (
        "each group is kept on one side of every split (folds, validation and calibration parts)"
        if split.get("kind") == "random"
        else "spatial blocks and buffers keep co-located twins apart from test points; validation and calibration "
        "parts are carved by whole blocks and buffered like the test fold"
    )
    return [
        "",
        f"**Identical inputs:** {g['groups_with_identical_inputs']} groups of points share identical inputs "
        f"({g['points_in_them']} points, the largest group {g['largest_group']}); {how}.",
    ]


def _transforms(metrics: dict) -> list[str]:
    """Which target transform model and forest learnt, and the bias with and without the back-transform's
    correction."""
    tr = metrics.get("transforms")
    if not tr:
        return []
    m, rf = tr.get("model") or {}, tr.get("baseline_rf")
    line = f"The model learns {m.get('transform')} of the target (bias correction: {m.get('bias_correction')})"
    if rf:
        line += f"; the forest learns {rf.get('transform')} (bias correction: {rf.get('bias_correction')})"
    out = ["", line + ". Both are back-transformed to original units before any metric."]
    bc = metrics.get("bias_correction")
    if bc:
        out += ["", f"Bias = mean(pred − obs), {bc['method']}:", ""]
        out += ["| | bias without correction | bias with correction | smearing factor per fold |", "|---|---|---|---|"]
        for who, name in (("model", "model"), ("baseline_rf", "random forest")):
            if bc.get(who):
                b = bc[who]
                factors = ", ".join(f"{s:.4g}" for s in b["smearing_by_fold"])
                out.append(f"| {name} | {_fmt(b['bias_uncorrected'])} | {_fmt(b['bias_corrected'])} | {factors} |")
    return out


def _above_max(d: dict, t: dict) -> list[str]:
    dropped = d.get("above_max_value")
    if not dropped:
        return []
    listed = ", ".join(f"{x['id']} ({_fmt(x['value'])})" for x in dropped)
    return [
        f"- {len(dropped)} points above target.max_value={_fmt(t.get('max_value'))} left out "
        f"(target.out_of_range=drop): {listed}"
    ]


def _header(metrics: dict, unit: str) -> list[str]:
    t, split = metrics.get("target", {}), metrics.get("split", {})
    return [
        "# SOC evaluation report",
        "",
        f"Target `{t.get('name')}` ({unit}); metrics in original units, pooled over all test predictions "
        "(never averaged per batch). logRMSE and logR² compare `log1p` of observed and predicted. "
        "RPIQ = IQR(observed) / RMSE. CCC is Lin's concordance correlation coefficient. Bias = mean(pred − obs).",
        "",
        f"**Split:** {split.get('note', split.get('kind'))}.",
        *_identical_inputs(split),
        "",
        "## Pooled metrics",
        "",
    ]


def _pooled(metrics: dict) -> list[str]:
    out = _metric_table([("model", metrics.get("model")), ("random forest", metrics.get("baseline_rf"))])
    m, rf = metrics.get("model"), metrics.get("baseline_rf")
    if m and rf:
        verdict = "beats" if m["rmse"] < rf["rmse"] else "does NOT beat"
        out += ["", f"The model {verdict} the random-forest baseline on RMSE ({m['rmse']:.4g} vs {rf['rmse']:.4g})."]
        if m.get("log_r2") is not None and rf.get("log_r2") is not None:
            verdict = "beats" if m["log_r2"] > rf["log_r2"] else "does NOT beat"
            out += [f"On logR² it {verdict} it ({m['log_r2']:.4g} vs {rf['log_r2']:.4g})."]
    return out


def _folds(folds: list[dict]) -> list[str]:
    if not folds:
        return []
    out = ["", "## Per fold", ""]
    rows = []
    for f in folds:
        rows.append((f"fold {f['fold']} model", f["model"]))
        if f.get("baseline_rf"):
            rows.append((f"fold {f['fold']} RF", f["baseline_rf"]))
    out += _metric_table(rows)
    out += [
        "",
        "| fold | train | val | calibration | test | excluded by buffer | excluded by val/cal buffer | "
        "best epoch | epochs run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for f in folds:
        out.append(
            f"| {f['fold']} | {f['n_train']} | {f['n_val']} | {f['n_calibration']} | {f['n_test']} | "
            f"{f['n_excluded_by_buffer']} | {f.get('n_excluded_by_inner_buffer', 0)} | {f['best_epoch']} | "
            f"{f['epochs_run']} |"
        )
    return out


def _intervals(metrics: dict, unit: str) -> list[str]:
    c = metrics.get("conformal")
    if not c:
        return []
    out = ["", "## Prediction intervals", ""]
    out += [
        f"Split-conformal intervals at nominal level {c.get('level')}: empirical coverage "
        f"**{_fmt(c.get('coverage'))}**, mean width **{_fmt(c.get('mean_width'))} {unit}** (n={c.get('n')})."
    ]
    if metrics.get("coverage_by_level"):
        out += ["", "| nominal | coverage | mean width |", "|---|---|---|"]
        out += [
            f"| {r['level']} | {_fmt(r['coverage'])} | {_fmt(r['mean_width'])} |" for r in metrics["coverage_by_level"]
        ]
    return out


def _ground_truth(d: dict) -> list[str]:
    out = []
    if "no_ground_truth" in d and d.get("no_ground_truth"):
        out.append(f"- shard samples without a ground-truth row: {d['no_ground_truth']}")
    if "ground_truth_ids_not_in_shards" in d:
        listed = d.get("ground_truth_ids_not_in_shards_file")
        out.append(
            f"- ground-truth IDs not in the shards: {d['ground_truth_ids_not_in_shards']}"
            + (f" (listed in `{listed}`)" if listed else "")
        )
    return out


def _data(metrics: dict) -> list[str]:
    d, t = metrics.get("data", {}), metrics.get("target", {})
    out = ["", "## Data", ""]
    out += [
        f"- samples in shards: {d.get('samples_in_shards')}",
        f"- labelled and used: {d.get('labelled')}",
        f"- dropped targets: missing {d.get('missing')}, NaN {d.get('nan')}, negative {d.get('negative')}",
    ]
    out += _above_max(d, t)
    out += _ground_truth(d)
    nz = metrics.get("normalisation")
    if nz:
        out.append(f"- input normalisation: **{nz.get('used')}** statistics (requested: {nz.get('requested')})")
        out += [f"  - {kind}: {nz[kind]}" for kind in ("image", "climate") if kind in nz]
        if nz.get("warning"):
            out.append(f"- **warning:** {nz['warning']}")
    return out


def _learning_rates(metrics: dict, resolved_config: dict) -> list[str]:
    if not metrics.get("lr_groups"):
        return []
    train = resolved_config["train"]
    settings = (
        f"`train.encoders: {train['encoders']}`, `train.layer_decay: {train['layer_decay']}`, "
        f"`train.lr: {train['lr']}`; scale 0: frozen."
    )
    out = ["", "## Learning rates", "", settings, "", "| group | parameters | lr scale |", "|---|---:|---:|"]
    out += [f"| {g['name']} | {g['parameters']:,} | {g['lr_scale']:.4g} |" for g in metrics["lr_groups"]]
    return out


def _final_model(metrics: dict, unit: str) -> list[str]:
    fm = metrics.get("final_model")
    if not fm:
        return []
    return [
        "",
        "## Final model",
        "",
        f"Trained on {fm['n_train']} points (validation {fm['n_val']}), saved to "
        f"`{fm['path']}`; conformal half-width {_fmt(fm['conformal']['half_width'])} {unit} at level "
        f"{fm['conformal']['level']}.",
    ] + _area_of_applicability(fm.get("aoa"))


def _area_of_applicability(a: dict | None) -> list[str]:
    if not a:
        return []
    inside = "" if a["train_inside"] is None else f"; {a['train_inside']:.1%} of the cross-validated points are inside"
    return [
        "",
        f"Area of applicability (Meyer & Pebesma 2021) saved to `{a['path']}`: {a['features']} input features, "
        f"DI threshold {_fmt(a['threshold'])} from the cross-validation{inside}.",
    ]


def _plots_and_config(metrics: dict, resolved_config: dict) -> list[str]:
    out = []
    if metrics.get("plots"):
        out += ["", "## Plots", ""]
        out += [f"- {k}: ![{k}]({Path(v).name})" for k, v in metrics["plots"].items()]
    return out + [
        "",
        "## Resolved config",
        "",
        "```yaml",
        yaml.safe_dump(resolved_config, sort_keys=False).rstrip(),
        "```",
        "",
    ]


def report_text(metrics: dict, resolved_config: dict) -> str:
    """``report.md``'s Markdown."""
    unit = metrics.get("target", {}).get("unit") or ""
    out = _header(metrics, unit) + _pooled(metrics)
    out += _transforms(metrics)
    out += _folds(metrics.get("folds") or [])
    out += _intervals(metrics, unit)
    out += _data(metrics)
    out += _learning_rates(metrics, resolved_config)
    out += _final_model(metrics, unit)
    out += _plots_and_config(metrics, resolved_config)
    return "\n".join(out)


def write_report(path: Path, metrics: dict, resolved_config: dict) -> Path:
    """Write ``report.md`` atomically and return its path."""
    write_text(path, report_text(metrics, resolved_config))
    return path

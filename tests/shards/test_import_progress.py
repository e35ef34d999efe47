"""``import-soilnet`` in a log (stderr not a terminal): its samples done of the total, a rate and an ETA."""

from __future__ import annotations

import argparse
import re

import pandas as pd

from shards.import_soilnet import run_cli


def test_import_reports_its_samples(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SOILNET_PROGRESS_S", "0")
    climate = tmp_path / "climate"
    climate.mkdir()
    ids = [f"P{i}" for i in range(5)]
    months = {f"2010{m:02d}01": [float(m + i) for i in range(5)] for m in range(1, 13)}
    pd.DataFrame({"Point_ID": ids, **months}).to_csv(climate / "pr.csv", index=False)
    points = tmp_path / "points.csv"
    pd.DataFrame({"Point_ID": ids, "lon": [10.0 + i for i in range(5)], "lat": [45.0] * 5}).to_csv(points, index=False)
    args = argparse.Namespace(
        images=None,
        climate=str(climate),
        points=str(points),
        id_column="Point_ID",
        target_column=None,
        target_name=None,
        lon_column=None,
        lat_column=None,
        out=str(tmp_path / "out"),
        max_samples=2,
        climate_units="stored",
        require_target=False,
    )
    assert run_cli(args) == 0
    err = capsys.readouterr().err
    done = [
        int(m[1])
        for m in re.finditer(r"^import-soilnet: (\d)/5 samples \(\d+%\), [\d.e+-]+ samples/s, ETA ", err, re.M)
    ]
    assert done == [1, 2, 3, 4, 5]
    assert "import-soilnet: finished 5/5 samples (100%) in " in err

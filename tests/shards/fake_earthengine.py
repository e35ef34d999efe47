"""A fake Earth Engine REST service for tests and benchmarks: the real ``earthengine-api`` client talks to it over
HTTP, so the production code path is the one that talks to Google; only ``source.earthengine.url`` differs.

It serves what the client needs and checks every request it is sent:

- ``POST /token``: the OAuth2 JWT-bearer exchange of a service account; the assertion's signature is verified
  against the test key, and an access token comes back (or ``invalid_grant`` when ``reject_auth`` is set);
- ``GET /$discovery/rest``: the client library's own copy of the Earth Engine discovery document;
- ``GET .../algorithms``: the client library's own copy of the algorithm list;
- ``POST .../value:compute``: the scene table and TerraClimate series of a point;
- ``POST .../image:computePixels``, three kinds, told apart by the collections the expression loads:

  - ``patch`` (one scene, ``Image.load``): the raw Landsat bands, elevation and slope on a point's UTM patch grid;
  - ``tile`` (``ImageCollection.load`` of Landsat): the map's tile path, a window's winter composite on the
    window's own grid, from :attr:`FakeEarthEngine.composite_for` evaluated at every pixel's centre;
  - ``climate`` (TerraClimate only): the months x variables on TerraClimate's 1/24 degree grid, from
    :attr:`FakeEarthEngine.climate_for` at every pixel's centre, masked values as the expression's unmask value.

Each API call must carry the access token. The expression graphs are walked: collection IDs, selected bands,
date ranges, winter months, QA masking, reducers, casts, grid, scale and CRS are checked against what the
config implies, and any mismatch becomes a 400 answer and an entry in ``violations``. As Earth Engine does, a
``computePixels`` beyond 48 MiB of uncompressed pixels, 32768 pixels a side or 1024 bands is refused with 400 (and
counted as a violation: the client should have split it). Every answered call is recorded in ``calls`` with its
``kind`` (``value``, ``pixels`` for a patch, ``tile``, ``climate``, ``fault``) and, for the grid requests, its
grid. ``latency_s`` delays every API answer; ``faults`` is a queue of HTTP statuses (429, 503...) answered
instead of the next calls, ``fault_on_call`` a status answered instead of the n-th API call (0-based);
``max_in_flight`` records the peak of concurrent ``value:compute`` and ``computePixels`` calls.
"""

from __future__ import annotations

import functools
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import ee
import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import jwt
from loopback import LoopbackService
from pyproj import CRS, Transformer

EE_DIR = Path(ee.__file__).parent
LANDSAT = "LANDSAT/LC08/C02/T1_L2"
DEM = "COPERNICUS/DEM/GLO30"
TERRACLIMATE = "IDAHO_EPSCOR/TERRACLIMATE"
SR_BANDS = [f"SR_B{i}" for i in range(1, 8)]
TOKEN = "fake-access-token"
# Earth Engine's computePixels limits (REST reference): uncompressed bytes, pixels a side, bands.
MAX_BYTES, MAX_SIDE, MAX_BANDS = 48 * 2**20, 32768, 1024
TERRACLIMATE_DEG = 1 / 24


def make_service_account_key(path: Path, token_uri: str, email: str = "packer@soil-project.iam.gserviceaccount.com"):
    """Write a service-account JSON key with a fresh RSA key; returns the PEM public key (to verify JWTs)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "soil-project",
                "private_key_id": "k1",
                "private_key": private,
                "client_email": email,
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )
    return public


def expression_nodes(expression: dict) -> list[dict]:
    """Every ``functionInvocationValue`` of a serialized expression graph (references resolved)."""
    values, out, seen = expression["values"], [], set()

    def visit(node):
        if isinstance(node, dict):
            if "valueReference" in node:
                ref = node["valueReference"]
                if ref not in seen:
                    seen.add(ref)
                    visit(values[ref])
                return
            if "functionInvocationValue" in node:
                out.append(node["functionInvocationValue"])
            if "functionDefinitionValue" in node:  # a mapped function's body is a key into ``values``
                visit({"valueReference": node["functionDefinitionValue"]["body"]})
            for v in node.values():
                visit(v)
        elif isinstance(node, list):
            for v in node:
                visit(v)

    visit(values[expression["result"]])
    return out


def constant(node, values: dict):
    """The plain value of an argument node (constant, reference to a constant, or array of them)."""
    if "valueReference" in node:
        return constant(values[node["valueReference"]], values)
    if "constantValue" in node:
        return node["constantValue"]
    if "arrayValue" in node:
        return [constant(v, values) for v in node["arrayValue"]["values"]]
    if "functionInvocationValue" in node:
        return node["functionInvocationValue"]
    return node


class FakeEarthEngine(LoopbackService):
    """Start with ``with FakeEarthEngine(...) as fake:``; ``fake.url`` goes into ``source.earthengine.url``."""

    def __init__(
        self,
        public_key: str,
        year: int,
        months: tuple[str, ...],
        variables: tuple[str, ...],
        patch_size: int = 64,
        pixel_size_m: float = 30.0,
        latency_s: float = 0.0,
        winter_months: tuple[int, ...] = (12, 1, 2),
    ):
        self.public_key, self.year, self.months, self.variables = public_key, year, months, variables
        self.patch_size, self.pixel_size_m, self.latency_s = patch_size, pixel_size_m, latency_s
        self.winter_months = winter_months
        self.expect_crs: str | None = None  # when set, a tile request's grid must be in this CRS (pyproj-equal)
        self.reject_auth = False
        self.faults: list[int] = []
        self.fault_on_call: dict[int, int] = {}  # API call number (0-based, in order received) -> HTTP status
        self.received = 0
        self.violations: list[str] = []
        self.calls: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.tokens_issued = 0
        self.first_call_s = self.last_answer_s = None  # time.monotonic() of the first API call and last answer
        self.answer_s = 0.0  # summed time from receiving an API call to answering it, injected latency included
        self._lock = threading.Lock()
        self.scenes_for = default_scenes
        self.climate_for = default_climate
        self.pixels_for = default_pixels
        self.composite_for = default_composite

    # -- lifecycle -------------------------------------------------------------------------------------------

    # -- HTTP ------------------------------------------------------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(req.path)
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        if url.path == "/token":
            return self.token(req, body)
        if url.path == "/stats":  # for a benchmark that runs this fake in its own process
            stats = {
                "max_in_flight": self.max_in_flight,
                "calls": len(self.calls),
                "violations": self.violations,
                "first_call_s": self.first_call_s,
                "last_answer_s": self.last_answer_s,
                "mean_answer_s": self.answer_s / max(1, len(self.calls)),
            }
            return reply(req, 200, json.dumps(stats).encode())
        if url.path.endswith("/$discovery/rest"):
            doc = json.loads((EE_DIR / "tests" / "cloud_api_discovery_document.json").read_text())
            doc["rootUrl"] = doc["baseUrl"] = self.url + "/"
            return reply(req, 200, json.dumps(doc).encode())
        if req.headers.get("Authorization") != f"Bearer {TOKEN}":
            return reply(req, 401, error(401, "request without the issued access token"))
        if url.path.endswith("/algorithms"):  # once per process, at ee.Initialize: not a packing request
            return reply(req, 200, (EE_DIR / "tests" / "algorithms.json").read_bytes())
        received = time.monotonic()
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            fault = self.faults.pop(0) if self.faults else self.fault_on_call.get(self.received)
            self.received += 1
            self.first_call_s = self.first_call_s or time.monotonic()
        try:
            time.sleep(self.latency_s)
            if fault is not None:
                self.calls.append({"kind": "fault", "status": fault})
                return reply(req, fault, error(fault, f"injected HTTP {fault}"))
            try:
                if url.path.endswith("/value:compute"):
                    return reply(req, 200, json.dumps({"result": self.compute_value(json.loads(body))}).encode())
                if url.path.endswith("/image:computePixels"):
                    return reply(req, 200, self.compute_pixels(json.loads(body)), "application/octet-stream")
            except AssertionError as err:
                self.violations.append(str(err))
                return reply(req, 400, error(400, f"fake Earth Engine refused the request: {err}"))
            except TooLarge as err:
                self.violations.append(str(err))
                return reply(req, 400, error(400, str(err)))
            return reply(req, 404, error(404, f"no such endpoint {url.path}"))
        finally:
            with self._lock:
                self.in_flight -= 1
                self.last_answer_s = time.monotonic()
                self.answer_s += self.last_answer_s - received

    def token(self, req: BaseHTTPRequestHandler, body: bytes) -> None:
        form = parse_qs(body.decode())
        if form.get("grant_type") != ["urn:ietf:params:oauth:grant-type:jwt-bearer"] or self.reject_auth:
            refusal = {"error": "invalid_grant", "error_description": "Invalid grant"}
            return reply(req, 400, json.dumps(refusal).encode())
        try:
            claims = jwt.decode(
                form["assertion"][0], certs=self.public_key, audience="https://oauth2.googleapis.com/token"
            )
        except ValueError as err:
            return reply(req, 400, json.dumps({"error": "invalid_grant", "error_description": str(err)}).encode())
        assert "earthengine" in claims.get("scope", ""), claims
        self.tokens_issued += 1
        return reply(req, 200, json.dumps({"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"}).encode())

    # -- the two API calls -----------------------------------------------------------------------------------

    def compute_value(self, body: dict) -> dict:
        expr = body["expression"]
        nodes = expression_nodes(expr)
        loads = sorted(
            {
                constant(n["arguments"]["id"], expr["values"])
                for n in nodes
                if n["functionName"] == "ImageCollection.load"
            }
        )
        assert loads == sorted([LANDSAT, "IDAHO_EPSCOR/TERRACLIMATE"]), f"collections {loads}"
        ranges = {
            tuple(constant(n["arguments"][k], expr["values"]) for k in ("start", "end"))
            for n in nodes
            if n["functionName"] == "DateRange"
        }
        year = (f"{self.year}-01-01", f"{self.year + 1}-01-01")
        y, m = (int(v) for v in self.months[-1].split("-"))
        climate = (f"{self.months[0]}-01", f"{y + m // 12:04d}-{m % 12 + 1:02d}-01")
        assert ranges == {year, climate}, f"date ranges {sorted(ranges)}, expected {year} and {climate}"
        selected = [
            constant(n["arguments"]["bandSelectors"], expr["values"])
            for n in nodes
            if n["functionName"] == "Image.select"
        ]
        assert list(self.variables) in selected, f"TerraClimate bands {selected}"
        assert any(n["functionName"] == "Image.bitwiseAnd" for n in nodes), "no QA_PIXEL mask"
        assert ["QA_PIXEL"] in selected and ["QA_RADSAT"] in selected, f"QA bands {selected}"
        points = [
            constant(n["arguments"]["coordinates"], expr["values"])
            for n in nodes
            if n["functionName"] == "GeometryConstructors.Point"
        ]
        assert points, "no point geometry"
        lon, lat = points[0]
        self.calls.append({"kind": "value", "lon": lon, "lat": lat})
        return {
            "scenes": {
                "type": "FeatureCollection",
                "features": [
                    {"type": "Feature", "geometry": None, "id": s["id"], "properties": s}
                    for s in self.scenes_for(lon, lat, self.year)
                ],
            },
            "climate": self.climate_for(lon, lat, self.months, self.variables),
        }

    def compute_pixels(self, body: dict) -> bytes:
        """Dispatch on the collections the expression loads: a scene's patch, a tile's composite or the climate."""
        expr = body["expression"]
        nodes = expression_nodes(expr)
        assert body.get("fileFormat") == "NPY", f"fileFormat {body.get('fileFormat')}"
        loads = {constant(n["arguments"]["id"], expr["values"]) for n in nodes if n["functionName"].endswith(".load")}
        if LANDSAT in loads:
            out = self.tile_pixels(body, nodes)
        elif loads == {TERRACLIMATE}:
            out = self.climate_pixels(body, nodes)
        else:
            out = self.patch_pixels(body, nodes)
        buf = io.BytesIO()
        np.save(buf, out)
        return buf.getvalue()

    def patch_pixels(self, body: dict, nodes: list[dict]) -> np.ndarray:
        expr, grid = body["expression"], body["grid"]
        assert grid["dimensions"] == {"width": self.patch_size, "height": self.patch_size}, f"grid {grid}"
        t = grid["affineTransform"]
        assert (t["scaleX"], t.get("scaleY"), t.get("shearX", 0), t.get("shearY", 0)) == (
            self.pixel_size_m,
            -self.pixel_size_m,
            0,
            0,
        ), f"affine transform {t}"
        crs = grid["crsCode"]
        half = self.patch_size * self.pixel_size_m / 2
        lon, lat = to_lonlat(crs).transform(t["translateX"] + half, t["translateY"] - half)
        zone = min(int((lon + 180) // 6) + 1, 60)
        assert crs == f"EPSG:{(32600 if lat >= 0 else 32700) + zone}", f"{crs} is not the UTM zone of {lon}, {lat}"
        images = [constant(n["arguments"]["id"], expr["values"]) for n in nodes if n["functionName"] == "Image.load"]
        scenes = [i for i in images if i.startswith(LANDSAT + "/")]
        assert len(scenes) == 1, f"Landsat images {images}"
        dem = [
            constant(n["arguments"]["id"], expr["values"]) for n in nodes if n["functionName"] == "ImageCollection.load"
        ]
        assert dem == ["COPERNICUS/DEM/GLO30"], f"DEM collection {dem}"
        assert any(n["functionName"] == "Terrain.slope" for n in nodes), "no slope"
        bands = [*SR_BANDS, "QA_PIXEL", "QA_RADSAT", "elevation", "slope"]
        assert body.get("bandIds") == bands, f"bandIds {body.get('bandIds')}"
        scene = scenes[0].rsplit("/", 1)[1]
        out = self.pixels_for(scene, lon, lat, self.patch_size)
        check_size(grid, bands, out.dtype)
        self.calls.append({"kind": "pixels", "lon": lon, "lat": lat, "scene": scene, "crs": crs})
        return out

    def tile_pixels(self, body: dict, nodes: list[dict]) -> np.ndarray:
        """The tile path's winter composite on the window's grid: every filter, mask, reducer and cast checked."""
        expr, grid = body["expression"], body["grid"]
        values = expr["values"]
        names = [n["functionName"] for n in nodes]
        loads = sorted(constant(n["arguments"]["id"], values) for n in nodes if n["functionName"].endswith(".load"))
        assert loads == sorted([LANDSAT, DEM]), f"collections {loads}"
        ranges = {
            tuple(constant(n["arguments"][k], values) for k in ("start", "end"))
            for n in nodes
            if n["functionName"] == "DateRange"
        }
        assert ranges == {(f"{self.year}-01-01", f"{self.year + 1}-01-01")}, f"date ranges {sorted(ranges)}"
        months = sorted(
            (constant(n["arguments"]["start"], values), constant(n["arguments"]["end"], values))
            for n in nodes
            if n["functionName"] == "Filter.calendarRange"
        )
        assert months == sorted((m, m) for m in self.winter_months), f"calendar months {months}"
        selected = [
            constant(n["arguments"]["bandSelectors"], values) for n in nodes if n["functionName"] == "Image.select"
        ]
        assert "Image.bitwiseAnd" in names and ["QA_PIXEL"] in selected and ["QA_RADSAT"] in selected, "no QA mask"
        for name in ("reduce.median", "ImageCollection.qualityMosaic", "Image.blend", "Terrain.slope"):
            assert name in names, f"no {name} in the composite"
        for cast in ("Image.toUint16", "Image.toFloat", "Image.toUint8"):
            assert cast in names, f"no {cast}: the bands' types (and the request's size) are undefined"
        assert unmask_value(nodes, values) == 0, "masked pixels must be unmasked to 0 everywhere"
        bands = [*SR_BANDS, "elevation", "slope", "valid"]
        assert body.get("bandIds") == bands, f"bandIds {body.get('bandIds')}"
        check_size(grid, bands, COMPOSITE_DTYPE)
        crs, lon, lat = self.grid_lonlat(grid)
        assert crs.is_projected, f"tile grid in {crs.name}, not a projected CRS"
        assert self.expect_crs is None or crs == CRS(self.expect_crs), f"tile grid in {crs.name}, not {self.expect_crs}"
        t = grid["affineTransform"]
        scale = (t["scaleX"], t.get("scaleY"), t.get("shearX", 0), t.get("shearY", 0))
        assert scale == (self.pixel_size_m, -self.pixel_size_m, 0, 0), f"affine transform {t}"
        (west, south, east, north), *_ = [
            constant(n["arguments"]["coordinates"], values)
            for n in nodes
            if n["functionName"] == "GeometryConstructors.Rectangle"
        ] or [(None,) * 4]
        assert (
            west is not None and west <= lon.min() and lon.max() <= east and south <= lat.min() and lat.max() <= north
        ), f"filterBounds rectangle {west, south, east, north} misses the window's pixels"
        out = self.composite_for(lon, lat)
        self.calls.append({"kind": "tile", "crs": crs.to_string(), "grid": grid})
        return out

    def climate_pixels(self, body: dict, nodes: list[dict]) -> np.ndarray:
        """TerraClimate's months x variables on its own 1/24 degree grid; masked values as the unmask value."""
        expr, grid = body["expression"], body["grid"]
        values = expr["values"]
        names = [n["functionName"] for n in nodes]
        y, m = (int(v) for v in self.months[-1].split("-"))
        window = (f"{self.months[0]}-01", f"{y + m // 12:04d}-{m % 12 + 1:02d}-01")
        ranges = {
            tuple(constant(n["arguments"][k], values) for k in ("start", "end"))
            for n in nodes
            if n["functionName"] == "DateRange"
        }
        assert ranges == {window}, f"date ranges {sorted(ranges)}, expected {window}"
        selected = [
            constant(n["arguments"]["bandSelectors"], values) for n in nodes if n["functionName"] == "Image.select"
        ]
        assert selected == [list(self.variables)], f"TerraClimate bands {selected}"
        assert "ImageCollection.toBands" in names and "Image.toInt32" in names, f"no toBands or toInt32 in {names}"
        masked = unmask_value(nodes, values)
        assert masked is not None and masked < -100000, f"masked values unmasked to {masked}, a possible raw value"
        everything = [f"{mo.replace('-', '')}_{v}" for mo in self.months for v in self.variables]
        bands = body.get("bandIds") or []
        k = everything.index(bands[0]) if bands and bands[0] in everything else -1
        assert k >= 0 and bands == everything[k : k + len(bands)], (
            f"bandIds {bands[:4]}... not in (month, variable) order"
        )
        assert grid.get("crsCode") == "EPSG:4326", f"climate grid {grid.get('crsCode') or grid.get('crsWkt')}"
        t = grid["affineTransform"]
        assert abs(t["scaleX"] - TERRACLIMATE_DEG) < 1e-12 and abs(t["scaleY"] + TERRACLIMATE_DEG) < 1e-12, f"{t}"
        for edge, origin in ((t["translateX"], -180.0), (t["translateY"], 90.0)):
            steps = (edge - origin) / TERRACLIMATE_DEG
            assert abs(steps - round(steps)) < 1e-6, f"climate grid {t} is not on TerraClimate's pixels"
        dtype = np.dtype([(b, "<i4") for b in bands])
        check_size(grid, bands, dtype)
        _, lon, lat = self.grid_lonlat(grid)
        out = np.zeros(lon.shape, dtype)
        for i, j in np.ndindex(lon.shape):
            raw = self.climate_for(float(lon[i, j]), float(lat[i, j]), self.months, self.variables)
            for b in bands:
                out[b][i, j] = masked if raw.get(b) is None else raw[b]
        self.calls.append({"kind": "climate", "grid": grid, "bands": len(bands)})
        return out

    @staticmethod
    def grid_lonlat(grid: dict) -> tuple[CRS, np.ndarray, np.ndarray]:
        """The grid's CRS and the lon/lat ``(H, W)`` of its pixels' centres."""
        crs = CRS(grid["crsCode"]) if "crsCode" in grid else CRS(grid["crsWkt"])
        t, dims = grid["affineTransform"], grid["dimensions"]
        cols, rows = np.meshgrid(np.arange(dims["width"]) + 0.5, np.arange(dims["height"]) + 0.5)
        x = t["translateX"] + cols * t["scaleX"] + rows * t.get("shearX", 0)
        y = t["translateY"] + cols * t.get("shearY", 0) + rows * t["scaleY"]
        if crs == CRS("EPSG:4326"):
            return crs, x, y
        lon, lat = to_lonlat(crs.to_wkt()).transform(x, y)
        return crs, np.asarray(lon), np.asarray(lat)


class TooLarge(Exception):
    """A computePixels beyond Earth Engine's limits (answered 400, as Earth Engine does)."""


def check_size(grid: dict, bands: list[str], dtype: np.dtype) -> None:
    """Earth Engine's computePixels limits: 48 MiB (pixels x the bytes of every band), 32768 a side, 1024 bands."""
    w, h = grid["dimensions"]["width"], grid["dimensions"]["height"]
    size = w * h * dtype.itemsize
    if size > MAX_BYTES:
        raise TooLarge(f"Total request size ({size} bytes) must be less than or equal to {MAX_BYTES} bytes.")
    if max(w, h) > MAX_SIDE or len(bands) > MAX_BANDS:
        raise TooLarge(
            f"Request of {w} x {h} pixels and {len(bands)} bands exceeds {MAX_SIDE} pixels or {MAX_BANDS} bands."
        )


def unmask_value(nodes: list[dict], values: dict):
    """The constant that the expression's outermost ``Image.unmask`` puts in masked pixels (``None`` without one);
    it must not keep the input's footprint (``sameFootprint`` false), or pixels outside it would stay masked."""
    for n in nodes:
        if n["functionName"] == "Image.unmask":
            assert constant(n["arguments"].get("sameFootprint", {"constantValue": True}), values) is False, (
                "sameFootprint"
            )
            value = constant(n["arguments"]["value"], values)
            return value["arguments"]["value"]["constantValue"] if isinstance(value, dict) else value
    return None


@functools.cache
def to_lonlat(crs: str) -> Transformer:
    return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)


# -- default world: every point has a clear winter scene and a greener summer scene ------------------------------


def default_scenes(lon: float, lat: float, year: int) -> list[dict]:
    return [
        {"id": f"LC08_195026_{year}0110", "date": f"{year}-01-10", "clear": 0.95, "ndvi": 0.30},
        {"id": f"LC08_195026_{year}0702", "date": f"{year}-07-02", "clear": 1.0, "ndvi": 0.70},
    ]


def default_climate(lon: float, lat: float, months, variables) -> dict:
    """Raw stored integers: ``100 * (month index + 1) + variable index``, and ``swe`` 0 (a true zero)."""
    return {
        f"{m.replace('-', '')}_{v}": (0 if v == "swe" else 100 * (t + 1) + f)
        for t, m in enumerate(months)
        for f, v in enumerate(variables)
    }


PIXEL_DTYPE = np.dtype(
    [*((b, "<u2") for b in SR_BANDS), ("QA_PIXEL", "<u2"), ("QA_RADSAT", "<u2"), ("elevation", "<f4"), ("slope", "<f4")]
)


def default_pixels(scene: str, lon: float, lat: float, size: int) -> np.ndarray:
    """DN ``10000 + 1000 * band`` everywhere; QA_PIXEL 21824 (clear, Landsat's value for clear land)."""
    out = np.zeros((size, size), dtype=PIXEL_DTYPE)
    for k, b in enumerate(SR_BANDS):
        out[b] = 10000 + 1000 * k
    out["QA_PIXEL"] = 21824
    out["elevation"] = 250.0 + lat
    out["slope"] = 3.5
    return out


COMPOSITE_DTYPE = np.dtype([*((b, "<u2") for b in SR_BANDS), ("elevation", "<f4"), ("slope", "<f4"), ("valid", "u1")])


def default_composite(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """A winter composite that changes within a pixel's width (30 m is 4e-4 degree): DN ``9000 + 900 * band +
    3000 sin(400 lon) cos(300 lat)``, elevation ``250 + 1000 (lat - 49) + lon``, slope ``3.5 + sin(100 lon)``; valid
    everywhere."""
    out = np.zeros(np.shape(lon), dtype=COMPOSITE_DTYPE)
    wave = 3000 * np.sin(400 * lon) * np.cos(300 * lat)
    for k, b in enumerate(SR_BANDS):
        out[b] = np.round(9000 + 900 * k + wave)
    out["elevation"] = 250 + 1000 * (lat - 49) + lon
    out["slope"] = 3.5 + np.sin(100 * lon)
    out["valid"] = 1
    return out


def reply(req: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "application/json") -> None:
    req.send_response(status)
    req.send_header("Content-Type", ctype)
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def error(status: int, message: str) -> bytes:
    return json.dumps({"error": {"code": status, "message": message, "status": "ERROR"}}).encode()


def main() -> None:
    """Serve in this process until killed: ``--key`` gets a service-account key, stdout one line, the URL."""
    import argparse

    from soilnet.schema import SampleSchema

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--latency-s", type=float, default=0.0)
    args = parser.parse_args()
    schema = SampleSchema()
    with FakeEarthEngine(None, 2015, schema.months, schema.climate_variables, latency_s=args.latency_s) as fake:
        fake.public_key = make_service_account_key(args.key, fake.url + "/token")
        print(fake.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()

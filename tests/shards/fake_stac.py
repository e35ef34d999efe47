"""A fake STAC API for tests and benchmarks: pystac-client talks to it over HTTP on loopback, so the STAC source's
production code path is the one that talks to a real catalogue; only the catalogue URL differs.

It serves the STAC API 1.0 routes a search client needs:

- ``GET /``: the landing page (``conformsTo`` core, item-search, query, filter, sort; ``search`` links for GET and
  POST); ``GET /conformance``;
- ``GET /collections``, ``GET /collections/<id>`` (404 for an unknown one), ``GET /collections/<id>/items[/<item>]``;
- ``GET /search`` and ``POST /search``: ``collections``, ``ids``, ``bbox``, ``intersects``, ``datetime`` (an
  instant or an interval, open ends ``..``), ``query`` (``eq``, ``neq``, ``lt``, ``lte``, ``gt``, ``gte``, ``in``
  on any property, e.g. ``eo:cloud_cover``), ``filter`` (CQL2-JSON: ``and``, ``or``, ``not``, comparisons,
  ``in``, ``s_intersects``), ``sortby`` and ``limit``; pages through ``next`` links (a ``token``), as the
  Planetary Computer's API does; newest first by default;
- ``GET /api/sas/v1/token/<collection>``: a shared-access token for signing asset URLs, at the Planetary
  Computer's route (only when ``sas_token`` is given).

Every search is checked (a malformed ``bbox``, ``datetime``, ``limit``, an unknown ``query`` operator or a search
without ``collections`` is answered 400 and recorded in ``violations``) and recorded in ``searches``, pages and
all, with what it matched; a test asserts, e.g., one search per group of points and the bbox and datetime sent.
``latency_s`` delays every answer; ``faults`` is a queue of HTTP statuses answered instead of the next requests.

The items look like the Planetary Computer's ``landsat-c2-l2`` (Landsat 8 Collection 2 Level-2: the asset keys
``coastal``, ``blue``, ``green``, ``red``, ``nir08``, ``swir16``, ``swir22``, ``qa_pixel``, ``qa_radsat`` with
``raster:bands`` scale and offset; ``eo:cloud_cover``, ``landsat:wrs_path``/``row``, ``proj:epsg``,
``proj:transform``, ``proj:shape``) and ``cop-dem-glo-30`` (Copernicus GLO-30, asset ``data``); their asset
hrefs point at the files the test serves (tests/shards/http_server.py).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlencode, urlparse

import shapely
import shapely.geometry
from loopback import LoopbackService

from shards.sources.landsat import SR_OFFSET, SR_SCALE

LANDSAT_COLLECTION = "landsat-c2-l2"
DEM_COLLECTION = "cop-dem-glo-30"
CLIMATE_COLLECTION = "terraclimate"
# The Planetary Computer's asset key for each band name the packer uses (Landsat 8 OLI).
LANDSAT_ASSET_KEYS = {
    "SR_B1": "coastal",
    "SR_B2": "blue",
    "SR_B3": "green",
    "SR_B4": "red",
    "SR_B5": "nir08",
    "SR_B6": "swir16",
    "SR_B7": "swir22",
    "QA_PIXEL": "qa_pixel",
    "QA_RADSAT": "qa_radsat",
}
DEM_ASSET_KEY = "data"
COG = "image/tiff; application=geotiff; profile=cloud-optimized"
CONFORMANCE = [
    "https://api.stacspec.org/v1.0.0/core",
    "https://api.stacspec.org/v1.0.0/collections",
    "https://api.stacspec.org/v1.0.0/ogcapi-features",
    "https://api.stacspec.org/v1.0.0/item-search",
    "https://api.stacspec.org/v1.0.0/item-search#query",
    "https://api.stacspec.org/v1.0.0/item-search#filter",
    "https://api.stacspec.org/v1.0.0/item-search#sort",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/core",
    "http://www.opengis.net/spec/ogcapi-features-1/1.0/conf/geojson",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/filter",
    "http://www.opengis.net/spec/ogcapi-features-3/1.0/conf/features-filter",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-cql2",
    "http://www.opengis.net/spec/cql2/1.0/conf/cql2-json",
    "http://www.opengis.net/spec/cql2/1.0/conf/basic-spatial-operators",
]
MAX_LIMIT = 1000  # the Planetary Computer's page size limit
DEFAULT_LIMIT = 10
STAC_EXTENSIONS = [
    "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "https://stac-extensions.github.io/eo/v1.1.0/schema.json",
    "https://stac-extensions.github.io/view/v1.0.0/schema.json",
    "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
    "https://landsat.usgs.gov/stac/landsat-extension/v1.1.1/schema.json",
]


class BadSearch(ValueError):
    """A search the fake refuses (400), recorded in ``violations``."""


# -- items ------------------------------------------------------------------------------------------------------


def footprint(bbox) -> dict:
    west, south, east, north = bbox
    return shapely.geometry.mapping(shapely.geometry.box(west, south, east, north))


def landsat_item(scene, href: Callable, collection: str = LANDSAT_COLLECTION) -> dict:
    """A Planetary-Computer-style ``landsat-c2-l2`` item for a :class:`cog_kit.LandsatScene`; ``href(path)`` gives
    each file's URL (e.g. ``StaticServer.href``)."""
    bbox = list(scene.bounds_lonlat())
    t = scene.transform
    assets = {}
    for band, key in LANDSAT_ASSET_KEYS.items():
        asset = {"href": href(scene.files[band]), "type": COG, "title": band, "roles": ["data"]}
        if band.startswith("SR_"):
            asset["roles"] = ["data", "reflectance"]
            bands = {"nodata": 0, "data_type": "uint16", "spatial_resolution": 30, "unit": "1"}
            asset["raster:bands"] = [{**bands, "scale": SR_SCALE, "offset": SR_OFFSET}]
        else:
            asset["roles"] = ["cloud", "cloud-shadow", "snow-ice"] if band == "QA_PIXEL" else ["saturation"]
            asset["raster:bands"] = [{"unit": "bit index", "data_type": "uint16", "spatial_resolution": 30}]
            if band == "QA_PIXEL":
                asset["raster:bands"][0]["nodata"] = 1
        assets[key] = asset
    properties = {
        "datetime": f"{scene.date}T10:18:45.123456Z",
        "platform": "landsat-8",
        "instruments": ["oli", "tirs"],
        "description": "Landsat Collection 2 Level-2",
        "eo:cloud_cover": scene.cloud_cover,
        "landsat:cloud_cover_land": scene.cloud_cover,
        "landsat:wrs_type": "2",
        "landsat:wrs_path": f"{scene.wrs_path:03d}",
        "landsat:wrs_row": f"{scene.wrs_row:03d}",
        "landsat:correction": "L2SP",
        "landsat:collection_number": "02",
        "landsat:collection_category": "T1",
        "landsat:scene_id": scene.product_id,
        "proj:epsg": scene.epsg,
        "proj:shape": list(scene.shape),
        "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "proj:bbox": list(scene.bounds),
    }
    return item(scene.id, collection, bbox, properties, assets)


def dem_item(tile, href: Callable, collection: str = DEM_COLLECTION) -> dict:
    """A ``cop-dem-glo-30`` item for a :class:`cog_kit.DemTile` (asset ``data``)."""
    t = tile.transform
    properties = {
        "datetime": "2021-04-22T00:00:00Z",
        "platform": "TanDEM-X",
        "gsd": 30,
        "proj:epsg": 4326,
        "proj:shape": list(tile.shape),
        "proj:transform": [t.a, t.b, t.c, t.d, t.e, t.f],
    }
    assets = {DEM_ASSET_KEY: {"href": href(tile.path), "type": COG, "title": tile.id, "roles": ["data"]}}
    assets[DEM_ASSET_KEY]["raster:bands"] = [{"data_type": "float32", "spatial_resolution": 30, "unit": "metre"}]
    return item(tile.id, collection, list(tile.bounds_lonlat), properties, assets)


def item(item_id: str, collection: str, bbox: list, properties: dict, assets: dict) -> dict:
    return {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": STAC_EXTENSIONS,
        "id": item_id,
        "collection": collection,
        "bbox": bbox,
        "geometry": footprint(bbox),
        "properties": properties,
        "assets": assets,
        "links": [],
    }


def collection_doc(collection_id: str, items: list[dict], assets: dict | None = None) -> dict:
    """A collection with its extent from its items (the whole world while it has none)."""
    boxes = [i["bbox"] for i in items] or [[-180.0, -90.0, 180.0, 90.0]]
    dates = sorted(i["properties"]["datetime"] for i in items) or [None]
    bbox = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    return {
        "type": "Collection",
        "stac_version": "1.0.0",
        "id": collection_id,
        "description": f"fake {collection_id}",
        "license": "proprietary",
        "extent": {"spatial": {"bbox": [bbox]}, "temporal": {"interval": [[dates[0], dates[-1]]]}},
        "links": [],
        "assets": assets or {},
    }


# -- search semantics ------------------------------------------------------------------------------------------


def parse_datetime(value: str) -> tuple[datetime | None, datetime | None]:
    """``(start, end)`` of an RFC 3339 instant or ``start/end`` interval (``..`` or empty: open)."""

    def one(text: str) -> datetime | None:
        if text in ("", ".."):
            return None
        try:
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise BadSearch(f"datetime {value!r} is not RFC 3339") from None
        if parsed.tzinfo is None:
            raise BadSearch(f"datetime {value!r} has no time zone")
        return parsed

    if "/" in value:
        a, b = value.split("/", 1)
        start, end = one(a), one(b)
        if start and end and end < start:
            raise BadSearch(f"datetime interval {value!r} ends before it starts")
        return start, end
    instant = one(value)
    return instant, instant


COMPARE = {
    "eq": lambda a, b: a == b,
    "neq": lambda a, b: a != b,
    "lt": lambda a, b: a is not None and a < b,
    "lte": lambda a, b: a is not None and a <= b,
    "gt": lambda a, b: a is not None and a > b,
    "gte": lambda a, b: a is not None and a >= b,
    "in": lambda a, b: a in b,
}
CQL2 = {"=": "eq", "<>": "neq", "<": "lt", "<=": "lte", ">": "gt", ">=": "gte", "in": "in"}


def matches_query(properties: dict, query: dict) -> bool:
    """The STAC query extension: ``{"eo:cloud_cover": {"lt": 20}, ...}``, every condition must hold."""
    for name, conditions in query.items():
        if not isinstance(conditions, dict):
            raise BadSearch(f"query on {name!r} is not an object of operators")
        for op, operand in conditions.items():
            if op not in COMPARE:
                raise BadSearch(f"query operator {op!r} is not one of {sorted(COMPARE)}")
            if not COMPARE[op](properties.get(name), operand):
                return False
    return True


def matches_filter(feature: dict, node) -> bool:
    """CQL2-JSON: logical ``and``/``or``/``not``, comparisons, ``in`` and ``s_intersects`` on properties."""
    if not isinstance(node, dict) or "op" not in node:
        raise BadSearch(f"filter node {node!r} has no op")
    op, args = node["op"], node.get("args", [])
    if op == "and":
        return all(matches_filter(feature, a) for a in args)
    if op == "or":
        return any(matches_filter(feature, a) for a in args)
    if op == "not":
        return not matches_filter(feature, args[0])
    if op == "s_intersects":
        return shapely.geometry.shape(feature["geometry"]).intersects(shapely.geometry.shape(args[1]))
    if op not in CQL2 or len(args) != 2 or not isinstance(args[0], dict) or "property" not in args[0]:
        raise BadSearch(f"filter operator {op!r} with {args!r} is not supported")
    name = args[0]["property"]
    value = feature.get(name) if name in ("id", "collection") else feature["properties"].get(name)
    return COMPARE[CQL2[op]](value, args[1])


def check_bbox(bbox) -> list[float]:
    if isinstance(bbox, str):
        bbox = bbox.split(",")
    try:
        values = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise BadSearch(f"bbox {bbox!r} is not numbers") from None
    if len(values) != 4:
        raise BadSearch(f"bbox {bbox!r} must have 4 numbers (west, south, east, north)")
    west, south, east, north = values
    if not (-180 <= west <= 180 and -180 <= east <= 180 and -90 <= south <= north <= 90):
        raise BadSearch(f"bbox {values} is not (west, south, east, north) in degrees")
    return values


def normalise(params: dict) -> dict:
    """A search's parameters, checked, with ``bbox``, ``collections``, ``limit`` parsed (GET strings or POST JSON)."""
    out = dict(params)
    if isinstance(out.get("collections"), str):
        out["collections"] = out["collections"].split(",")
    if isinstance(out.get("ids"), str):
        out["ids"] = out["ids"].split(",")
    for key in ("query", "filter", "intersects", "sortby"):
        if isinstance(out.get(key), str) and key != "sortby":
            out[key] = json.loads(out[key])
    if not out.get("collections"):
        raise BadSearch("search without collections: the whole catalogue would be searched")
    if out.get("bbox") is not None:
        out["bbox"] = check_bbox(out["bbox"])
    if out.get("bbox") is not None and out.get("intersects") is not None:
        raise BadSearch("bbox and intersects are mutually exclusive")
    try:
        out["limit"] = int(out.get("limit", DEFAULT_LIMIT))
    except (TypeError, ValueError):
        raise BadSearch(f"limit {out.get('limit')!r} is not an integer") from None
    if not 1 <= out["limit"] <= MAX_LIMIT:
        raise BadSearch(f"limit {out['limit']} is outside 1..{MAX_LIMIT}")
    if out.get("datetime"):
        parse_datetime(out["datetime"])
    if out.get("filter-lang", "cql2-json") != "cql2-json":
        raise BadSearch(f"filter-lang {out['filter-lang']!r}: only cql2-json")
    return out


def select(items: list[dict], p: dict) -> list[dict]:
    """The items a normalised search matches, in its order (``sortby``; newest first by default)."""
    start, end = parse_datetime(p["datetime"]) if p.get("datetime") else (None, None)
    area = None
    if p.get("bbox"):
        area = shapely.geometry.box(*p["bbox"])
    elif p.get("intersects"):
        area = shapely.geometry.shape(p["intersects"])
    out = []
    for feature in items:
        if p.get("ids") and feature["id"] not in p["ids"]:
            continue
        if area is not None and not shapely.geometry.shape(feature["geometry"]).intersects(area):
            continue
        when = datetime.fromisoformat(feature["properties"]["datetime"].replace("Z", "+00:00"))
        if (start and when < start) or (end and when > end):
            continue
        if p.get("query") and not matches_query(feature["properties"], p["query"]):
            continue
        if p.get("filter") and not matches_filter(feature, p["filter"]):
            continue
        out.append(feature)
    return sort_items(out, p.get("sortby"))


def sort_items(items: list[dict], sortby) -> list[dict]:
    """``sortby``: ``[{"field": ..., "direction": "asc"|"desc"}]`` or GET's ``"+a,-b"``; default datetime desc."""
    if isinstance(sortby, str):
        fields = sortby.split(",")
        sortby = [{"field": f.lstrip("+-"), "direction": "desc" if f.startswith("-") else "asc"} for f in fields]
    keys = sortby or [{"field": "properties.datetime", "direction": "desc"}]
    out = sorted(items, key=lambda f: f["id"])
    for key in reversed(keys):
        name = key["field"].removeprefix("properties.")
        out.sort(key=lambda f, n=name: f.get(n, f["properties"].get(n)), reverse=key.get("direction") == "desc")
    return out


# -- the server -----------------------------------------------------------------------------------------------


class FakeStac(LoopbackService):
    """Start with ``with FakeStac() as stac:``; add items with :meth:`add`; ``stac.url`` is the API root."""

    def __init__(self, latency_s: float = 0.0, sas_token: str | None = None):
        self.latency_s = latency_s
        self.sas_token = sas_token
        self.collections: dict[str, list[dict]] = {}
        self.collection_assets: dict[str, dict] = {}
        self.searches: list[dict] = []
        self.violations: list[str] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request
        self.faults: list[int] = []
        self.tokens_issued = 0
        self._lock = threading.Lock()

    def add(self, collection: str, items: Sequence[dict] = (), assets: dict | None = None) -> None:
        """Add ``items`` to ``collection`` (created if new; ``assets``: collection-level assets, e.g. a Zarr)."""
        with self._lock:
            self.collections.setdefault(collection, []).extend(items)
            if assets:
                self.collection_assets.setdefault(collection, {}).update(assets)

    def first_searches(self) -> list[dict]:
        """The searches that were not a follow-up page (one per query the client made)."""
        return [s for s in self.searches if not s.get("token")]

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(req.path)
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        with self._lock:
            self.requests.append((method, url.path))
            fault = self.faults.pop(0) if self.faults else None
        time.sleep(self.latency_s)
        if fault is not None:
            return reply(req, fault, {"code": "ServiceUnavailable", "description": f"injected HTTP {fault}"})
        try:
            status, doc = self.route(method, url.path.rstrip("/") or "/", url.query, body)
        except BadSearch as err:
            with self._lock:
                self.violations.append(str(err))
            status, doc = 400, {"code": "BadRequest", "description": str(err)}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            with self._lock:
                self.violations.append(f"malformed request: {err}")
            status, doc = 400, {"code": "BadRequest", "description": f"malformed request: {err}"}
        return reply(req, status, doc)

    def route(self, method: str, path: str, query: str, body: bytes) -> tuple[int, dict]:
        parts = path.strip("/").split("/") if path != "/" else []
        if not parts:
            return 200, self.landing()
        if parts == ["conformance"]:
            return 200, {"conformsTo": CONFORMANCE}
        if parts == ["search"]:
            params = json.loads(body or b"{}") if method == "POST" else {k: v[0] for k, v in parse_qs(query).items()}
            return 200, self.search(method, params)
        if parts[:4] == ["api", "sas", "v1", "token"] and self.sas_token and len(parts) == 5:
            self.tokens_issued += 1
            return 200, {"msft:expiry": "2099-01-01T00:00:00Z", "token": self.sas_token}
        if parts[0] == "collections":
            return self.collection_route(parts[1:], query)
        return 404, {"code": "NotFoundError", "description": f"no route {path}"}

    def collection_route(self, parts: list[str], query: str) -> tuple[int, dict]:
        if not parts:
            docs = [self.collection(c) for c in self.collections]
            return 200, {"collections": docs, "links": [self.link("self", "/collections")]}
        if parts[0] not in self.collections:
            return 404, {"code": "NotFoundError", "description": f"Collection {parts[0]} does not exist."}
        items = self.collections[parts[0]]
        if len(parts) == 1:
            return 200, self.collection(parts[0])
        if len(parts) == 2 and parts[1] == "items":
            limit = int(parse_qs(query).get("limit", [DEFAULT_LIMIT])[0])
            return 200, {"type": "FeatureCollection", "features": [self.linked(i) for i in items[:limit]], "links": []}
        if len(parts) == 3 and parts[1] == "items":
            found = [i for i in items if i["id"] == parts[2]]
            if found:
                return 200, self.linked(found[0])
        return 404, {"code": "NotFoundError", "description": f"no such item {'/'.join(parts)}"}

    def search(self, method: str, raw: dict) -> dict:
        """One page of a search; the record keeps what was asked and what it matched."""
        record = {"method": method, **{k: raw.get(k) for k in ("collections", "bbox", "intersects", "datetime")}}
        record.update({k: raw.get(k) for k in ("query", "filter", "limit", "token", "ids", "sortby")})
        with self._lock:
            self.searches.append(record)
        params = normalise(raw)
        record.update(collections=params["collections"], bbox=params.get("bbox"), limit=params["limit"])
        unknown = [c for c in params["collections"] if c not in self.collections]
        record["unknown_collections"] = unknown
        items = [i for c in params["collections"] for i in self.collections.get(c, [])]
        matched = select(items, params)
        offset = int(str(params.get("token") or "next:0").removeprefix("next:"))
        page = matched[offset : offset + params["limit"]]
        record.update(matched=len(matched), returned=[i["id"] for i in page])
        links = [self.link("root", "/"), self.link("self", "/search")]
        if offset + len(page) < len(matched):
            links.append(self.next_link(method, raw, offset + len(page)))
        return {
            "type": "FeatureCollection",
            "features": [self.linked(i) for i in page],
            "links": links,
            "numberMatched": len(matched),
            "numberReturned": len(page),
            "context": {"limit": params["limit"], "matched": len(matched), "returned": len(page)},
        }

    # -- documents ---------------------------------------------------------------------------------------------

    def link(self, rel: str, path: str, **extra) -> dict:
        return {"rel": rel, "href": self.url + path, "type": "application/json", **extra}

    def next_link(self, method: str, raw: dict, offset: int) -> dict:
        token = f"next:{offset}"
        if method == "POST":
            return self.link("next", "/search", method="POST", body={**raw, "token": token}, merge=False)
        return self.link("next", "/search?" + urlencode({**raw, "token": token}), method="GET")

    def landing(self) -> dict:
        links = [self.link("self", "/"), self.link("root", "/"), self.link("conformance", "/conformance")]
        links.append(self.link("data", "/collections"))
        links.append(self.link("search", "/search", method="GET", type="application/geo+json"))
        links.append(self.link("search", "/search", method="POST", type="application/geo+json"))
        links += [self.link("child", f"/collections/{c}") for c in self.collections]
        return {
            "type": "Catalog",
            "id": "fake-stac",
            "stac_version": "1.0.0",
            "description": "SoilNet's fake STAC API (tests/shards/fake_stac.py)",
            "conformsTo": CONFORMANCE,
            "links": links,
        }

    def collection(self, collection_id: str) -> dict:
        doc = collection_doc(collection_id, self.collections[collection_id], self.collection_assets.get(collection_id))
        doc["links"] = [
            self.link("self", f"/collections/{collection_id}"),
            self.link("root", "/"),
            self.link("parent", "/"),
            self.link("items", f"/collections/{collection_id}/items", type="application/geo+json"),
        ]
        return doc

    def linked(self, feature: dict) -> dict:
        c = feature["collection"]
        links = [
            self.link("self", f"/collections/{c}/items/{feature['id']}", type="application/geo+json"),
            self.link("collection", f"/collections/{c}"),
            self.link("parent", f"/collections/{c}"),
            self.link("root", "/"),
        ]
        return {**feature, "links": links}


def reply(req: BaseHTTPRequestHandler, status: int, doc: dict) -> None:
    body = json.dumps(doc).encode()
    req.send_response(status)
    geojson = doc.get("type") in ("FeatureCollection", "Feature")
    req.send_header("Content-Type", "application/geo+json" if geojson else "application/json")
    req.send_header("Content-Length", str(len(body)))
    req.end_headers()
    req.wfile.write(body)


def main() -> None:
    """Serve an empty catalogue plus the items of ``--items`` (a JSON list) until killed; stdout: the URL."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--items", help="a JSON file: a list of STAC items (each with its collection)")
    parser.add_argument("--latency-s", type=float, default=0.0)
    args = parser.parse_args()
    with FakeStac(latency_s=args.latency_s) as fake:
        if args.items:
            with open(args.items) as f:
                for feature in json.load(f):
                    fake.add(feature["collection"], [feature])
        print(fake.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()

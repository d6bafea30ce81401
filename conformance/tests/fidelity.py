"""Helpers to compare JSON as sent with JSON as returned, number literals included."""
import json


class Num(str):
    """A JSON number kept as the exact text it was written as."""


def loads_exact(text):
    return json.loads(text, parse_float=Num, parse_int=Num)


def without(resource, keys=("id",), meta_server_fields=True):
    r = dict(resource)
    for k in keys:
        r.pop(k, None)
    if meta_server_fields and isinstance(r.get("meta"), dict):
        meta = {k: v for k, v in r["meta"].items() if k not in ("versionId", "lastUpdated")}
        if meta:
            r["meta"] = meta
        else:
            r.pop("meta")
    return r


def map_references(value, mapping):
    """Replaces every `reference` found in `mapping` (urn:uuid fullUrls) by its target."""
    if isinstance(value, dict):
        return {k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else map_references(v, mapping)) for k, v in value.items()}
    if isinstance(value, list):
        return [map_references(v, mapping) for v in value]
    return value

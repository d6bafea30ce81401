#!/usr/bin/env python3
"""FHIR search latency: fhir-ledger against PostgreSQL indexed the way Medplum/HAPI index it.

Run by tests/bench/search.sh, which loads 100 Synthea patients into a fresh fhir-ledger and
starts a throwaway PostgreSQL. This script
  1. reads the loaded resources back from fhir-ledger (GET /{type}?_count=1000, following
     link rel=next), so that both sides hold the same ids and the same references;
  2. loads them into PostgreSQL (schema below), then VACUUM ANALYZE;
  3. draws the queries of each class from the data with a fixed seed, runs warm-up queries,
     then the measured ones, alternating fhir-ledger and PostgreSQL query by query so that
     background load falls on both alike;
  4. checks each fhir-ledger answer against PostgreSQL outside the timed section, and prints a
     Markdown table for BENCHMARKS.md. Count disagreements: `total`, the page size
     (min(total, _count)), or the number of included resources differ. Page disagreements: the
     page repeats resources or holds resources that do not match; with _sort, the sequence
     of sort values differs; the included resources are not those the page references.
     Without _sort FHIR leaves the order open (fhir-ledger pages in its own index order), so a
     page in another order than PostgreSQL's is counted apart, not as a disagreement.

What is timed:
  fhir-ledger: one keep-alive http.client connection; request sent until the whole response
    body is read (the JSON is not parsed inside the timed section).
  PostgreSQL: one connection (psycopg 3, autocommit, no server-side prepared statements, so
    every execution is planned for its own parameters, as node-postgres does for Medplum);
    execute + fetchall of the resource contents. jsonb is fetched as text (no client-side
    JSON parsing). PostgreSQL does not compute a total; fhir-ledger returns `total` in every
    searchset, so the baseline does strictly less work.

PostgreSQL schema: one table per resource type (as Medplum: a row per resource holding the
resource and one extracted column per search parameter), loaded for the types the queries
touch: Patient, Observation, Encounter, Practitioner, DiagnosticReport. Every table has
`id text COLLATE "C" PRIMARY KEY` (btree; "C" so that ORDER BY id is byte order) and `content`
(text, or jsonb: see below). Indexes, and what they mirror:
  - Reference parameters are text columns holding "Type/id" (Medplum's reference columns),
    btree when single-valued (Observation.subject, Encounter.subject/patient,
    DiagnosticReport.subject) and GIN over text[] when repeating (Encounter.practitioner,
    DiagnosticReport.result): Medplum creates exactly these (btree on scalar columns, GIN on
    array columns).
  - Token parameters (Observation.code) are text[] of "system|code" with a GIN index:
    Medplum's token-array columns (`__code` UUID[] of hashed system|code, GIN), unhashed.
  - Date parameters (Observation.date = effective[x]) are timestamptz with a btree: Medplum's
    date columns.
  - Quantity (Observation.value-quantity) is numeric value + system + code columns with one
    btree on (code, system, value): HAPI's HFJ_SPIDX_QUANTITY index on (hash of
    system+units, value). Medplum indexes the value alone and ignores units.
  - String (Patient.name) is a side table patient_name(resource_id, value) holding every
    family, given, prefix, suffix and text of every HumanName, normalized (lower case,
    accents stripped), with a btree on value (COLLATE "C", so `LIKE 'abc%'` is an index
    range scan): HAPI's HFJ_SPIDX_STRING (SP_VALUE_NORMALIZED, prefix-indexed). Medplum's
    HumanName side table plays the same role.
  - Chained search is one statement joining the reference column to patient_name (Medplum
    also chains with a join). _include and _revinclude are a second statement after the page,
    with the page's ids or references as parameters, looked up through the primary key or the
    reference column (Medplum and HAPI also fetch includes with separate queries).
  No GIN on the whole `content`: no query filters on content (every filter uses an extracted
  column, as in Medplum, whose content column is not indexed at all); it would only slow
  the load. PostgreSQL runs with jit=off (JIT only adds compile time on queries this size).

Without --pg, fhir-ledger is timed alone (tests/bench/scale.sh runs it so at each size): the
queries are drawn from every Patient and from the Observations of --obs-patients of them, read
back from fhir-ledger; there is nothing to check the answers against, so only errors count.
The classes (make_classes) are the same; the JSON (--json) has the same shape, "pg" empty.

Pages are in id order on PostgreSQL (ORDER BY id LIMIT 50, like the cursor paging fhir-ledger
offers); `--pg-order none` drops the ORDER BY when there is no _sort (Medplum's default, which
pages with OFFSET), which frees the planner from walking the primary key.

With --peer NAME=URL (tests/bench/peer.sh, NAME "HAPI JPA"), a second FHIR server that holds
the same resources under the same ids (peer.sh loads both from the same PUT transactions) is
timed on the same queries, the same way as fhir-ledger (one keep-alive connection, the whole
body read), in the same rotation: fhir-ledger, PostgreSQL and the peer take turns going first,
query by query. Its answers are checked like fhir-ledger's against PostgreSQL (check), and
against fhir-ledger's (compare_servers): `total` when both give one, the page size and the
number of included resources always; the sequence of sort values with _sort; the ids of the
page and of its included resources when the page holds the whole result (fewer than _count
matches), since without _sort each server may page a different subset of a larger result.
What is fair to compare and what is not, with HAPI: HAPI leaves `total` out of a searchset
whose count it has not finished (many pages here; counted and shown as "answers without
`total`", not as disagreements), and includes at most 1000 resources per page by default
(JpaStorageSettings.maximumIncludesToLoadPerPage), so a _revinclude of a patient with more than
1000 Observations is a count disagreement in which HAPI returns less than fhir-ledger.

`content` is TEXT by default, as Medplum stores it (HAPI also keeps the resource as text or a
blob): returning it costs PostgreSQL a copy, whereas jsonb must be re-serialized on every read
(about 2.8x slower for a page of Observations on this machine). `--pg-content jsonb` stores
jsonb instead, to measure that variant.
"""

import argparse
import datetime as dt
import http.client
import json
import random
import statistics
import sys
import time
import unicodedata
import urllib.parse
from decimal import Decimal


TYPES = ["Patient", "Observation", "Encounter", "Practitioner", "DiagnosticReport"]
COUNT = 50

SCHEMA = """
DROP TABLE IF EXISTS patient, patient_name, observation, encounter, practitioner, diagnosticreport;
CREATE TABLE patient (id text COLLATE "C" PRIMARY KEY, content jsonb NOT NULL,
  birthdate date, gender text);
CREATE TABLE patient_name (resource_id text COLLATE "C" NOT NULL, value text COLLATE "C" NOT NULL);
CREATE TABLE observation (id text COLLATE "C" PRIMARY KEY, content jsonb NOT NULL,
  subject text, code text[], date timestamptz, vq_value numeric, vq_system text, vq_code text);
CREATE TABLE encounter (id text COLLATE "C" PRIMARY KEY, content jsonb NOT NULL,
  subject text, patient text, practitioner text[], date timestamptz);
CREATE TABLE practitioner (id text COLLATE "C" PRIMARY KEY, content jsonb NOT NULL);
CREATE TABLE diagnosticreport (id text COLLATE "C" PRIMARY KEY, content jsonb NOT NULL,
  subject text, result text[]);
"""

INDEXES = """
CREATE INDEX patient_birthdate_idx ON patient (birthdate);
CREATE INDEX patient_name_value_idx ON patient_name (value);
CREATE INDEX patient_name_resource_idx ON patient_name (resource_id);
CREATE INDEX observation_subject_idx ON observation (subject);
CREATE INDEX observation_code_idx ON observation USING gin (code);
CREATE INDEX observation_date_idx ON observation (date);
CREATE INDEX observation_value_quantity_idx ON observation (vq_code, vq_system, vq_value);
CREATE INDEX encounter_subject_idx ON encounter (subject);
CREATE INDEX encounter_patient_idx ON encounter (patient);
CREATE INDEX encounter_practitioner_idx ON encounter USING gin (practitioner);
CREATE INDEX encounter_date_idx ON encounter (date);
CREATE INDEX diagnosticreport_subject_idx ON diagnosticreport (subject);
CREATE INDEX diagnosticreport_result_idx ON diagnosticreport USING gin (result);
"""


def norm(s):
    """FHIR string matching: case- and accent-insensitive."""
    return "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c)).casefold()


def ref(obj):
    r = (obj or {}).get("reference")
    return r if r and "/" in r else None


def tokens(cc):
    return [f"{c.get('system', '')}|{c['code']}" for c in (cc or {}).get("coding", []) if "code" in c]


def name_parts(p):
    out = set()
    for n in p.get("name", []):
        for part in [n.get("family"), n.get("text"), *n.get("given", []), *n.get("prefix", []), *n.get("suffix", [])]:
            if part:
                out.add(norm(part))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# Reading back from fhir-ledger and loading PostgreSQL


class Ledger:
    """A keep-alive HTTP client of one FHIR server: fhir-ledger, or the --peer (whose base URL
    may have a path, as HAPI's /fhir)."""

    def __init__(self, base, timeout=120):
        u = urllib.parse.urlparse(base)
        self.host, self.port, self.timeout = u.hostname, u.port, timeout
        self.prefix = u.path.rstrip("/")
        self.conn = None

    def relative(self, url):
        """The path (from the base, "/...") of a URL the server returned, e.g. a next link."""
        u = urllib.parse.urlparse(url)
        path = u.path[len(self.prefix):] if self.prefix and u.path.startswith(self.prefix) else u.path
        return (path or "/") + ("?" + u.query if u.query else "")

    def get(self, path):
        """(status, body bytes) of GET base + path; reconnects once if the keep-alive connection
        was dropped."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("GET", self.prefix + path, headers={"Accept": "application/fhir+json"})
                r = self.conn.getresponse()
                body = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
                return r.status, body
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise


def read_back(ledger, rtype, query=""):
    """Yields pages (lists of resources) of every resource of rtype (matching query, "k=v&")."""
    path = f"/{rtype}?{query}_count=1000"
    while path:
        status, body = ledger.get(path)
        if status != 200:
            sys.exit(f"reading back {rtype}: HTTP {status}: {body[:300]!r}")
        b = json.loads(body)
        yield [e["resource"] for e in b.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"]
        nxt = [lk["url"] for lk in b.get("link", []) if lk.get("relation") == "next"]
        path = ledger.relative(nxt[0]) if nxt else None


def obs_date(r):
    return r.get("effectiveDateTime") or r.get("effectiveInstant") or (r.get("effectivePeriod") or {}).get("start")


def add_fact(facts, r):
    """Records what the query generator needs of one Patient or Observation."""
    if r.get("resourceType") == "Patient":
        key = next((i["value"] for i in r.get("identifier", []) if "tietai" in i.get("system", "")), r["id"])
        facts["patients"].append({"id": r["id"], "key": key, "names": r.get("name", [])})
    elif r.get("resourceType") == "Observation":
        vq = r.get("valueQuantity") or {}
        facts["obs"].append((ref(r.get("subject")), tokens(r.get("code")), obs_date(r),
                             (vq["value"], vq.get("system"), vq.get("code")) if "value" in vq else None))


def collect_facts(ledger, obs_patients, seed, keys_file=None):
    """Without PostgreSQL: the facts of every Patient, and of the Observations of obs_patients
    Patients drawn with the seed (reading every Observation back would dominate the run on a
    large server; the classes draw their Observations from this sample). With keys_file: only
    the Patients whose key (Synthea identifier) it lists when it exists; else it is written with
    the keys of every Patient (so that later runs on a grown server query the same people)."""
    facts = {"patients": [], "obs": []}
    start = time.perf_counter()
    for page in read_back(ledger, "Patient"):
        for r in page:
            add_fact(facts, r)
    if keys_file:
        try:
            with open(keys_file) as f:
                keys = {line.strip() for line in f if line.strip()}
            n = len(facts["patients"])
            facts["patients"] = [p for p in facts["patients"] if p["key"] in keys]
            print(f"  {len(facts['patients'])} of {n} Patients are the {len(keys)} in {keys_file} (or copies of them)")
            if not facts["patients"]:
                sys.exit(f"no Patient has a key listed in {keys_file}")
        except FileNotFoundError:
            with open(keys_file, "w") as f:
                f.writelines(k + "\n" for k in sorted({p["key"] for p in facts["patients"]}))
    ids = sorted(p["id"] for p in facts["patients"])
    sample = random.Random(f"{seed}/obs-patients").sample(ids, min(obs_patients, len(ids)))
    for pid in sample:
        for page in read_back(ledger, "Observation", f"subject=Patient/{pid}&"):
            for r in page:
                add_fact(facts, r)
    print(f"  {len(facts['patients'])} Patients and the {len(facts['obs'])} Observations of {len(sample)} of them "
          f"read back in {time.perf_counter() - start:.1f} s", flush=True)
    if not facts["obs"]:
        sys.exit("no Observations to draw queries from")
    return facts


def load(ledger, pg, content_type):
    """Copies every resource of TYPES into PostgreSQL; returns the lightweight facts the query
    generator needs."""
    facts = {"patients": [], "obs": []}
    with pg.cursor() as cur:
        cur.execute(SCHEMA.replace("content jsonb", f"content {content_type}"))
        for rtype in TYPES:
            n = 0
            start = time.perf_counter()
            for page in read_back(ledger, rtype):
                n += len(page)
                rows, extra = [], []
                for r in page:
                    content = json.dumps(r, separators=(",", ":"), ensure_ascii=False)
                    add_fact(facts, r)
                    if rtype == "Patient":
                        rows.append((r["id"], content, r.get("birthDate"), r.get("gender")))
                        parts = name_parts(r)
                        extra += [(r["id"], v) for v in parts]
                    elif rtype == "Observation":
                        vq = r.get("valueQuantity") or {}
                        has_vq = "value" in vq
                        date = obs_date(r)
                        rows.append((r["id"], content, ref(r.get("subject")), tokens(r.get("code")), date,
                                     repr(vq["value"]) if has_vq else None, vq.get("system"), vq.get("code")))
                    elif rtype == "Encounter":
                        subj = ref(r.get("subject"))
                        prac = [ref(p.get("individual")) for p in r.get("participant", [])]
                        prac = [p for p in prac if p and p.startswith("Practitioner/")]
                        rows.append((r["id"], content, subj, subj if subj and subj.startswith("Patient/") else None,
                                     prac, (r.get("period") or {}).get("start")))
                    elif rtype == "Practitioner":
                        rows.append((r["id"], content))
                    elif rtype == "DiagnosticReport":
                        rows.append((r["id"], content, ref(r.get("subject")),
                                     [x for x in (ref(o) for o in r.get("result", [])) if x]))
                table = rtype.lower()
                with cur.copy(f"COPY {table} FROM STDIN") as cp:
                    for row in rows:
                        cp.write_row(row)
                if extra:
                    with cur.copy("COPY patient_name FROM STDIN") as cp:
                        for row in extra:
                            cp.write_row(row)
            print(f"  {rtype}: {n} resources read back and copied in {time.perf_counter() - start:.1f} s", flush=True)
        start = time.perf_counter()
        cur.execute(INDEXES)
        print(f"  indexes built in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    pg.execute("VACUUM ANALYZE")
    print(f"  VACUUM ANALYZE in {time.perf_counter() - start:.1f} s", flush=True)
    return facts


# ---------------------------------------------------------------------------------------------
# Query classes. Each class draws queries: the FHIR path; the timed SQL and its parameters; the
# untimed SQL of every matching id (for the checks). Every timed SQL statement returns rows
# (mode, id, content[, references to include]), mode 'match' or 'include'; a query with
# "include" runs a second statement built from the page's rows, and "reselect" gives the rows
# of given ids in the same shape (to check the includes of fhir-ledger's own page).


def q(path_type, params, sql, args, ids_sql, ids_args):
    query = "&".join(f"{k}={urllib.parse.quote(v, safe='/:')}" for k, v in params + [("_count", str(COUNT))])
    return {"path": f"/{path_type}?{query}", "sql": sql, "args": args, "ids_sql": ids_sql, "ids_args": ids_args}


def day(s):
    return dt.date.fromisoformat(s[:10])


def make_classes(facts, order="id"):
    """order "id": pages in id order (stable cursor paging, as fhir-ledger offers); "none": no
    ORDER BY without _sort (Medplum's default; the page is whatever the plan yields)."""
    PAGE = f"ORDER BY id LIMIT {COUNT}" if order == "id" else f"LIMIT {COUNT}"

    def simple(where, table="observation"):
        return (f"SELECT 'match', id, content FROM {table} WHERE {where} {PAGE}",
                f"SELECT id FROM {table} WHERE {where}")

    patients = sorted(facts["patients"], key=lambda p: p["key"])
    pkey = {"Patient/" + p["id"]: p["key"] for p in patients}
    obs = sorted(facts["obs"], key=lambda o: (pkey.get(o[0], ""), o[2] or "", o[1], repr(o[3])))
    obs_q = [o for o in obs if o[3] and o[3][1] and o[3][2]]

    def patient(rng):
        return rng.choice(patients)

    def c_token(rng):
        o = rng.choice(obs)
        tok = o[1][0]
        sql, csql = simple("code @> ARRAY[%s::text]")
        return q("Observation", [("code", tok)], sql, [tok], csql, [tok])

    def c_reference(rng):
        r = "Patient/" + patient(rng)["id"]
        sql, csql = simple("subject = %s")
        return q("Observation", [("subject", r)], sql, [r], csql, [r])

    def c_date(rng):
        o = rng.choice(obs)
        lo = day(o[2]) - dt.timedelta(days=3)
        hi = lo + dt.timedelta(days=7)
        sql, csql = simple("date >= %s AND date < %s")
        args = [f"{lo}T00:00:00+00:00", f"{hi}T00:00:00+00:00"]
        return q("Observation", [("date", f"ge{lo}"), ("date", f"lt{hi}")], sql, args, csql, args)

    def c_string(rng):
        p = patient(rng)
        n = rng.choice(p["names"])
        part = rng.choice([n["family"], *n.get("given", [])])
        prefix = part[: rng.randint(min(3, len(part)), len(part))]
        sql, csql = simple("id IN (SELECT resource_id FROM patient_name WHERE value LIKE %s)", "patient")
        arg = [norm(prefix) + "%"]
        return q("Patient", [("name", prefix)], sql, arg, csql, arg)

    def c_quantity(rng):
        o = rng.choice(obs_q)
        value, system, code = o[3]
        n = format(Decimal(repr(round(float(value), 1))), "f")
        sql, csql = simple("vq_code = %s AND vq_system = %s AND vq_value > %s")
        args = [code, system, Decimal(n)]
        return q("Observation", [("value-quantity", f"gt{n}|{system}|{code}")], sql, args, csql, args)

    def c_token_ref(rng):
        o = rng.choice(obs)
        sql, csql = simple("subject = %s AND code @> ARRAY[%s::text]")
        args = [o[0], o[1][0]]
        return q("Observation", [("subject", o[0]), ("code", o[1][0])], sql, args, csql, args)

    def c_sort(rng):
        r = "Patient/" + patient(rng)["id"]
        sql = f"SELECT 'match', id, content FROM observation WHERE subject = %s ORDER BY date DESC NULLS LAST, id LIMIT {COUNT}"
        return q("Observation", [("subject", r), ("_sort", "-date")], sql, [r],
                 "SELECT id FROM observation WHERE subject = %s", [r])

    def c_chained(rng):
        p = patient(rng)
        family = p["names"][0]["family"]
        sql = ("SELECT 'match', o.id, o.content FROM observation o JOIN (SELECT DISTINCT 'Patient/' || resource_id AS r "
               f"FROM patient_name WHERE value LIKE %s) p ON o.subject = p.r {PAGE.replace('BY id', 'BY o.id')}")
        csql = ("SELECT id FROM observation WHERE subject IN "
                "(SELECT 'Patient/' || resource_id FROM patient_name WHERE value LIKE %s)")
        arg = [norm(family) + "%"]
        return q("Observation", [("subject:Patient.name", family)], sql, arg, csql, arg)

    # _include and _revinclude: the page first, then one more statement for the included
    # resources, with the page's ids or references as parameters (Medplum and HAPI both
    # fetch includes with a separate query after the page). Both statements are timed.
    def c_revinclude(rng):
        pid = patient(rng)["id"]
        sql = f"SELECT 'match', id, content FROM patient WHERE id = %s {PAGE}"
        qu = q("Patient", [("_id", pid), ("_revinclude", "Observation:subject")], sql, [pid],
               "SELECT id FROM patient WHERE id = %s", [pid])
        qu["reselect"] = "SELECT 'match', id, '' FROM patient WHERE id = ANY (%s)"
        qu["include"] = lambda rows: ("SELECT 'include', id, content FROM observation WHERE subject = ANY (%s)",
                                      [["Patient/" + r[1] for r in rows]])
        return qu

    def include_by_id(table):
        def inc(rows):
            ids = sorted({x.split("/", 1)[1] for r in rows for x in r[3] or []})
            return f"SELECT 'include', id, content FROM {table} WHERE id = ANY (%s)", [ids]
        return inc

    def c_include_prac(rng):
        r = "Patient/" + patient(rng)["id"]
        sql = f"SELECT 'match', id, content, practitioner FROM encounter WHERE subject = %s {PAGE}"
        qu = q("Encounter", [("subject", r), ("_include", "Encounter:practitioner")], sql, [r],
               "SELECT id FROM encounter WHERE subject = %s", [r])
        qu["reselect"] = "SELECT 'match', id, '', practitioner FROM encounter WHERE id = ANY (%s)"
        qu["include"] = include_by_id("practitioner")
        return qu

    def c_include_result(rng):
        r = "Patient/" + patient(rng)["id"]
        results = "array(SELECT x FROM unnest(result) x WHERE x LIKE 'Observation/%%')"
        sql = f"SELECT 'match', id, content, {results} FROM diagnosticreport WHERE subject = %s {PAGE}"
        qu = q("DiagnosticReport", [("subject", r), ("_include", "DiagnosticReport:result")], sql, [r],
               "SELECT id FROM diagnosticreport WHERE subject = %s", [r])
        qu["reselect"] = f"SELECT 'match', id, '', {results} FROM diagnosticreport WHERE id = ANY (%s)"
        qu["include"] = include_by_id("observation")
        return qu

    # (name, example, generator, target p95 ms or None, what the page check compares)
    return [
        ("token", "Observation?code=http://loinc.org\\|X", c_token, 20, "ids"),
        ("reference", "Observation?subject=Patient/X", c_reference, 20, "ids"),
        ("date range", "Observation?date=geD1&date=ltD2 (7 days)", c_date, 20, "ids"),
        ("string", "Patient?name=Prefix", c_string, 20, "ids"),
        ("quantity", "Observation?value-quantity=gtN\\|http://unitsofmeasure.org\\|U", c_quantity, 20, "ids"),
        ("token + reference", "Observation?subject=Patient/X&code=S\\|C", c_token_ref, None, "ids"),
        ("_sort", "Observation?subject=Patient/X&_sort=-date", c_sort, None, "dates"),
        ("chained", "Observation?subject:Patient.name=Family", c_chained, 100, "ids"),
        ("_revinclude", "Patient?_id=X&_revinclude=Observation:subject", c_revinclude, 100, "ids"),
        ("_include", "Encounter?subject=Patient/X&_include=Encounter:practitioner", c_include_prac, None, "ids"),
        ("_include", "DiagnosticReport?subject=Patient/X&_include=DiagnosticReport:result", c_include_result, None, "ids"),
    ]


# ---------------------------------------------------------------------------------------------
# Running and checking


def summarize_ledger(body):
    b = json.loads(body)
    match, include = [], []
    for e in b.get("entry", []):
        mode = e.get("search", {}).get("mode", "match")
        r = e.get("resource", {})
        if mode == "match":
            match.append(r)
        elif mode == "include":
            include.append(r)
    return b.get("total"), match, include


def check(pg, qu, kind, ledger_body, pg_rows):
    """Compares fhir-ledger's answer with PostgreSQL's, outside the timed section. Returns
    (count problem, page problem, True if only the order of the page differs). Without _sort
    FHIR leaves the order open, so a page is right when it holds min(total, _count) distinct
    matching resources; with _sort, the sequence of sort values must be the same. Includes
    are checked against fhir-ledger's own page."""
    total, match, include = summarize_ledger(ledger_body)
    all_ids = {r[0] for r in pg.execute(qu["ids_sql"], qu["ids_args"]).fetchall()}
    pg_match = [json.loads(r[2]) for r in pg_rows if r[0] == "match"]
    ids = [r.get("id") for r in match]
    counts, page, order = [], None, False
    if total is not None and total != len(all_ids):
        counts.append(f"total {total} vs {len(all_ids)}")
    if len(match) != len(pg_match):
        counts.append(f"page {len(match)} vs {len(pg_match)}")
    if "include" in qu:
        own = pg.execute(qu["reselect"], [ids]).fetchall()
        isql, iargs = qu["include"](own)
        want = sorted(r[1] for r in pg.execute(isql, iargs).fetchall())
        got = sorted(r.get("id") for r in include)
        if len(got) != len(want):
            counts.append(f"included {len(got)} vs {len(want)}")
        elif got != want:
            page = "other included resources"
    elif include:
        counts.append(f"included {len(include)} vs 0")
    if not counts and not page:
        if len(set(ids)) != len(ids):
            page = "page repeats resources"
        elif not set(ids) <= all_ids:
            page = f"{len(set(ids) - all_ids)} resources on the page do not match"
        elif kind == "dates":
            if [r.get("effectiveDateTime") for r in match] != [r.get("effectiveDateTime") for r in pg_match]:
                page = "page not in _sort order"
        else:
            order = ids != [r.get("id") for r in pg_match]
    return ("; ".join(counts) or None), page, order


def outcome_text(body):
    try:
        b = json.loads(body)
        return "; ".join(i.get("diagnostics", i.get("code", "")) for i in b.get("issue", []))[:200]
    except ValueError:
        return body[:200].decode("utf-8", "replace")


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    f = int(k)
    c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)


def fmt(x):
    if x is None:
        return "—"
    return f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def timed_get(client, path):
    """(status or None, body, ms): request sent until the whole body is read."""
    t = time.perf_counter()
    try:
        status, body = client.get(path)
    except (http.client.HTTPException, OSError) as e:
        status, body = None, str(e).encode()
    return status, body, (time.perf_counter() - t) * 1e3


def compare_servers(kind, a_body, b_body):
    """fhir-ledger's answer against the peer's, on what FHIR fixes: `total` (when both give
    one), the page size, the number of included resources; with _sort, the sequence of sort
    values; when the page holds the whole result (fewer than _count matches), the same ids,
    and then the same included ids. Without _sort and with more matches than _count, each
    server may page a different subset (FHIR leaves the order open): not compared. Returns
    a problem or None."""
    ta, ma, ia = summarize_ledger(a_body)
    tb, mb, ib = summarize_ledger(b_body)
    probs = []
    if ta is not None and tb is not None and ta != tb:
        probs.append(f"total {ta} vs {tb}")
    if len(ma) != len(mb):
        probs.append(f"page {len(ma)} vs {len(mb)}")
    if len(ia) != len(ib):
        probs.append(f"included {len(ia)} vs {len(ib)}")
    if probs:
        return "; ".join(probs)
    if kind == "dates":
        if [r.get("effectiveDateTime") for r in ma] != [r.get("effectiveDateTime") for r in mb]:
            return "other _sort order"
    elif len(ma) < COUNT:
        if sorted(r.get("id") for r in ma) != sorted(r.get("id") for r in mb):
            return "other resources on the page"
        if sorted(r.get("id") for r in ia) != sorted(r.get("id") for r in ib):
            return "other included resources"
    return None


def run_class(ledger, pg, cls, n, warmup, seed, verbose, peer=None, peer_name="peer"):
    """Times one class. Sides: fhir-ledger, PostgreSQL (with --pg), the peer FHIR server (with
    --peer); the order of the sides rotates query by query so that background load falls on
    every side alike. fhir-ledger's and the peer's answers are each checked against
    PostgreSQL's (check) and against each other (compare_servers), outside the timed section."""
    name, example, gen, target, kind = cls
    rng = random.Random(f"{seed}/{name}/{example}")
    queries = [gen(rng) for _ in range(warmup + n)]
    lat_l, lat_p, errors, count_bad, page_bad, bytes_l, bytes_p, reordered = [], [], {}, [], [], [], [], 0
    x = {"lat": [], "errors": {}, "count_bad": [], "page_bad": [], "reordered": 0, "bytes": [], "no_total": 0,
         "vs_ledger": []}
    sides = ["ledger"] + (["pg"] if pg is not None else []) + (["peer"] if peer is not None else [])
    for i, qu in enumerate(queries):
        measured = i >= warmup
        k = i % len(sides)
        for side in sides[k:] + sides[:k]:
            if side == "ledger":
                status, body, el = timed_get(ledger, qu["path"])
            elif side == "peer":
                xstatus, xbody, ex = timed_get(peer, qu["path"])
            else:
                t = time.perf_counter()
                rows = pg.execute(qu["sql"], qu["args"]).fetchall()
                if "include" in qu:
                    isql, iargs = qu["include"](rows)
                    rows += pg.execute(isql, iargs).fetchall()
                ep = (time.perf_counter() - t) * 1e3
        if not measured:
            continue
        if pg is not None:
            lat_p.append(ep)
            bytes_p.append(sum(len(r[2]) for r in rows))
        if peer is not None:
            if xstatus != 200:
                msg = f"HTTP {xstatus}: {outcome_text(xbody)}" if xstatus else f"connection: {xbody.decode()}"
                x["errors"].setdefault(msg, []).append(qu["path"])
            else:
                x["lat"].append(ex)
                x["bytes"].append(len(xbody))
                if summarize_ledger(xbody)[0] is None:
                    x["no_total"] += 1
                if pg is not None:
                    cp, pp, other_order = check(pg, qu, kind, xbody, rows)
                    if cp:
                        x["count_bad"].append((qu["path"], cp))
                    elif pp:
                        x["page_bad"].append((qu["path"], pp))
                    x["reordered"] += other_order
                if status == 200:
                    problem = compare_servers(kind, body, xbody)
                    if problem:
                        x["vs_ledger"].append((qu["path"], problem))
        if status != 200:
            msg = f"HTTP {status}: {outcome_text(body)}" if status else f"connection: {body.decode()}"
            errors.setdefault(msg, []).append(qu["path"])
            continue
        lat_l.append(el)
        bytes_l.append(len(body))
        if pg is None:
            continue
        cp, pp, other_order = check(pg, qu, kind, body, rows)
        if cp:
            count_bad.append((qu["path"], cp))
        elif pp:
            page_bad.append((qu["path"], pp))
        reordered += other_order
    res = {"name": name, "example": example, "target": target, "n": n, "ledger": lat_l, "pg": lat_p,
           "errors": errors, "count_bad": count_bad, "page_bad": page_bad, "reordered": reordered,
           "bytes_l": statistics.mean(bytes_l) if bytes_l else None,
           "bytes_p": statistics.mean(bytes_p) if bytes_p else None}
    if peer is not None:
        res.update({"peer_name": peer_name, "peer": x["lat"], "peer_errors": x["errors"],
                    "peer_count_bad": x["count_bad"], "peer_page_bad": x["page_bad"],
                    "peer_reordered": x["reordered"], "peer_no_total": x["no_total"],
                    "peer_vs_ledger": x["vs_ledger"],
                    "bytes_x": statistics.mean(x["bytes"]) if x["bytes"] else None})
    lp = f"p50 {fmt(pct(lat_l, 50))} / p95 {fmt(pct(lat_l, 95))} ms" if lat_l else "no answers"
    pp = f", PostgreSQL p50 {fmt(pct(lat_p, 50))} / p95 {fmt(pct(lat_p, 95))} ms" if pg is not None else ""
    xp = ""
    if peer is not None:
        xl = x["lat"]
        xp = (f", {peer_name} " + (f"p50 {fmt(pct(xl, 50))} / p95 {fmt(pct(xl, 95))} ms" if xl else "no answers")
              + f" ({len(xl)} ok, {sum(map(len, x['errors'].values()))} errors)")
    print(f"  {name:18} {example}: fhir-ledger {lp} ({len(lat_l)} ok, {sum(map(len, errors.values()))} errors){pp}{xp}",
          flush=True)
    if verbose:
        for who, errs, cb, pb, ro in [("fhir-ledger", errors, count_bad, page_bad, reordered)] + (
                [(peer_name, x["errors"], x["count_bad"], x["page_bad"], x["reordered"])] if peer is not None else []):
            tag = f"{who}: " if peer is not None else ""
            for msg, paths in errs.items():
                print(f"      {tag}error x{len(paths)}: {msg}  e.g. {paths[0]}")
            for path, why in cb[:3]:
                print(f"      {tag}count differs from PostgreSQL: {why}  {path}")
            for path, why in pb[:3]:
                print(f"      {tag}page differs from PostgreSQL: {why}  {path}")
            if ro:
                print(f"      {tag}{ro} right pages in another order than PostgreSQL's (no _sort: FHIR leaves it open)")
        if peer is not None:
            if x["no_total"]:
                print(f"      {peer_name}: {x['no_total']} answers without `total`")
            for path, why in x["vs_ledger"][:3]:
                print(f"      fhir-ledger vs {peer_name}: {why}  {path}")
    return res


def ledger_table(results):
    print("| query class | n | fhir-ledger p50 / p95 / p99 ms | errors | mean response KiB |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        l = r["ledger"]
        print(f"| {r['name']}: `{r['example']}` | {r['n']} | {' / '.join(fmt(pct(l, x)) for x in (50, 95, 99))} "
              f"| {sum(map(len, r['errors'].values()))} | {r['bytes_l'] / 1024 if r['bytes_l'] else 0:.0f} |")


def table(results):
    print("| query class | n | fhir-ledger p50 / p95 / p99 ms | PostgreSQL p50 / p95 / p99 ms | p95 ratio (ledger / PG) "
          "| target | met | errors | count disagreements | page disagreements |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        l, p = r["ledger"], r["pg"]
        ratio = pct(l, 95) / pct(p, 95) if l else None
        target = f"p95 < {r['target']} ms, < PG" if r["target"] else "< PG"
        if not l or r["errors"]:
            met = "no (errors)" if r["errors"] else "—"
        else:
            ok = ratio < 1 and (r["target"] is None or pct(l, 95) < r["target"])
            met = "yes" if ok else "no"
        nerr = sum(map(len, r["errors"].values()))
        print(f"| {r['name']}: `{r['example']}` | {r['n']} "
              f"| {' / '.join(fmt(pct(l, x)) for x in (50, 95, 99))} "
              f"| {' / '.join(fmt(pct(p, x)) for x in (50, 95, 99))} "
              f"| {f'{ratio:.2f}x' if ratio else '—'} | {target} | {met} | {nerr} "
              f"| {len(r['count_bad']) if l else '—'} | {len(r['page_bad']) if l else '—'} |")


def peer_table(results, peer_name):
    """fhir-ledger beside the peer FHIR server, class by class."""
    has_pg = any(r["pg"] for r in results)
    print(f"| query class | n | fhir-ledger p50 / p95 / p99 ms | {peer_name} p50 / p95 / p99 ms "
          f"| p95 {peer_name} / fhir-ledger | fhir-ledger faster at p95 | errors (fhir-ledger / {peer_name}) "
          + (f"| disagreements with PostgreSQL, count + page (fhir-ledger / {peer_name}) " if has_pg else "")
          + f"| fhir-ledger vs {peer_name} disagreements |")
    print("| --- " * (8 + has_pg) + "|")
    for r in results:
        l, x = r["ledger"], r["peer"]
        ratio = pct(x, 95) / pct(l, 95) if l and x else None
        nerr = (sum(map(len, r["errors"].values())), sum(map(len, r["peer_errors"].values())))
        faster = "—" if ratio is None else ("yes" if ratio > 1 and not any(nerr) else "no (errors)" if any(nerr) else "no")
        dis = (f"| {len(r['count_bad']) + len(r['page_bad'])} / {len(r['peer_count_bad']) + len(r['peer_page_bad'])} "
               if has_pg else "")
        print(f"| {r['name']}: `{r['example']}` | {r['n']} "
              f"| {' / '.join(fmt(pct(l, q)) for q in (50, 95, 99))} "
              f"| {' / '.join(fmt(pct(x, q)) for q in (50, 95, 99))} "
              f"| {f'{ratio:.2f}x' if ratio else '—'} | {faster} | {nerr[0]} / {nerr[1]} {dis}"
              f"| {len(r['peer_vs_ledger'])} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="fhir-ledger base URL, with the data already loaded")
    ap.add_argument("--pg", help="libpq connection string of an empty PostgreSQL database; without it, time "
                    "fhir-ledger alone (no PostgreSQL, no answer checks; tests/bench/scale.sh)")
    ap.add_argument("--obs-patients", type=int, default=50,
                    help="without --pg: draw Observations from those of this many Patients (default 50)")
    ap.add_argument("--patient-keys", metavar="FILE",
                    help="without --pg: draw only from the Patients whose Synthea identifier FILE lists; "
                         "when FILE does not exist, write the identifiers of every Patient to it")
    ap.add_argument("-n", type=int, default=200, help="measured queries per class (default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="unmeasured queries per class first (default 20)")
    ap.add_argument("--seed", default="2001")
    ap.add_argument("--pg-order", choices=["id", "none"], default="id",
                    help="PostgreSQL page order without _sort: id (default; stable paging) or none (Medplum's default)")
    ap.add_argument("--pg-content", choices=["text", "jsonb"], default="text",
                    help="PostgreSQL type of the resource column (default text, as Medplum)")
    ap.add_argument("--only", help="comma-separated class names to run (default: all)")
    ap.add_argument("--json", help="also write the raw results to this file")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-class error and disagreement samples")
    ap.add_argument("--peer", metavar="NAME=URL",
                    help="also time the same FHIR searches against a second FHIR server at URL (holding the same "
                         "resources under the same ids; tests/bench/peer.sh), named NAME in the output; its answers "
                         "are checked against PostgreSQL's (with --pg) and against fhir-ledger's")
    a = ap.parse_args()

    ledger = Ledger(a.base)
    status, body = ledger.get("/metadata")
    software = json.loads(body).get("software", {}) if status == 200 else {}
    peer, peer_name = None, None
    if a.peer:
        peer_name, _, url = a.peer.partition("=")
        if not url:
            sys.exit("--peer takes NAME=URL")
        peer = Ledger(url)
        status, body = peer.get("/metadata")
        if status != 200:
            sys.exit(f"{peer_name} at {url}: GET /metadata: HTTP {status}")
        sw = json.loads(body).get("software", {})
        print(f"peer {peer_name} at {url}: {sw.get('name', '?')} {sw.get('version', '?')}")
    if a.pg:
        import psycopg
        from psycopg.types.string import TextLoader

        pg = psycopg.connect(a.pg, autocommit=True, prepare_threshold=None)
        pg.adapters.register_loader("jsonb", TextLoader)
        print(f"fhir-ledger {software.get('version', '?')} at {a.base}; "
              f"{pg.execute('SELECT version()').fetchone()[0].split(',')[0]}")
        print(f"loading PostgreSQL (content {a.pg_content}) from fhir-ledger's resources:", flush=True)
        facts = load(ledger, pg, a.pg_content)
        sizes = pg.execute("SELECT pg_size_pretty(pg_database_size(current_database()))").fetchone()[0]
        print(f"  PostgreSQL database size {sizes}")
    else:
        pg = None
        print(f"fhir-ledger {software.get('version', '?')} at {a.base}, alone (no PostgreSQL):", flush=True)
        facts = collect_facts(ledger, a.obs_patients, a.seed, a.patient_keys)

    classes = make_classes(facts, a.pg_order)
    if a.only:
        want = {s.strip() for s in a.only.split(",")}
        classes = [c for c in classes if c[0] in want]
    print(f"running {a.warmup} warm-up + {a.n} measured queries per class, _count={COUNT}, seed {a.seed}"
          + (f", PostgreSQL pages {'in id order' if a.pg_order == 'id' else 'unordered'} without _sort:" if pg else ":"),
          flush=True)
    results = [run_class(ledger, pg, c, a.n, a.warmup, a.seed, not a.quiet, peer, peer_name) for c in classes]
    print()
    if peer is not None:
        peer_table(results, peer_name)
        print()
        print(f"Mean response size (fhir-ledger / {peer_name}): "
              + "; ".join(f"{r['name']} {(r['bytes_l'] or 0) / 1024:.0f} / {(r['bytes_x'] or 0) / 1024:.0f} KiB"
                          for r in results))
        print()
    if pg is None:
        ledger_table(results)
    else:
        table(results)
        print()
        print("Mean response size (fhir-ledger body / PostgreSQL resource text): "
              + "; ".join(f"{r['name']} {r['bytes_l'] / 1024:.0f} / {r['bytes_p'] / 1024:.0f} KiB" if r["bytes_l"]
                          else f"{r['name']} — / {r['bytes_p'] / 1024:.0f} KiB" for r in results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()

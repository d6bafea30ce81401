// Differential search test: fhir-ledger against Medplum's in-memory repository (npm
// @medplum/fhir-router MemoryRepository + @medplum/core search), with a spec-derived oracle for
// what Medplum lacks or gets wrong. See README.md next to this file.
//
//   node search/diff.mjs --base http://127.0.0.1:8080            # from conformance/
//   options: --data DIR (Synthea bundles), --out DIR (corpus.json, report.json),
//            --only CLASS[,CLASS], --verbose
import { mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { buildCorpus } from './corpus.mjs';
import { MedplumWorker } from './medplum.mjs';
import { Oracle, cmpKey } from './oracle.mjs';
import { HttpError, Server, ensureFixtures, loadSynthea, readBack, serverTypes } from './server.mjs';

const here = dirname(fileURLToPath(import.meta.url));

// Known deviations of Medplum's in-memory search from the R4 spec. A query marked with one of
// these expects the SPEC behaviour (the oracle) from fhir-ledger; Medplum's answer is shown
// for information only. Quotes: http://hl7.org/fhir/R4/search.html
export const DEVIATIONS = {
  'string-default-contains': {
    medplum: 'matches every string parameter as a case-insensitive substring (String.includes)',
    spec: '"By default, a field matches a string query if the value of the field equals or starts with the supplied parameter value, after both have been normalized by case and combining characters." (3.1.1.4.8)',
  },
  'string-exact': {
    medplum: 'ignores :exact (still a case-insensitive substring match)',
    spec: '"The :exact modifier returns results that match the entire supplied parameter, including casing and accents." (3.1.1.4.8)',
  },
  'string-accents': {
    medplum: 'lower-cases but does not remove accents/combining characters',
    spec: '":contains (case insensitive and combining character-insensitive, search text matched anywhere in the string)" (3.1.1.4.4)',
  },
  'uri-contains': {
    medplum: 'matches uri parameters as a case-insensitive substring',
    spec: '"By default, matches are precise (e.g. case, accent, and escape) sensitive, and the entire URI must match." (3.1.1.4.9)',
  },
  'token-text': {
    medplum: 'treats :text as an exact (case-insensitive) equality with a code, display or text',
    spec: '":text The search parameter is processed as a string that searches text associated with the code/value - either CodeableConcept.text, Coding.display, or Identifier.type.text. In this case, the search functions as a normal string search" (3.1.1.4.10)',
  },
  'token-display': {
    medplum: 'indexes Coding.display and CodeableConcept.text as tokens without a system, so |[code] (and [code]) also match a display text equal to the code, case-insensitively',
    spec: '"[parameter]=|[code]: the value of [code] matches a Coding.code or Identifier.value, and the Coding/Identifier has no system property" (3.1.1.4.10)',
  },
  'date-eq-overlap': {
    medplum: 'eq/ne test whether the ranges overlap',
    spec: '"eq ... the range of the search value fully contains the range of the target value"; "ne ... the range of the search value does not fully contain the range of the target value" (3.1.1.4.5)',
  },
  'date-ne': {
    medplum: 'ne is "no value overlaps", and matches resources that have no value at all',
    spec: '"ne ... the range of the search value does not fully contain the range of the target value" (3.1.1.4.5): a prefix compares the values in the resource; only :not is defined to include resources without a value ("Note that this includes resources that have no value for the parameter", 3.1.1.4.10)',
  },
  'date-month-end': {
    medplum: 'ends every YYYY-MM range on day 31 (April, June, September, November and February run into the next month)',
    spec: '"Dates with the year and month are equivalent to an interval that starts at the first instant of the first day of the month and ends on the last instant of the last day of the month, e.g. 2000-04 is equivalent to an interval of [2000-04-01T00:00, 2000-04-30T23:59]." (3.1.1.4.7)',
  },
  'reference-forms': {
    medplum: 'only matches the exact stored reference string ("Type/id"): a bare id, the :[type] modifier and an absolute URL to the same server find nothing',
    spec: '"[parameter]=[id] the logical [id] of a resource using a local reference"; "GET [base]/Observation?subject:Patient=23 This has the same effect as the previous search"; "A relative reference resolving to the same value as a specified absolute URL, or vice versa, qualifies as a match." (3.1.1.4.12)',
  },
  'date-minutes': {
    medplum: 'rejects a dateTime search value with hours and minutes but no seconds (parse error)',
    spec: '"Note: Time can consist of hours and minutes with no seconds, unlike the XML Schema dateTime type." (3.1.1.4.7)',
  },
  'date-or': {
    medplum: 'validates the whole comma-separated date value as one date and rejects it',
    spec: '"Every search parameter may be used with comma-separated values in this fashion" (3.1.1.4.17)',
  },
  'medplum-error': {
    medplum: 'rejects a valid search request',
    spec: 'the request is valid R4 search syntax (see the query)',
  },
};

// Features Medplum's MemoryRepository does not implement at all (mode "oracle"), for the report.
export const NOT_IN_MEDPLUM = {
  number: 'number parameters (matchesSearchFilter has no case for "number": always false)',
  quantity: 'quantity parameters (no case for "quantity": always false)',
  composite: 'composite parameters (no case for "composite": always false)',
  'token-modifier': ':in, :not-in, :of-type (parsed, then matched as plain equality)',
  uri: ':below / :above on uri (parsed, then matched as substring)',
  reference: ':identifier on references (no token match on Reference.identifier)',
  chain: 'chained parameters (the filter code contains "." and matches nothing)',
  has: '_has (matches nothing)',
  include: '_include / _revinclude (ignored by MemoryRepository.search; "*" is rejected by the parser)',
  list: '_list (not a search parameter for Medplum: matches nothing)',
  text: '_text / _content (not search parameters for Medplum: match nothing)',
  compartment: 'compartment search (no route in FhirRouter for the memory repository; composed here from one Medplum search per compartment parameter)',
  system: 'system-level search (FhirRouter searches a pseudo type "MultipleTypes"; composed here from one Medplum search per type)',
};

function args() {
  const a = { data: resolve(here, '../../../shared/data/synthea'), out: join(here, 'out'), verbose: false };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k === '--base') a.base = argv[++i];
    else if (k === '--data') a.data = argv[++i];
    else if (k === '--out') a.out = argv[++i];
    else if (k === '--only') a.only = argv[++i].split(',');
    else if (k === '--verbose') a.verbose = true;
    else throw new Error(`unknown argument ${k}`);
  }
  if (!a.base) throw new Error('usage: node search/diff.mjs --base URL');
  return a;
}

const enc = (s) => encodeURIComponent(s).replace(/%3A/gi, ':').replace(/%2F/gi, '/').replace(/%2C/gi, ',');
const qs = (params) => params.map(([k, v]) => `${enc(k)}=${enc(v)}`).join('&');

function scopeOf(path) {
  if (path === '') return { system: true };
  const parts = path.split('/');
  if (parts.length === 3) return { type: parts[2], compartment: { type: parts[0], id: parts[1] } };
  return { type: path };
}

/** Runs a query against fhir-ledger, following next links; never throws. */
async function runOurs(server, q) {
  const params = [...(q.urlParams ?? []), ...q.params];
  const given = params.find(([k]) => k === '_count');
  const countOnly = params.some(([k, v]) => (k === '_summary' && v === 'count') || (k === '_count' && v === '0'));
  const extra = given || countOnly ? [] : [['_count', '1000']];
  let first;
  const t0 = Date.now();
  try {
    if (q.method === 'POST') {
      const url = `${q.path ? `${q.path}/` : ''}_search${q.urlParams?.length || extra.length ? `?${qs([...(q.urlParams ?? []), ...extra])}` : ''}`;
      first = await server.request('POST', url, {
        body: qs(q.params),
        headers: { 'content-type': 'application/x-www-form-urlencoded' },
      });
    } else {
      first = await server.get(`${q.path}?${qs([...params, ...extra])}`);
    }
  } catch (e) {
    return { error: `request failed: ${e.message}` };
  }
  const url = first.url;
  if (first.status !== 200 || first.json?.resourceType !== 'Bundle') {
    const diag = first.json?.issue?.map((i) => i.diagnostics ?? i.details?.text).join('; ') ?? first.text.slice(0, 300);
    return { error: `HTTP ${first.status}: ${diag}`, url };
  }
  const out = { url, matches: [], includes: [], pages: 0, pageSizes: [], total: first.json.total, outcomes: 0 };
  const seen = new Set();
  let page = first.json;
  for (;;) {
    out.pages++;
    let n = 0;
    for (const e of page.entry ?? []) {
      const k = e.resource ? `${e.resource.resourceType}/${e.resource.id}` : undefined;
      if (e.search?.mode === 'outcome' || e.resource?.resourceType === 'OperationOutcome') out.outcomes++;
      else if (e.search?.mode === 'include') out.includes.push(k);
      else {
        out.matches.push(k);
        n++;
      }
    }
    out.pageSizes.push(n);
    const next = page.link?.find((l) => l.relation === 'next')?.url;
    if (!next) break;
    if (seen.has(next) || out.pages > 3000) {
      out.error = `paging does not end (next link ${seen.has(next) ? 'repeats' : 'after 3000 pages'}): ${next}`;
      break;
    }
    seen.add(next);
    try {
      const pages = await server.searchAll(next, 1);
      page = pages[0];
    } catch (e) {
      out.error = `next page: ${e instanceof HttpError ? e.message : e}`;
      break;
    }
  }
  out.ms = Date.now() - t0;
  return out;
}

/** Medplum's result for a query, composing compartment and system searches from type searches. */
async function runMedplum(medplum, oracle, q) {
  // Medplum gets the filters and _sort only: no paging (we union our pages), no _summary (the
  // count is the size of its full result), no _include/_revinclude (it ignores them).
  const params = [...(q.urlParams ?? []), ...q.params].filter(
    ([k]) => !k.startsWith('_include') && !k.startsWith('_revinclude') && k !== '_count' && k !== '_summary'
  );
  const scope = scopeOf(q.path);
  const sortless = params;
  const union = new Map();
  let total = 0;
  const runOne = async (type, ps) => {
    const r = await medplum.search(type, ps);
    if (r.error) throw new Error(r.error);
    return r;
  };
  try {
    if (scope.system) {
      const types = params.find(([k]) => k === '_type')?.[1].split(',') ?? oracle.types();
      const rest = sortless.filter(([k]) => k !== '_type');
      for (const t of types) {
        const r = await runOne(t, rest);
        for (const id of r.ids) union.set(`${t}/${id}`, true);
      }
      return { ids: [...union.keys()], total: union.size };
    }
    if (scope.compartment) {
      const cparams = oracle.compartment.get(scope.type) ?? [];
      let order;
      for (const p of cparams) {
        const r = await runOne(scope.type, [...sortless, [p, `${scope.compartment.type}/${scope.compartment.id}`]]);
        for (const id of r.ids) union.set(`${scope.type}/${id}`, true);
        order ??= r.ids.map((id) => `${scope.type}/${id}`);
      }
      return { ids: cparams.length === 1 ? order : [...union.keys()], total: union.size };
    }
    const r = await runOne(scope.type, sortless);
    total = r.total;
    return { ids: r.ids.map((id) => `${scope.type}/${id}`), total };
  } catch (e) {
    return { error: e.message };
  }
}

const setDiff = (a, b) => [...a].filter((x) => !b.has(x));

function checkOrder(oracle, q, ours) {
  // Consecutive matches must be ordered by the spec's sort keys; entries without a value for a
  // key are not checked; equal keys must be ordered by id ascending (fhir-ledger's own rule).
  const params = [...(q.urlParams ?? []), ...q.params];
  const sort = oracle.search(scopeOf(q.path), params.filter(([k]) => k === '_sort')).sort;
  const keyOf = (k) => {
    const [type, id] = k.split('/');
    return sort.map((s) => oracle.sortKey(type, id, s));
  };
  const cmp = (a, b) => {
    for (let i = 0; i < sort.length; i++) {
      if (a[i] === undefined || b[i] === undefined) return undefined;
      const c = cmpKey(a[i], b[i]);
      if (c === undefined) return undefined;
      if (c !== 0) return sort[i].desc ? -c : c;
    }
    return 0;
  };
  const problems = [];
  let tieProblems = 0;
  let firstTie;
  const keys = ours.matches.map(keyOf);
  for (let i = 0; i + 1 < keys.length; i++) {
    const c = cmp(keys[i], keys[i + 1]);
    if (c === undefined) continue;
    if (c > 0 && problems.length < 3) {
      problems.push(`order: ${ours.matches[i]} (key ${JSON.stringify(keys[i])}) before ${ours.matches[i + 1]} (key ${JSON.stringify(keys[i + 1])})`);
    }
    // ties: only where the values are identical (Müller and Muller are equal to our folded key,
    // but a server may order them "as per realm convention")
    const rawEqual = () => {
      const raw = (k) => {
        const [type, id] = k.split('/');
        return JSON.stringify(sort.map((x) => oracle.sortKey(type, id, x, true)));
      };
      return raw(ours.matches[i]) === raw(ours.matches[i + 1]);
    };
    if (c === 0 && ours.matches[i].split('/')[1] > ours.matches[i + 1].split('/')[1] && rawEqual()) {
      tieProblems++;
      firstTie ??= `${ours.matches[i]} before ${ours.matches[i + 1]} with equal keys ${JSON.stringify(keys[i])}`;
    }
  }
  const violations = keys.slice(0, -1).filter((k, i) => cmp(k, keys[i + 1]) > 0).length;
  return { problems, violations, tieProblems, firstTie, keyOf, cmp };
}

/** Pairs of entries with distinct spec sort keys that Medplum orders the other way round. */
function medplumOrderDisagreements(order, medIds, oursIds) {
  const pos = new Map(medIds.map((k, i) => [k, i]));
  const common = oursIds.filter((k) => pos.has(k));
  let n = 0;
  let example;
  for (let i = 0; i + 1 < common.length; i++) {
    const a = common[i];
    const b = common[i + 1];
    const c = order.cmp(order.keyOf(a), order.keyOf(b));
    if (c === undefined || c === 0) continue;
    if (pos.get(a) > pos.get(b)) {
      n++;
      example ??= `${a} vs ${b}`;
    }
  }
  return { n, example };
}

function judge(q, ours, med, orc, oracle) {
  const problems = [];
  const info = [];
  const params = [...(q.urlParams ?? []), ...q.params];
  const countParam = params.find(([k]) => k === '_count')?.[1];
  const countOnly = params.some(([k, v]) => (k === '_summary' && v === 'count') || (k === '_count' && v === '0'));
  const hasIncludes = params.some(([k]) => k.startsWith('_include') || k.startsWith('_revinclude'));
  let mode = q.mode;
  let deviation = q.deviation;
  if (mode === 'medplum' && med?.error) {
    mode = 'spec';
    deviation = 'medplum-error';
    info.push(`Medplum: ${med.error}`);
  }
  let must;
  let may;
  if (mode === 'medplum') {
    must = new Set(med.ids);
    may = must;
  } else {
    must = orc.matches;
    may = orc.may ?? orc.matches;
  }
  // harness self-check: oracle vs Medplum where Medplum is taken as the reference
  if (med && !med.error) {
    const mset = new Set(med.ids);
    const oMay = orc.may ?? orc.matches;
    const onlyMed = setDiff(mset, oMay);
    const onlyOrc = setDiff(orc.matches, mset);
    if (onlyMed.length || onlyOrc.length) {
      const what = `Medplum vs oracle: only Medplum ${onlyMed.length} ${onlyMed.slice(0, 3).join(' ')}; only oracle ${onlyOrc.length} ${onlyOrc.slice(0, 3).join(' ')}`;
      if (mode === 'medplum') info.push(`WARNING (harness): ${what}`);
      else info.push(what);
    }
  }
  const result = { mode, deviation, problems, info };
  if (ours.error) {
    problems.push(ours.error);
    return result;
  }
  const list = ours.matches;
  const set = new Set(list);
  if (set.size !== list.length) problems.push(`duplicate matches: ${list.length - set.size} (over ${ours.pages} pages)`);
  if (countOnly) {
    if (list.length) problems.push(`_summary=count / _count=0 returned ${list.length} matches`);
    if (typeof ours.total !== 'number') problems.push('no Bundle.total');
    else if (ours.total < must.size || ours.total > may.size) problems.push(`total ${ours.total}, expected ${must.size === may.size ? must.size : `${must.size}..${may.size}`}`);
    return result;
  }
  const onlyOurs = setDiff(set, may);
  const onlyExpected = setDiff(must, set);
  if (onlyOurs.length || onlyExpected.length) {
    result.onlyOurs = onlyOurs;
    result.onlyExpected = onlyExpected;
    problems.push(`matches: ${set.size} ours vs ${must.size === may.size ? must.size : `${must.size}..${may.size}`} expected; only ours ${onlyOurs.length}, only ${mode === 'medplum' ? 'Medplum' : 'oracle'} ${onlyExpected.length}`);
  }
  if (typeof ours.total === 'number' && (ours.total < must.size || ours.total > may.size) && !(onlyOurs.length || onlyExpected.length)) {
    problems.push(`Bundle.total ${ours.total} but ${set.size} matches`);
  }
  if (countParam && ours.pageSizes.some((n) => n > Number(countParam))) {
    problems.push(`a page holds ${Math.max(...ours.pageSizes)} matches, more than _count=${countParam}`);
  }
  if (hasIncludes) {
    const inc = new Set(ours.includes);
    const incMust = orc.includes;
    const incMay = orc.includesMay ?? orc.includes;
    const oi = setDiff(inc, incMay).filter((k) => !set.has(k));
    const oe = setDiff(incMust, inc).filter((k) => !set.has(k));
    if (oi.length || oe.length) {
      result.includesOnlyOurs = oi;
      result.includesOnlyExpected = oe;
      problems.push(`includes: ${inc.size} ours vs ${incMust.size} expected; only ours ${oi.length}, only oracle ${oe.length}`);
    }
  } else if (ours.includes.length) {
    problems.push(`${ours.includes.length} entries with search.mode=include, but no _include/_revinclude was asked`);
  }
  if (q.sort || params.some(([k]) => k === '_sort')) {
    const order = checkOrder(oracle, q, ours);
    problems.push(...order.problems);
    if (order.violations > order.problems.length) problems.push(`order: ${order.violations} out-of-order neighbours in all`);
    if (order.tieProblems) problems.push(`tie order (fhir-ledger's rule, not the spec's: equal keys by id ascending): ${order.tieProblems} pairs, e.g. ${order.firstTie}`);
    if (med && !med.error) {
      const d = medplumOrderDisagreements(order, med.ids, list);
      if (d.n) info.push(`Medplum orders ${d.n} neighbour pairs with distinct spec keys the other way (e.g. ${d.example}); see README: Medplum sorts by the JSON text of all values, keys applied last-first`);
    }
  }
  return result;
}

async function main() {
  const a = args();
  const t0 = Date.now();
  const server = new Server(a.base);
  const lap = (what) => console.log(`search-diff: ${what} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  const load = await loadSynthea(server, a.data);
  lap(`Synthea: ${load.present} bundles already on the server, ${load.loaded} loaded`);
  await ensureFixtures(server);
  const types = await serverTypes(server);
  const { resources, counts } = await readBack(server, types);
  lap(`read back ${resources.length} resources of ${Object.keys(counts).length} types`);
  const medplum = new MedplumWorker();
  const medLoaded = medplum.load(resources);
  const oracle = new Oracle(resources, { base: server.base });
  await medLoaded;
  lap('Medplum MemoryRepository and oracle loaded');
  let corpus = buildCorpus(oracle);
  mkdirSync(a.out, { recursive: true });
  writeFileSync(join(a.out, 'corpus.json'), JSON.stringify(corpus.map((q) => ({ ...q, url: `${q.method} ${q.path}${q.method === 'POST' ? '/_search' : ''}?${qs([...(q.urlParams ?? []), ...q.params])}` })), null, 1));
  if (a.only) corpus = corpus.filter((q) => a.only.includes(q.cls));
  lap(`corpus: ${corpus.length} queries written to ${join(a.out, 'corpus.json')}`);

  const results = [];
  const spent = { medplum: 0, oracle: 0, wait: 0 };
  for (const q of corpus) {
    // fhir-ledger, Medplum (worker thread) and the oracle (this thread) work at the same time
    const oursP = runOurs(server, q);
    let t = Date.now();
    const medP = q.mode === 'oracle' ? undefined : runMedplum(medplum, oracle, q).then((r) => ((r.ms = Date.now() - t), r));
    const params = [...(q.urlParams ?? []), ...q.params];
    let orc;
    try {
      orc = oracle.search(scopeOf(q.path), params);
    } catch (e) {
      orc = { error: e.message, matches: new Set(), includes: new Set() };
    }
    const oracleMs = Date.now() - t;
    spent.oracle += oracleMs;
    t = Date.now();
    const med = await medP;
    const medplumMs = med?.ms ?? 0;
    spent.medplum += Date.now() - t;
    t = Date.now();
    const ours = await oursP;
    spent.wait += Date.now() - t;
    const r = judge(q, ours, med, orc, oracle);
    if (orc.error) r.problems.unshift(`HARNESS: oracle failed: ${orc.error}`);
    const rec = {
      id: q.id,
      cls: q.cls,
      method: q.method,
      query: `${q.path}${q.method === 'POST' ? '/_search' : ''}?${qs(params)}`,
      mode: r.mode,
      deviation: r.deviation,
      note: q.note,
      ok: r.problems.length === 0,
      problems: r.problems,
      info: r.info,
      onlyOurs: r.onlyOurs?.slice(0, 20),
      onlyExpected: r.onlyExpected?.slice(0, 20),
      includesOnlyOurs: r.includesOnlyOurs?.slice(0, 20),
      includesOnlyExpected: r.includesOnlyExpected?.slice(0, 20),
      ours: ours.error ? undefined : { matches: ours.matches.length, includes: ours.includes.length, pages: ours.pages, total: ours.total, ms: ours.ms },
      expected: { matches: orc.matches.size, medplum: med?.ids?.length },
      ms: { oracle: oracleMs, medplum: medplumMs },
    };
    results.push(rec);
    if (a.verbose) console.log(`${rec.ok ? 'ok  ' : 'FAIL'} ${rec.id} ${rec.cls} ${rec.query}${rec.ok ? '' : `\n     ${rec.problems.join('\n     ')}`}`);
  }
  lap(`ran ${results.length} queries (${server.requests} HTTP requests; oracle ${(spent.oracle / 1000).toFixed(1)} s, then waiting for Medplum ${(spent.medplum / 1000).toFixed(1)} s and for fhir-ledger ${(spent.wait / 1000).toFixed(1)} s)`);
  writeFileSync(join(a.out, 'report.json'), JSON.stringify(results, null, 1));
  summarize(results, corpus);
  lap('done');
  const failed = results.filter((r) => !r.ok).length;
  await medplum.terminate();
  console.log(`search-diff: ${results.length - failed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

function summarize(results, corpus) {
  const byCls = new Map();
  for (const r of results) {
    const c = byCls.get(r.cls) ?? { n: 0, fail: 0, modes: {} };
    c.n++;
    if (!r.ok) c.fail++;
    c.modes[r.mode] = (c.modes[r.mode] ?? 0) + 1;
    byCls.set(r.cls, c);
  }
  console.log('\nclass              queries  failed  expected result from');
  for (const [cls, c] of byCls) {
    console.log(`${cls.padEnd(18)} ${String(c.n).padStart(7)} ${String(c.fail).padStart(7)}  ${Object.entries(c.modes).map(([m, n]) => `${m} ${n}`).join(', ')}`);
  }
  const devs = new Map();
  for (const r of results) if (r.deviation) devs.set(r.deviation, (devs.get(r.deviation) ?? 0) + 1);
  if (devs.size) {
    console.log('\nqueries asserting the spec where Medplum deviates (see README.md):');
    for (const [d, n] of devs) console.log(`  ${d.padEnd(24)} ${n}  Medplum ${DEVIATIONS[d]?.medplum ?? ''}`);
  }
  const warnings = results.filter((r) => r.info?.some((i) => i.startsWith('WARNING')));
  if (warnings.length) {
    console.log(`\nharness warnings (oracle and Medplum disagree where Medplum is the reference): ${warnings.length}`);
    for (const r of warnings.slice(0, 15)) console.log(`  ${r.id} ${r.query}\n     ${r.info.filter((i) => i.startsWith('WARNING')).join('\n     ')}`);
  }
  const fails = results.filter((r) => !r.ok);
  if (fails.length) {
    // group identical first problems (e.g. one unsupported parameter) to keep the output short
    console.log(`\nmismatches: ${fails.length}`);
    for (const r of fails) {
      console.log(`  ${r.id} [${r.cls}, expected: ${r.mode}${r.deviation ? ` (${r.deviation})` : ''}] ${r.query}`);
      for (const p of r.problems) console.log(`     ${p.length > 400 ? `${p.slice(0, 400)}…` : p}`);
      if (r.onlyOurs?.length) console.log(`     only in ours: ${r.onlyOurs.slice(0, 5).join(' ')}${r.onlyOurs.length > 5 ? ' …' : ''}`);
      if (r.onlyExpected?.length) console.log(`     only in ${r.mode === 'medplum' ? 'Medplum' : 'oracle'}: ${r.onlyExpected.slice(0, 5).join(' ')}${r.onlyExpected.length > 5 ? ' …' : ''}`);
      if (r.includesOnlyOurs?.length) console.log(`     includes only in ours: ${r.includesOnlyOurs.slice(0, 5).join(' ')}`);
      if (r.includesOnlyExpected?.length) console.log(`     includes only in oracle: ${r.includesOnlyExpected.slice(0, 5).join(' ')}`);
    }
  }
  console.log(`\ncorpus: ${corpus.length} queries; per class: ${[...byCls].map(([c, v]) => `${c} ${v.n}`).join(', ')}`);
}

main().catch((e) => {
  console.error(`search-diff: ${e.stack ?? e}`);
  process.exit(2);
});

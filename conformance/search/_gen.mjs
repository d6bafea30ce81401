import { readFileSync } from 'node:fs';
import { Oracle } from './oracle.mjs';
import { buildCorpus } from './corpus.mjs';
const res = JSON.parse(readFileSync('/tmp/helper-data.json'));
let t = Date.now();
const o = new Oracle(res, { base: 'http://127.0.0.1:38629' });
console.log('oracle', Date.now() - t); t = Date.now();
const c = buildCorpus(o);
console.log('corpus', c.length, Date.now() - t); t = Date.now();
const per = {}; for (const q of c) per[q.cls] = (per[q.cls] ?? 0) + 1; console.log(per);
let errs = 0;
for (const q of c) {
  const path = q.path; const scope = path === '' ? { system: true } : path.split('/').length === 3 ? { type: path.split('/')[2], compartment: { type: 'Patient', id: path.split('/')[1] } } : { type: path };
  try { const r = o.search(scope, [...(q.urlParams ?? []), ...q.params]); q.n = r.matches.size; } catch (e) { errs++; console.log('ERR', q.id, q.path, JSON.stringify(q.params), e.message); }
}
console.log('oracle all', Date.now() - t, 'errors', errs);
for (const q of c.slice(0, 1000)) if (q.n === 0 || q.n === undefined) console.log('empty', q.id, q.cls, q.path, JSON.stringify(q.params));

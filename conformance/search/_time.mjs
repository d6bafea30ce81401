import { Server, loadSynthea, ensureFixtures, serverTypes, readBack } from './server.mjs';
import { Medplum } from './medplum.mjs';
import { writeFileSync } from 'node:fs';
const s = new Server(process.argv[2]);
let t = Date.now();
console.log(await loadSynthea(s, '/work/shared/data/synthea'), Date.now() - t); t = Date.now();
const fx = await ensureFixtures(s); console.log('fixtures', Date.now() - t); t = Date.now();
const types = await serverTypes(s);
const rb = await readBack(s, types); console.log('readback', rb.resources.length, Date.now() - t, rb.counts); t = Date.now();
writeFileSync('/tmp/helper-data.json', JSON.stringify(rb.resources));
const m = new Medplum(); console.log('index', Date.now() - t); t = Date.now();
await m.load(rb.resources); console.log('mload', Date.now() - t); t = Date.now();
for (const q of [['Observation', [['code', '8867-4']]], ['Observation', [['status', 'final']]], ['Observation', [['date', 'ge2018']]], ['Observation', [['subject', 'Patient/' + fx.plain.id]]], ['Encounter', [['date', 'ge2018'], ['_sort', '-date']]], ['Observation', [['value-quantity', 'gt5']]]]) {
  const r = await m.search(...q); console.log(JSON.stringify(q), r.error ?? r.ids.length, r.total, Date.now() - t); t = Date.now();
}
console.log(process.memoryUsage().rss / 1e6);

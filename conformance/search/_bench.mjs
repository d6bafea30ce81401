import { Medplum } from './medplum.mjs';
import { readFileSync } from 'node:fs';
const res = JSON.parse(readFileSync('/tmp/helper-data.json'));
const m = new Medplum(); await m.load(res);
let t = Date.now();
for (const q of [['Observation', []], ['Observation', [['category:missing', 'false']]], ['Observation', [['patient', 'Patient/x']]], ['Observation', [['subject', 'Patient/x']]], ['Observation', [['code', '8867-4']]], ['Observation', [['date', 'gt2015']]], ['Observation', [['_lastUpdated', 'gt2015']]], ['Condition', [['_sort', 'onset-date']]]]) {
  const r = await m.search(...q); console.log(JSON.stringify(q), r.error ?? r.ids.length, Date.now() - t); t = Date.now();
}

import { Medplum } from './medplum.mjs';
import { readFileSync } from 'node:fs';
const res = JSON.parse(readFileSync('/tmp/helper-data.json'));
let t = Date.now();
const m = new Medplum(); await m.load(res); console.log('load', Date.now() - t); t = Date.now();
for (const q of [['Observation', [['code', '8867-4']]], ['Observation', [['status', 'final']]], ['Observation', [['date', 'ge2018']]], ['Observation', [['subject', 'Patient/x']]], ['Encounter', [['date', 'ge2018'], ['_sort', '-date']]], ['Observation', [['_lastUpdated', 'gt2020']]],['Patient', [['name:contains', 'a']]],['Observation', [['code', 'http://loinc.org|8867-4'],['date','lt2020']]]]) {
  const r = await m.search(...q); console.log(JSON.stringify(q), r.error ?? r.ids.length, r.total, Date.now() - t); t = Date.now();
}

import { readFileSync } from 'node:fs';
import { Oracle } from './oracle.mjs';
const res = JSON.parse(readFileSync('/tmp/helper-data.json'));
const o = new Oracle(res, { base: 'http://127.0.0.1:38629' });
const first = (t, c) => { for (const [id, tvs] of o.values(t, c)) if (tvs.length) return JSON.stringify(tvs).slice(0, 300); };
for (const [t, c] of [['Patient','name'],['Patient','address'],['CarePlan','date'],['RiskAssessment','date'],['Encounter','date'],['Condition','encounter'],['DiagnosticReport','result'],['Encounter','participant'],['Device','patient'],['Observation','patient']]) console.log(t, c, o.param(t,c)?.expression?.slice(0,100), '=>', o.expression(t, o.param(t,c)), first(t, c));

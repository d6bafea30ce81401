// A third-party Bulk Data client against fhir-ledger: @medplum/core's MedplumClient.bulkExport
// kicks off a Patient-level export (POST with Prefer: respond-async, as Medplum sends it),
// polls the status URL to the manifest, and every file it lists is downloaded and checked:
// line count, SHA-256 against the manifest's extension, and each line a resource of the
// file's type. Usage: node bulk/medplum-export.mjs --base URL
import { createHash } from 'node:crypto';
import { MedplumClient } from '@medplum/core';

const arg = (name) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : undefined;
};
const base = (arg('--base') ?? process.env.FHIR_BASE ?? '').replace(/\/$/, '');
if (!base) {
  console.error('usage: node bulk/medplum-export.mjs --base URL');
  process.exit(2);
}

const medplum = new MedplumClient({ baseUrl: base + '/', fhirUrlPath: '', fetch });
const manifest = await medplum.bulkExport('Patient', 'Patient,Observation', undefined, {
  pollStatusOnAccepted: true,
  pollStatusPeriod: 1000,
});
const fail = (why) => {
  console.error(`bulk (Medplum client): ${why}`);
  process.exit(1);
};
if (!Array.isArray(manifest?.output) || manifest.output.length === 0) fail(`no output in ${JSON.stringify(manifest)}`);
if (!manifest.transactionTime || manifest.requiresAccessToken !== false) fail(`manifest fields: ${JSON.stringify(manifest)}`);
let lines = 0;
for (const item of manifest.output) {
  if (!['Patient', 'Observation'].includes(item.type)) fail(`a file of type ${item.type} was not asked for`);
  const res = await fetch(item.url);
  if (res.status !== 200) fail(`${item.url}: ${res.status}`);
  const text = await res.text();
  const digest = createHash('sha256').update(text).digest('hex');
  if (digest !== item.extension?.['urn:fhir-ledger:bulk:sha256']) fail(`${item.url}: SHA-256 differs from the manifest's`);
  const rows = text.split('\n').filter((l) => l.length > 0);
  if (rows.length !== item.count) fail(`${item.url}: ${rows.length} lines, manifest says ${item.count}`);
  for (const row of rows) {
    const r = JSON.parse(row);
    if (r.resourceType !== item.type || !r.id || !r.meta?.versionId) fail(`${item.url}: a line is not a stored ${item.type}`);
  }
  lines += rows.length;
}
console.log(`bulk (Medplum client): ${manifest.output.length} files, ${lines} resources, digests and counts match`);

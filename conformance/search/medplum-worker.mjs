// Worker thread holding Medplum's MemoryRepository (see MedplumWorker in medplum.mjs).
import { parentPort } from 'node:worker_threads';
import { Medplum } from './medplum.mjs';

const medplum = new Medplum();
parentPort.on('message', async ({ id, op, args }) => {
  try {
    let result;
    if (op === 'load') {
      await medplum.load(JSON.parse(args));
      result = true;
    } else if (op === 'search') {
      result = await medplum.search(args.type, args.params);
    } else throw new Error(`unknown op ${op}`);
    parentPort.postMessage({ id, result });
  } catch (e) {
    parentPort.postMessage({ id, error: String(e?.stack ?? e) });
  }
});

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import {
  AuthenticationError, NotFoundError, OptimClient, UnprocessableEntityError,
} from "../index.js";
import { startServer } from "./server.js";

let server;
let keyed;
before(async () => {
  server = await startServer();
  keyed = await startServer({ OPTIM_API_KEYS: "sk-js" });
});
after(() => { server.stop(); keyed.stop(); });

test("named typed arrays in, named typed arrays out, over the binary wire", async () => {
  const client = new OptimClient(server.url);
  const session = await client.createSession({
    params: { w: { data: new Float64Array([1, 2, 3, 4]), shape: [2, 2] }, b: new Float64Array([0.5]) },
    optimizer: { type: "sgd", lr: 0.5 },
  });
  assert.equal(session.dtype, "float64");
  assert.equal(session.metadata.params, undefined); // Prefer: return=minimal: the client keeps its own
  assert.deepEqual(Array.from(session.params.w), [1, 2, 3, 4]);
  assert.deepEqual(session.params.b, new Float64Array([0.5]));
  const out = await session.step({ w: new Float64Array([1, 1, 1, 1]), b: new Float64Array([1]) });
  assert.ok(out.w instanceof Float64Array);
  assert.deepEqual(Array.from(out.w), [0.5, 1.5, 2.5, 3.5]);
  assert.deepEqual(Array.from(out.b), [0]);
  assert.equal(session.stepCount, 1);
  const again = await client.getSession(session.id);
  assert.deepEqual(Array.from(again.params.w), [0.5, 1.5, 2.5, 3.5]);
  assert.equal(again.stepCount, 1);
  await session.delete();
  await assert.rejects(session.step({ w: new Float64Array(4), b: new Float64Array(1) }), NotFoundError);
});

test("one Float32Array in, one out; Adam matches a float32 reference", async () => {
  const client = new OptimClient(server.url);
  const session = await client.createSession({ params: new Float32Array([1, -1]), optimizer: { type: "adam", lr: 0.1 } });
  assert.equal(session.dtype, "float32");
  let out;
  for (let i = 0; i < 3; i++) out = await session.step(new Float32Array([0.5, -0.25]));
  assert.ok(out instanceof Float32Array);
  // Adam with a constant gradient moves each coordinate by lr per step: m̂/√v̂ = sign(g).
  assert.ok(Math.abs(out[0] - 0.7) < 1e-5 && Math.abs(out[1] + 0.7) < 1e-5, String(out));
});

test("typed errors carry the server's detail", async () => {
  const client = new OptimClient(server.url);
  const session = await client.createSession({ params: new Float32Array(3), optimizer: { type: "sgd" } });
  await assert.rejects(session.step(new Float32Array(2)), /expected 3 values/);
  await assert.rejects(
    client.createSession({ params: new Float32Array(1), optimizer: { type: "adam", lr: -1 } }),
    (e) => e instanceof UnprocessableEntityError && e.status === 422 && e.detail.includes("Invalid learning rate"),
  );
  await assert.rejects(new OptimClient(keyed.url).listSessions(), AuthenticationError);
  const ok = await new OptimClient(keyed.url, { apiKey: "sk-js" }).listSessions();
  assert.deepEqual(ok.sessions, []);
});

test("a checkpoint restores bit-exactly", async () => {
  const client = new OptimClient(server.url);
  const session = await client.createSession({ params: new Float64Array([1, 2]), optimizer: { type: "rmsprop", lr: 0.01 } });
  await session.step(new Float64Array([0.3, 0.1]));
  const copy = await client.restore(await session.state());
  assert.equal(copy.stepCount, 1);
  const a = await session.step(new Float64Array([0.2, 0.2]));
  const b = await copy.step(new Float64Array([0.2, 0.2]));
  assert.deepEqual(Array.from(a), Array.from(b));
  const catalogue = await client.optimizers();
  assert.ok(catalogue.some((o) => o.type === "adamw"));
});

test("workers contribute to synchronous rounds; a waiting contributor gets the round's params", async () => {
  const client = new OptimClient(server.url);
  const session = await client.createSession({
    params: new Float64Array([0, 0]), optimizer: { type: "sgd", lr: 1 },
    aggregation: { mode: "sync", contributions: 2, weighting: "weighted" },
  });
  assert.equal(session.aggregation, "sync");
  const waiting = session.contribute(new Float64Array([1, 2]), { worker: "a", weight: 1, round: 0, wait: 10 });
  await new Promise((resolve) => setTimeout(resolve, 100));
  const other = await client.getSession(session.id);
  const done = await other.contribute(new Float64Array([4, 5]), { worker: "b", weight: 2 });
  assert.deepEqual(Array.from(done), [-3, -4]); // (1·[1,2] + 2·[4,5]) / 3
  assert.deepEqual(Array.from(await waiting), [-3, -4]);
  const open = await session.contribute(new Float64Array([1, 1]), { worker: "a" });
  assert.equal(open, null);
  assert.deepEqual([session.lastRound.round, session.lastRound.received], [1, 1]);
  assert.deepEqual((await session.round()).workers, ["a"]);
  await assert.rejects(session.contribute(new Float64Array([1, 1]), { worker: "a" }), (e) => e.status === 409);
});

test("asynchronous pushes state the step they were computed on", async () => {
  const client = new OptimClient(server.url);
  const a = await client.createSession({
    params: new Float64Array([0]), optimizer: { type: "sgd", lr: 1 },
    aggregation: { mode: "async", max_staleness: 1, staleness_scale: { type: "inverse" } },
  });
  const b = await client.getSession(a.id);
  await a.step(new Float64Array([1])); // step 0 → 1
  assert.deepEqual(Array.from(await b.step(new Float64Array([1]))), [-1.5]); // computed on step 0: τ = 1, lr / 2
  await assert.rejects(b.step(new Float64Array([1]), { baseStep: 0 }), (e) => e.status === 409); // τ = 2 > 1
});

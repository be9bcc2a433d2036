// Trains through optim-service from JavaScript: node examples/train.mjs <url> <problem.json>
// problem.json: {"optimizer": {...}, "dtype": "float64", "params": {name: {data, shape}}, "gradients": [{name: [..]}]}
// Prints the final params as JSON ({name: [...]}, flat C order).
import { readFileSync } from "node:fs";
import { OptimClient } from "../index.js";

const [url, file] = process.argv.slice(2);
const problem = JSON.parse(readFileSync(file, "utf8"));
const Typed = problem.dtype === "float32" ? Float32Array : Float64Array;
const client = new OptimClient(url);
const params = Object.fromEntries(
  Object.entries(problem.params).map(([n, t]) => [n, { data: Typed.from(t.data), shape: t.shape }]),
);
const session = await client.createSession({ params, optimizer: problem.optimizer, dtype: problem.dtype, schedule: problem.schedule });
let out;
for (const grads of problem.gradients) {
  out = await session.step(Object.fromEntries(Object.entries(grads).map(([n, g]) => [n, Typed.from(g)])));
}
console.log(JSON.stringify(Object.fromEntries(Object.entries(out).map(([n, a]) => [n, Array.from(a)]))));
await session.delete();

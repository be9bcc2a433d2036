// Starts a real `optim-service serve` on a free port for the tests; OPTIM_SERVICE_BIN names it.
import { spawn } from "node:child_process";
import { createServer } from "node:net";

function freePort() {
  return new Promise((resolve) => {
    const probe = createServer().listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

export async function startServer(env = {}) {
  const bin = process.env.OPTIM_SERVICE_BIN ?? "optim-service";
  const port = await freePort();
  const child = spawn(bin, ["serve", "--port", String(port), "--store", "memory"], {
    env: { ...process.env, ...env }, stdio: "ignore",
  });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 300; i++) {
    try {
      if ((await fetch(`${url}/healthz`)).ok) return { url, stop: () => child.kill() };
    } catch { /* not up yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  child.kill();
  throw new Error(`${bin} did not start`);
}

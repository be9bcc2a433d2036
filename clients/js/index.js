// optim-service client for Node 18+ and browsers: fetch, typed arrays, no dependencies.
// Tensors travel as raw little-endian bytes (application/octet-stream); metadata as JSON.

const JSON_TYPE = "application/json";
const BINARY = "application/octet-stream";
const RETRY_STATUSES = new Set([408, 409, 429, 502, 503, 504]);
const DTYPES = { float32: Float32Array, float64: Float64Array };

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error("optim-client needs a little-endian platform");
}

export class OptimError extends Error {}

/** The server answered with an error; `detail` says what to change. */
export class APIStatusError extends OptimError {
  constructor(status, detail, problem) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
    this.problem = problem ?? {};
  }
}
export class AuthenticationError extends APIStatusError {}
export class NotFoundError extends APIStatusError {}
export class ConflictError extends APIStatusError {}
export class PreconditionFailedError extends APIStatusError {}
export class PayloadTooLargeError extends APIStatusError {}
export class UnprocessableEntityError extends APIStatusError {}
export class RateLimitError extends APIStatusError {}
export class InternalServerError extends APIStatusError {}
export class APIConnectionError extends OptimError {}

const BY_STATUS = {
  401: AuthenticationError, 404: NotFoundError, 409: ConflictError, 412: PreconditionFailedError,
  413: PayloadTooLargeError, 422: UnprocessableEntityError, 429: RateLimitError,
};

function errorFor(status, detail, problem) {
  const Cls = BY_STATUS[status] ?? (status >= 500 ? InternalServerError : APIStatusError);
  return new Cls(status, detail, problem);
}

function randomKey() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return Array.from({ length: 32 }, () => Math.floor(Math.random() * 16).toString(16)).join("");
}

function bytesOf(array) {
  return new Uint8Array(array.buffer, array.byteOffset, array.byteLength);
}

function toBase64(array) {
  const bytes = bytesOf(array);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

function fromBase64(text, dtype) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return new DTYPES[dtype](bytes.buffer);
}

/** A tensor is a typed array (1-D) or {data, shape}; returns {data, shape}. */
function asTensor(value, name) {
  if (ArrayBuffer.isView(value)) return { data: value, shape: [value.length] };
  if (value && ArrayBuffer.isView(value.data) && Array.isArray(value.shape)) return value;
  throw new TypeError(`tensor ${name || "params"}: expected a Float32Array/Float64Array or {data, shape}`);
}

function dtypeOf(array) {
  if (array instanceof Float64Array) return "float64";
  if (array instanceof Float32Array) return "float32";
  throw new TypeError("tensors must be Float32Array or Float64Array");
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class OptimClient {
  /** @param {string} baseUrl  @param {{apiKey?: string, timeoutMs?: number, maxRetries?: number, fetch?: typeof fetch}} [options] */
  constructor(baseUrl = "http://127.0.0.1:8000", { apiKey, timeoutMs = 60000, maxRetries = 3, fetch: fetchImpl } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.timeoutMs = timeoutMs;
    this.maxRetries = maxRetries;
    this._fetch = fetchImpl ?? globalThis.fetch.bind(globalThis);
    this._headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  }

  /** One logical request; retried with capped, jittered backoff when `retrySafe`. */
  async _request(method, path, { json, body, headers = {}, retrySafe = true } = {}) {
    const init = { method, headers: { ...this._headers, ...headers } };
    if (json !== undefined) {
      init.body = JSON.stringify(json);
      init.headers["Content-Type"] = JSON_TYPE;
    } else if (body !== undefined) {
      init.body = body;
    }
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await this._fetch(this.baseUrl + path, { ...init, signal: AbortSignal.timeout(this.timeoutMs) });
      } catch (error) {
        if (!retrySafe || attempt >= this.maxRetries) {
          throw new APIConnectionError(`cannot reach ${this.baseUrl}: ${error.message}`);
        }
        await sleep(Math.min(8000, 250 * 2 ** attempt) * (0.5 + Math.random() / 2));
        continue;
      }
      if (response.ok) return response;
      if (retrySafe && attempt < this.maxRetries && RETRY_STATUSES.has(response.status)) {
        const after = Number(response.headers.get("retry-after"));
        await sleep(after > 0 ? Math.min(after, 8) * 1000 : Math.min(8000, 250 * 2 ** attempt) * (0.5 + Math.random() / 2));
        continue;
      }
      let problem = {};
      try { problem = await response.json(); } catch { /* not JSON */ }
      throw errorFor(response.status, problem.detail ?? response.statusText, problem);
    }
  }

  /**
   * Create a session. `params`: a typed array (or {data, shape}), or an object of them by name.
   * `optimizer`: {type: "adam", lr: 0.001, ...torch's keyword names}.
   */
  async createSession({ params, optimizer = { type: "adam" }, dtype, schedule, clipGradNorm, paramGroups, nanPolicy,
                        aggregation }) {
    const named = !ArrayBuffer.isView(params) && !ArrayBuffer.isView(params?.data);
    const entries = named ? Object.entries(params) : [["", params]];
    const tensors = entries.map(([name, value]) => [name, asTensor(value, name)]);
    dtype ??= dtypeOf(tensors[0][1].data);
    // our own copy of the params: the answer leaves them out (Prefer: return=minimal)
    const arrays = tensors.map(([name, t]) => [name, DTYPES[dtype].from(t.data)]);
    const encoded = arrays.map(([name, data], i) => [name, { shape: tensors[i][1].shape, b64: toBase64(data) }]);
    const json = { optimizer, dtype, params: named ? Object.fromEntries(encoded) : encoded[0][1] };
    if (schedule) json.schedule = schedule;
    if (clipGradNorm) json.clip_grad_norm = clipGradNorm;
    if (paramGroups) json.param_groups = paramGroups;
    if (nanPolicy) json.nan_policy = nanPolicy;
    if (aggregation) json.aggregation = aggregation;
    const headers = { Prefer: "return=minimal" };
    const meta = await (await this._request("POST", "/v1/sessions", { json, headers, retrySafe: false })).json();
    const session = new Session(this, meta);
    session.params = named ? Object.fromEntries(arrays) : arrays[0][1];
    return session;
  }

  async restore(checkpoint) {
    const meta = await (await this._request("POST", "/v1/sessions", { json: checkpoint, retrySafe: false })).json();
    return new Session(this, meta);
  }

  async getSession(id) {
    const meta = await (await this._request("GET", `/v1/sessions/${encodeURIComponent(id)}`)).json();
    const session = new Session(this, meta);
    await session.refresh();
    return session;
  }

  async listSessions({ limit = 100, after } = {}) {
    const query = `?limit=${limit}` + (after ? `&after=${encodeURIComponent(after)}` : "");
    return (await this._request("GET", `/v1/sessions${query}`)).json();
  }

  async optimizers() {
    return (await this._request("GET", "/v1/optimizers")).json();
  }
}

export class Session {
  constructor(client, meta) {
    this._client = client;
    this.id = meta.id;
    this.metadata = meta;
    this.dtype = meta.dtype;
    this.stepCount = meta.step;
    this.named = !Array.isArray(meta.shapes);
    this.names = this.named ? Object.keys(meta.shapes) : [""];
    this.shapes = this.named ? Object.values(meta.shapes) : [meta.shapes];
    this.params = meta.params === undefined ? undefined : this._fromJson(meta.params);
    this.aggregation = meta.aggregation?.mode ?? "each";
    this.lastRound = null;
  }

  _fromJson(params) {
    const one = (v) => (v && typeof v === "object" && "b64" in v ? fromBase64(v.b64, this.dtype) : DTYPES[this.dtype].from(v.flat(Infinity)));
    return this.named ? Object.fromEntries(this.names.map((n) => [n, one(params[n])])) : one(params);
  }

  _fromBinary(buffer) {
    const flat = new DTYPES[this.dtype](buffer);
    let offset = 0;
    const arrays = this.shapes.map((shape) => {
      const size = shape.reduce((a, b) => a * b, 1);
      const part = flat.subarray(offset, offset + size);
      offset += size;
      return part;
    });
    return this.named ? Object.fromEntries(this.names.map((n, i) => [n, arrays[i]])) : arrays[0];
  }

  /** Apply one step: gradients mirror the params (typed arrays, flat, C order); returns the new params. */
  /** One optimizer step; on an asynchronous session it states the step of the params last received. */
  async step(gradients, { baseStep } = {}) {
    const headers = {};
    if (this.aggregation === "async") headers["Optim-Base-Step"] = String(baseStep ?? this.stepCount);
    const response = await this._push(gradients, headers);
    return this._take(response);
  }

  /**
   * Add gradients to the open round of a session in synchronous rounds. Resolves to the new params if
   * the round committed (this completed it, or it did within `wait` seconds), else null, with the
   * round's standing in `lastRound`.
   */
  async contribute(gradients, { worker, weight, round, wait } = {}) {
    if (!worker) throw new TypeError("a contribution names its worker");
    const headers = { "Optim-Worker": worker };
    if (weight !== undefined) headers["Optim-Weight"] = String(weight);
    if (round !== undefined) headers["Optim-Round"] = String(round);
    if (wait !== undefined) headers.Prefer = `wait=${wait}`;
    const response = await this._push(gradients, headers);
    if (response.status === 202) {
      this.lastRound = await response.json();
      return null;
    }
    this.lastRound = null;
    return this._take(response);
  }

  /** The open round: {round, received, needed, workers, opened_at, deadline}. */
  async round() {
    return (await this._client._request("GET", `/v1/sessions/${this.id}/round`)).json();
  }

  async _take(response) {
    this.stepCount = Number(response.headers.get("etag").replace(/[W/"]/g, ""));
    this.params = this._fromBinary(await response.arrayBuffer());
    return this.params;
  }

  async _push(gradients, extraHeaders) {
    const Typed = DTYPES[this.dtype];
    const parts = this.names.map((name, i) => {
      const g = this.named ? gradients[name] : gradients;
      const data = ArrayBuffer.isView(g) ? g : g?.data;
      const size = this.shapes[i].reduce((a, b) => a * b, 1);
      if (!ArrayBuffer.isView(data) || data.length !== size) {
        throw new TypeError(`gradient ${name || ""}: expected ${size} values for shape [${this.shapes[i]}]`);
      }
      return bytesOf(data instanceof Typed ? data : Typed.from(data));
    });
    const body = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
    let offset = 0;
    for (const p of parts) { body.set(p, offset); offset += p.length; }
    return this._client._request("POST", `/v1/sessions/${this.id}/step`, {
      body,
      headers: { "Content-Type": BINARY, Accept: BINARY, "Idempotency-Key": randomKey(), ...extraHeaders },
    });
  }

  async refresh() {
    const response = await this._client._request("GET", `/v1/sessions/${this.id}/params`, { headers: { Accept: BINARY } });
    this.stepCount = Number(response.headers.get("etag").replace(/[W/"]/g, ""));
    this.params = this._fromBinary(await response.arrayBuffer());
    return this.params;
  }

  /** A checkpoint document; `client.restore(doc)` resumes it bit-exactly. */
  async state() {
    return (await this._client._request("GET", `/v1/sessions/${this.id}/state`)).json();
  }

  async delete() {
    await this._client._request("DELETE", `/v1/sessions/${this.id}`);
  }
}

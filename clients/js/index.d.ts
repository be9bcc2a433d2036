// Types for optim-client (index.js).

export type DType = "float32" | "float64";
export type TypedTensor = Float32Array | Float64Array;
/** A flat typed array (C order) with its shape; a bare typed array is 1-D. */
export interface ShapedTensor { data: TypedTensor; shape: number[] }
export type Tensor = TypedTensor | ShapedTensor;
export type Tensors = Tensor | Record<string, Tensor>;

export interface OptimizerConfig {
  type: "sgd" | "adagrad" | "rmsprop" | "adam" | "adamw" | "adamax" | "nadam" | "radam" | "adadelta" | "rprop"
    | "asgd" | "adafactor" | "muon" | "lion" | "yogi";
  lr?: number;
  [hyperparameter: string]: unknown;
}

export interface SessionMetadata {
  id: string;
  step: number;
  optimizer: OptimizerConfig;
  dtype: DType;
  shapes: number[] | Record<string, number[]>;
  num_parameters: number;
  created_at: string;
  updated_at: string;
  [field: string]: unknown;
}

export interface ClientOptions {
  apiKey?: string;
  timeoutMs?: number;
  maxRetries?: number;
  fetch?: typeof fetch;
}

export interface CreateSessionOptions {
  params: Tensors;
  optimizer?: OptimizerConfig;
  dtype?: DType;
  schedule?: { type: string; [argument: string]: unknown };
  clipGradNorm?: { max_norm: number; norm_type?: number | "inf" | "-inf" };
  paramGroups?: Array<{ params: string[]; [hyperparameter: string]: unknown }>;
  nanPolicy?: "error" | "skip";
  /** How several workers' gradients combine: {mode: "sync", contributions: 4} or {mode: "async", max_staleness: 2}. */
  aggregation?: { mode: "each" } | { mode: "sync"; contributions: number; weighting?: "mean" | "weighted";
    min_contributions?: number; round_timeout_seconds?: number } | { mode: "async"; max_staleness: number;
    staleness_scale?: { type: "constant" | "inverse" | "polynomial" | "hinge"; a?: number; b?: number } };
}

export class OptimClient {
  constructor(baseUrl?: string, options?: ClientOptions);
  readonly baseUrl: string;
  createSession(options: CreateSessionOptions): Promise<Session>;
  restore(checkpoint: object): Promise<Session>;
  getSession(id: string): Promise<Session>;
  listSessions(options?: { limit?: number; after?: string }): Promise<{ sessions: SessionMetadata[]; next: string | null }>;
  optimizers(): Promise<Array<{ type: string; summary: string; hyperparameters: Record<string, object>; state_buffers: string[] }>>;
}

export class Session {
  readonly id: string;
  readonly dtype: DType;
  readonly metadata: SessionMetadata;
  stepCount: number;
  /** "each", "sync" or "async". */
  aggregation: string;
  /** Where the round stood after a contribution that did not complete it. */
  lastRound: RoundStatus | null;
  /** The parameters after the last step: one typed array, or an object of them by name. */
  params: TypedTensor | Record<string, TypedTensor> | undefined;
  step(gradients: Tensors, options?: { baseStep?: number }): Promise<TypedTensor | Record<string, TypedTensor>>;
  contribute(gradients: Tensors, options: { worker: string; weight?: number; round?: number; wait?: number }):
    Promise<TypedTensor | Record<string, TypedTensor> | null>;
  round(): Promise<RoundStatus>;
  refresh(): Promise<TypedTensor | Record<string, TypedTensor>>;
  state(): Promise<object>;
  delete(): Promise<void>;
}

export class OptimError extends Error {}
export class APIStatusError extends OptimError {
  readonly status: number;
  readonly detail: string;
  readonly problem: Record<string, unknown>;
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

export interface RoundStatus {
  round: number;
  received: number;
  needed: number;
  workers: string[];
  opened_at: number | null;
  deadline: number | null;
}

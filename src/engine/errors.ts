/**
 * Named error classes. Every error the engine raises on bad input or a missing
 * runtime is one of these, with a message that says what to do next. `code`
 * survives structured cloning, so a worker boundary can rebuild the class.
 */

export class MaceError extends Error {
  readonly code: string = "mace_error";
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

/** No WebGPU adapter could be obtained for the requested backend. */
export class WebGPUNotAvailableError extends MaceError {
  override readonly code = "webgpu_not_available";
}

/** A model file (config, weights, tokenizer) is malformed or unsupported. */
export class ModelFormatError extends MaceError {
  override readonly code = "model_format";
  constructor(readonly file: string, readonly detail: string, readonly tensor?: string) {
    super(`${file}${tensor ? ` [tensor ${tensor}]` : ""}: ${detail}`);
  }
}

/** A request or CLI argument is invalid (bad flag, out-of-range value, prompt too long). */
export class InvalidRequestError extends MaceError {
  override readonly code = "invalid_request";
}

/** The GPU reported a validation or out-of-memory error. */
export class GpuError extends MaceError {
  override readonly code = "gpu_error";
}

/** A tensor or buffer would exceed what the device can allocate. */
export class GpuMemoryError extends MaceError {
  override readonly code = "gpu_memory";
}

/**
 * A preference dataset file is missing or unreadable as a whole (bad records are skipped, not
 * thrown).
 */
export class DatasetFormatError extends MaceError {
  override readonly code = "dataset_format";
  constructor(readonly file: string, readonly detail: string) {
    super(`${file}: ${detail}`);
  }
}

/**
 * A LoRA adapter folder (PEFT adapter_config.json + adapter_model.safetensors) is malformed or
 * unsupported.
 */
export class AdapterFormatError extends MaceError {
  override readonly code = "adapter_format";
  constructor(readonly file: string, readonly detail: string, readonly tensor?: string) {
    super(`${file}${tensor ? ` [tensor ${tensor}]` : ""}: ${detail}`);
  }
}

/**
 * A LoRA adapter does not fit the engine's adapter pool (rank above the pool's, a target the
 * pool does not hold, tensors of the wrong shape) or the engine was built without a pool.
 */
export class LoraAdapterError extends MaceError {
  override readonly code = "lora_adapter";
}

/** Every slot of the adapter pool holds an adapter in use: unload one or build a larger pool. */
export class AdapterPoolFullError extends MaceError {
  override readonly code = "adapter_pool_full";
}

/** A request or call named an adapter the engine does not hold. */
export class UnknownAdapterError extends MaceError {
  override readonly code = "unknown_adapter";
  constructor(readonly adapter: string, readonly known: readonly string[]) {
    super(
      `unknown adapter "${adapter}"; known: ${
        known.length > 0 ? known.join(", ") : "none (publish or load one first)"
      }`,
    );
  }
}

/**
 * A request-arrival trace (Azure LLM inference CSV, ShareGPT lengths CSV) is missing or has a
 * malformed row. Traces are published data read whole, so a bad row means a wrong or damaged file:
 * it is reported with its line (1-based; absent for whole-file problems), never skipped.
 */
export class TraceFormatError extends MaceError {
  override readonly code = "trace_format";
  constructor(readonly file: string, readonly detail: string, readonly line?: number) {
    super(`${file}${line !== undefined ? `:${line}` : ""}: ${detail}`);
  }
}

/** A cost profile (`mace profile` output) is missing, unreadable or malformed. */
export class ProfileFormatError extends MaceError {
  override readonly code = "profile_format";
  constructor(readonly file: string, readonly detail: string) {
    super(`${file}: ${detail}`);
  }
}

/** close() was called on the engine: it takes no more work; create a new one. */
export class EngineClosedError extends MaceError {
  override readonly code = "engine_closed";
}

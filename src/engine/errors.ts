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

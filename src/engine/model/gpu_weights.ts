/**
 * Uploads a model's weights to the GPU as the forward pass wants them:
 *  - q/k/v projections fused into one [(H + 2*Hkv)*hd, D] matrix (their biases into one vector),
 *  - gate/up fused into one [2I, D] matrix,
 *  - matrices split by rows into chunks that each fit one storage binding,
 *  - f32, or f16 packed two per u32 along the input dimension.
 * Tensors stream in one at a time and are written straight into their place in
 * the fused buffers, so the CPU never holds more than one tensor.
 */
import type { GpuContext } from "../gpu/context.ts";
import { createStorage, writeBuffer } from "../gpu/buffers.ts";
import { packF16Rows } from "../kernels/f16_pack.ts";
import type { ModelConfig } from "./config.ts";
import type { ModelSource } from "./source.ts";
import { ModelFormatError } from "../errors.ts";

export type WeightDtype = "f32" | "f16";

/** Rows [rowStart, rowStart + rows) of a matrix, in one GPU buffer. */
export interface MatrixChunk {
  buffer: GPUBuffer;
  rowStart: number;
  rows: number;
}

/** A [rows, cols] matrix, row-major, split by rows into binding-sized chunks. */
export interface GpuMatrix {
  rows: number;
  cols: number;
  dtype: WeightDtype;
  chunks: MatrixChunk[];
}

export interface LayerWeights {
  inputNorm: GPUBuffer; // [D]
  qkv: GpuMatrix; // [(H + 2*Hkv)*hd, D]
  qkvBias: GPUBuffer | null; // [(H + 2*Hkv)*hd]
  o: GpuMatrix; // [D, H*hd]
  postNorm: GPUBuffer; // [D]
  gateUp: GpuMatrix; // [2I, D]
  down: GpuMatrix; // [D, I]
}

export interface GpuWeights {
  embedding: GpuMatrix; // [V, D]
  layers: LayerWeights[];
  finalNorm: GPUBuffer; // [D]
  lmHead: GpuMatrix; // [V, D]; the embedding itself when tied
  bytes: number;
}

/** Bytes of one stored row of a [*, cols] matrix. */
export function rowBytes(cols: number, dtype: WeightDtype): number {
  return dtype === "f32" ? cols * 4 : Math.ceil(cols / 2) * 4;
}

/**
 * Chunk rows so each chunk fits one binding; a multiple of 64 rows keeps any
 * bias slice at a 256-byte aligned offset.
 */
function allocMatrix(
  ctx: GpuContext,
  rows: number,
  cols: number,
  dtype: WeightDtype,
  label: string,
): GpuMatrix {
  const perRow = rowBytes(cols, dtype);
  const limit = Math.min(ctx.limits.maxStorageBufferBindingSize, ctx.limits.maxBufferSize);
  let chunkRows = Math.floor(limit / perRow);
  if (chunkRows < rows) chunkRows = Math.max(64, Math.floor(chunkRows / 64) * 64);
  const chunks: MatrixChunk[] = [];
  for (let rowStart = 0; rowStart < rows; rowStart += chunkRows) {
    const n = Math.min(chunkRows, rows - rowStart);
    chunks.push({
      buffer: createStorage(ctx, n * perRow, `${label}[${rowStart}]`),
      rowStart,
      rows: n,
    });
  }
  return { rows, cols, dtype, chunks };
}

/** Writes rows [rowOffset, rowOffset + data.length/cols) of `m` from f32 data. */
function writeRows(ctx: GpuContext, m: GpuMatrix, rowOffset: number, data: Float32Array): void {
  const n = data.length / m.cols;
  for (const chunk of m.chunks) {
    const from = Math.max(rowOffset, chunk.rowStart);
    const to = Math.min(rowOffset + n, chunk.rowStart + chunk.rows);
    if (from >= to) continue;
    const part = data.subarray((from - rowOffset) * m.cols, (to - rowOffset) * m.cols);
    const bytes = m.dtype === "f32" ? part : packF16Rows(part, to - from, m.cols);
    writeBuffer(ctx, chunk.buffer, (from - chunk.rowStart) * rowBytes(m.cols, m.dtype), bytes);
  }
}

function matrixBytes(m: GpuMatrix): number {
  return m.chunks.reduce((sum, c) => sum + c.buffer.size, 0);
}

/** Where each named tensor goes: a matrix at a row offset, or a vector at an element offset. */
type Destination =
  | { kind: "matrix"; matrix: GpuMatrix; rowOffset: number; shape: [number, number] }
  | { kind: "vector"; buffer: GPUBuffer; offset: number; length: number };

export async function uploadWeights(
  ctx: GpuContext,
  source: ModelSource,
  dtype: WeightDtype,
): Promise<GpuWeights> {
  const c: ModelConfig = source.config;
  const D = c.hiddenSize, hd = c.headDim, H = c.numHeads, Hkv = c.numKvHeads;
  const qRows = H * hd, kvRows = Hkv * hd, I = c.intermediateSize, V = c.vocabSize;
  const vec = (n: number, label: string) => createStorage(ctx, n * 4, label);

  const embedding = allocMatrix(ctx, V, D, dtype, "embed_tokens");
  const lmHead = c.tieWordEmbeddings ? embedding : allocMatrix(ctx, V, D, dtype, "lm_head");
  const finalNorm = vec(D, "norm");
  const destinations = new Map<string, Destination>();
  const matrixAt = (
    name: string,
    matrix: GpuMatrix,
    rowOffset: number,
    rows: number,
    cols: number,
  ) => destinations.set(name, { kind: "matrix", matrix, rowOffset, shape: [rows, cols] });
  const vectorAt = (name: string, buffer: GPUBuffer, offset: number, length: number) =>
    destinations.set(name, { kind: "vector", buffer, offset, length });

  matrixAt("model.embed_tokens.weight", embedding, 0, V, D);
  if (!c.tieWordEmbeddings) matrixAt("lm_head.weight", lmHead, 0, V, D);
  vectorAt("model.norm.weight", finalNorm, 0, D);

  const layers: LayerWeights[] = [];
  for (let i = 0; i < c.numLayers; i++) {
    const p = `model.layers.${i}.`;
    const layer: LayerWeights = {
      inputNorm: vec(D, `${p}input_layernorm`),
      qkv: allocMatrix(ctx, qRows + 2 * kvRows, D, dtype, `${p}qkv`),
      qkvBias: c.attentionBias ? vec(qRows + 2 * kvRows, `${p}qkv_bias`) : null,
      o: allocMatrix(ctx, D, qRows, dtype, `${p}o_proj`),
      postNorm: vec(D, `${p}post_attention_layernorm`),
      gateUp: allocMatrix(ctx, 2 * I, D, dtype, `${p}gate_up`),
      down: allocMatrix(ctx, D, I, dtype, `${p}down_proj`),
    };
    layers.push(layer);
    vectorAt(`${p}input_layernorm.weight`, layer.inputNorm, 0, D);
    vectorAt(`${p}post_attention_layernorm.weight`, layer.postNorm, 0, D);
    matrixAt(`${p}self_attn.q_proj.weight`, layer.qkv, 0, qRows, D);
    matrixAt(`${p}self_attn.k_proj.weight`, layer.qkv, qRows, kvRows, D);
    matrixAt(`${p}self_attn.v_proj.weight`, layer.qkv, qRows + kvRows, kvRows, D);
    matrixAt(`${p}self_attn.o_proj.weight`, layer.o, 0, D, qRows);
    matrixAt(`${p}mlp.gate_proj.weight`, layer.gateUp, 0, I, D);
    matrixAt(`${p}mlp.up_proj.weight`, layer.gateUp, I, I, D);
    matrixAt(`${p}mlp.down_proj.weight`, layer.down, 0, D, I);
    if (layer.qkvBias) {
      vectorAt(`${p}self_attn.q_proj.bias`, layer.qkvBias, 0, qRows);
      vectorAt(`${p}self_attn.k_proj.bias`, layer.qkvBias, qRows, kvRows);
      vectorAt(`${p}self_attn.v_proj.bias`, layer.qkvBias, qRows + kvRows, kvRows);
    }
  }

  const seen = new Set<string>();
  for await (const tensor of source.tensors()) {
    const dest = destinations.get(tensor.name);
    if (!dest) continue; // e.g. rotary_emb.inv_freq: recomputed from the config
    const expected = dest.kind === "matrix" ? dest.shape[0] * dest.shape[1] : dest.length;
    if (tensor.data.length !== expected) {
      throw new ModelFormatError(
        source.description,
        `has ${tensor.data.length} elements, expected ${expected}`,
        tensor.name,
      );
    }
    if (dest.kind === "matrix") writeRows(ctx, dest.matrix, dest.rowOffset, tensor.data);
    else writeBuffer(ctx, dest.buffer, dest.offset * 4, tensor.data);
    seen.add(tensor.name);
  }
  const missing = [...destinations.keys()].filter((name) => !seen.has(name));
  if (missing.length > 0) {
    throw new ModelFormatError(source.description, "tensor missing from the weights", missing[0]);
  }

  let bytes = matrixBytes(embedding) + (lmHead === embedding ? 0 : matrixBytes(lmHead)) + D * 4;
  for (const l of layers) {
    bytes += matrixBytes(l.qkv) + matrixBytes(l.o) + matrixBytes(l.gateUp) + matrixBytes(l.down) +
      2 * D * 4 + (l.qkvBias?.size ?? 0);
  }
  return { embedding, layers, finalNorm, lmHead, bytes };
}

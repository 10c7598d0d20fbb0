/**
 * Spreads a 1-D count of workgroups over a 2-D grid, because one dimension may
 * hold at most maxComputeWorkgroupsPerDimension (65535 by default) workgroups.
 * Shaders flatten it back as `wg.y * num_workgroups.x + wg.x` and skip indices
 * >= count; the grid wastes fewer than `y` workgroups.
 */
export function workgroupGrid(count: number, maxPerDimension: number): [number, number] {
  if (count <= maxPerDimension) return [count, 1];
  const y = Math.ceil(count / maxPerDimension);
  return [Math.ceil(count / y), y];
}

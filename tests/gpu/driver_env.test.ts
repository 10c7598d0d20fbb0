/**
 * Finding a software Vulkan driver without help (no GPU needed): the first SwiftShader manifest
 * that exists wins, driver variables are set only for the call that needs them, Mesa gets a
 * usable XDG_RUNTIME_DIR, and a run on a software adapter is announced in one line.
 */
import assert from "node:assert/strict";
import {
  ensureRuntimeDir,
  findSwiftShaderIcd,
  SWIFTSHADER_ICD_PATHS,
  withEnv,
} from "../../src/engine/gpu/driver_env.ts";
import { softwareNotice } from "../../src/engine/gpu/context.ts";

Deno.test("the first SwiftShader manifest that exists is found, none gives null", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const [chromium, chrome] = [`${dir}/chromium/icd.json`, `${dir}/chrome/icd.json`];
    assert.equal(findSwiftShaderIcd([chromium, chrome]), null);
    await Deno.mkdir(`${dir}/chrome`);
    await Deno.writeTextFile(chrome, "{}");
    assert.equal(findSwiftShaderIcd([chromium, chrome]), chrome);
    await Deno.mkdir(`${dir}/chromium`);
    await Deno.writeTextFile(chromium, "{}");
    assert.equal(findSwiftShaderIcd([chromium, chrome]), chromium, "in order of preference");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  assert.ok(SWIFTSHADER_ICD_PATHS.includes("/usr/lib/chromium/vk_swiftshader_icd.json"));
});

Deno.test("withEnv sets variables for one call and restores them, also after a throw", async () => {
  const set = "MACE_TEST_SET", unset = "MACE_TEST_UNSET";
  Deno.env.set(set, "before");
  Deno.env.delete(unset);
  const seen = await withEnv(
    { [set]: undefined, [unset]: "during" },
    () => Promise.resolve([Deno.env.get(set), Deno.env.get(unset)]),
  );
  assert.deepEqual(seen, [undefined, "during"]);
  assert.deepEqual([Deno.env.get(set), Deno.env.get(unset)], ["before", undefined]);
  await assert.rejects(withEnv({ [set]: "x" }, () => Promise.reject(new Error("boom"))));
  assert.equal(Deno.env.get(set), "before");
  Deno.env.delete(set);
});

Deno.test("XDG_RUNTIME_DIR: kept if usable, else a private folder in the temp folder", async () => {
  const saved = Deno.env.get("XDG_RUNTIME_DIR");
  const tmp = await Deno.makeTempDir();
  try {
    Deno.env.set("XDG_RUNTIME_DIR", tmp);
    assert.equal(ensureRuntimeDir(tmp), null, "a writable folder is left alone");
    Deno.env.delete("XDG_RUNTIME_DIR");
    const made = ensureRuntimeDir(tmp);
    assert.ok(made?.startsWith(`${tmp}/mace-runtime-`), `made ${made}`);
    assert.equal(Deno.env.get("XDG_RUNTIME_DIR"), made);
    assert.equal((await Deno.stat(made!)).mode! & 0o777, 0o700);
  } finally {
    if (saved === undefined) Deno.env.delete("XDG_RUNTIME_DIR");
    else Deno.env.set("XDG_RUNTIME_DIR", saved);
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("a software adapter is announced in one line: which driver, through what, why", () => {
  assert.equal(
    softwareNotice("llvmpipe (LLVM 15.0.6, 256 bits) / 65541 / 0", "wgpu"),
    "mace: no hardware GPU found; using lavapipe (software Vulkan) through Deno's WebGPU (slow)",
  );
  assert.equal(
    softwareNotice("SwiftShader driver 5.0.0 / google", "dawn", "/usr/lib/chromium/x.json"),
    "mace: no hardware GPU found; using SwiftShader (software Vulkan, /usr/lib/chromium/x.json) " +
      "through Dawn (slow)",
  );
  assert.ok(!softwareNotice("SwiftShader", "dawn").includes("\n"));
});

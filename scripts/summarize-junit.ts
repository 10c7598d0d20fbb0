// Sums JUnit XML reports from deno test and prints "N passed, N failed"
// (exit 1 if any failed or a report is missing).
let tests = 0, failed = 0, skipped = 0, missing = 0;
for (const path of Deno.args) {
  let xml: string;
  try {
    xml = await Deno.readTextFile(path);
  } catch {
    console.error(`summarize: no report at ${path} (the test run crashed before writing it)`);
    missing++;
    continue;
  }
  for (const m of xml.matchAll(/<testcase\b[^>]*?(\/>|>([\s\S]*?)<\/testcase>)/g)) {
    tests++;
    const body = m[2] ?? "";
    if (/<failure|<error/.test(body)) failed++;
    else if (/<skipped/.test(body)) skipped++;
  }
}
const passed = tests - failed - skipped;
console.log(
  `${passed} passed, ${failed + missing} failed` + (skipped ? `, ${skipped} skipped` : ""),
);
Deno.exit(failed + missing > 0 ? 1 : 0);

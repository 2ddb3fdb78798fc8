// The device: its identity, its description for the node report, and the benchmark.
//
// The benchmark does the same work as the native worker's (worker/device.py), so scores
// compare: the default Mandelbrot view cut into small tiles, run on one Web Worker.

import { WorkerOp } from "./protocol.js";

const DEVICE_ID_KEY = "pd.device_id";
const NODE_SECRET_KEY = "pd.node_secret";

// Benchmark: the default Mandelbrot view, cut into small tiles; the first WARMUP_MS let the
// engine tier the module up (and are not scored), the next MEASURE_MS are scored.
const BENCH = Object.freeze({
  view: [-2.0, 1.0, -1.5, 1.5], size: 512, tile: 64, maxIter: 256, warmupMs: 150, measureMs: 350,
});

// A tiny module using SIMD128 (i8x16.splat, i8x16.popcnt): valid only where SIMD is supported.
const SIMD_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15, 253,
  98, 11,
]);

export function deviceId(storage = globalThis.localStorage) {
  try {
    const stored = storage && storage.getItem(DEVICE_ID_KEY);
    if (stored && /^[A-Za-z0-9_-]{8,64}$/.test(stored)) return stored;
  } catch {
    // Storage can be disabled (private mode, policy): fall through to a fresh id.
  }
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  const id = Array.from(bytes, (b) => alphabet[b & 63]).join("");
  try {
    if (storage) storage.setItem(DEVICE_ID_KEY, id);
  } catch {
    // Not persisted: the node gets a new identity on the next visit, which is harmless.
  }
  return id;
}

/** The secret the controller issued with the stored device id, or null (first join). */
export function nodeSecret(storage = globalThis.localStorage) {
  try {
    const stored = storage && storage.getItem(NODE_SECRET_KEY);
    if (stored && /^[A-Za-z0-9_-]{32,128}$/.test(stored)) return stored;
  } catch {
    // Storage disabled: the controller issues a new identity at each join.
  }
  return null;
}

/**
 * Keep the identity the controller issued (NodeAccepted.node_id and .node_secret): it goes in
 * every later report. Returns false if it could not be stored (it still holds for this page).
 */
export function keepIdentity(nodeId, secret, storage = globalThis.localStorage) {
  try {
    if (!storage) return false;
    storage.setItem(DEVICE_ID_KEY, nodeId);
    storage.setItem(NODE_SECRET_KEY, secret);
    return true;
  } catch {
    return false;
  }
}

export function parseUserAgent(ua) {
  const pick = (re) => {
    const m = re.exec(ua);
    return m ? m[1] : null;
  };
  let browser = null;
  for (const [name, re] of [
    ["Edge", /Edg(?:e|A|iOS)?\/([\d.]+)/],
    ["Opera", /OPR\/([\d.]+)/],
    ["Samsung Internet", /SamsungBrowser\/([\d.]+)/],
    ["Firefox", /(?:Firefox|FxiOS)\/([\d.]+)/],
    ["Chrome", /(?:Chrome|CriOS)\/([\d.]+)/],
    ["Safari", /Version\/([\d.]+).*Safari\//],
  ]) {
    const version = pick(re);
    if (version) {
      browser = `${name} ${version.split(".")[0]}`;
      break;
    }
  }
  let os = null;
  const android = pick(/Android ([\d.]+)/);
  const ios = pick(/(?:iPhone|CPU) OS ([\d_]+)/);
  const mac = pick(/Mac OS X ([\d_.]+)/);
  if (android) os = `Android ${android}`;
  else if (ios) os = `iOS ${ios.replace(/_/g, ".")}`;
  else if (/Windows NT/.test(ua)) os = "Windows";
  else if (/CrOS/.test(ua)) os = "ChromeOS";
  else if (mac) os = `macOS ${mac.replace(/_/g, ".")}`;
  else if (/Linux/.test(ua)) os = "Linux";
  return { browser, os };
}

// Characters a node report may not carry (shared/protocol.py refuses them in `gpu`): C0 and
// C1 controls, line separators and the bidirectional controls that reorder a terminal line.
// eslint-disable-next-line no-control-regex
const CONTROL = /[\u0000-\u001f\u007f-\u009f\u200e\u200f\u2028-\u202e\u2066-\u2069]/g;
const MAX_GPU = 200;

/**
 * The GPU renderer WebGL names: UNMASKED_RENDERER_WEBGL where the browser exposes
 * WEBGL_debug_renderer_info, else the plain RENDERER (often just "WebKit WebGL"); null
 * without WebGL. One line, at most 200 characters. `doc` creates the probe canvas (an
 * OffscreenCanvas serves where there is no document).
 */
export function gpuRenderer(doc = globalThis.document) {
  let gl = null;
  try {
    const canvas =
      doc && typeof doc.createElement === "function"
        ? doc.createElement("canvas")
        : typeof OffscreenCanvas === "function"
          ? new OffscreenCanvas(1, 1)
          : null;
    if (!canvas) return null;
    gl = canvas.getContext("webgl") || canvas.getContext("experimental-webgl");
    if (!gl) return null;
    const info = gl.getExtension("WEBGL_debug_renderer_info");
    const renderer = info ? gl.getParameter(info.UNMASKED_RENDERER_WEBGL) : gl.getParameter(gl.RENDERER);
    return cleanGpu(renderer);
  } catch {
    return null; // WebGL blocked or broken: the report goes without it
  } finally {
    const lose = gl && gl.getExtension && gl.getExtension("WEBGL_lose_context");
    if (lose) lose.loseContext(); // browsers cap live contexts: give this one back at once
  }
}

/** `value` as the report's `gpu`: a string, controls removed, whitespace folded, cut; or null. */
export function cleanGpu(value) {
  if (typeof value !== "string") return null;
  const text = value.replace(CONTROL, " ").replace(/\s+/g, " ").trim().slice(0, MAX_GPU);
  return text || null;
}

export function describeDevice(nav = globalThis.navigator, doc = globalThis.document) {
  let { browser, os } = parseUserAgent(nav.userAgent || "");
  const uad = nav.userAgentData; // secure contexts only, Chromium only
  if (uad && Array.isArray(uad.brands)) {
    const brands = uad.brands.filter((b) => !/not.?a.?brand/i.test(b.brand));
    const brand = brands.find((b) => b.brand !== "Chromium") || brands[0];
    if (brand) browser = `${brand.brand} ${brand.version}`;
    if (uad.platform) os = uad.platform;
  }
  let simd = false;
  try {
    simd = WebAssembly.validate(SIMD_PROBE);
  } catch {
    simd = false;
  }
  return {
    cores: Math.max(1, nav.hardwareConcurrency || 1),
    memoryGb: typeof nav.deviceMemory === "number" ? nav.deviceMemory : null,
    browser,
    os,
    simd,
    gpu: gpuRenderer(doc),
  };
}

/** The 64-byte input of the mandelbrot module for one tile: the layout of
 * `shared/tasks/mandelbrot.py` INPUT (docs/wasm-abi.md), the one the controller splits into. */
export function mandelbrotInput({ view, width, height, x0, y0, tileW, tileH, maxIter }) {
  const buf = new ArrayBuffer(64);
  const dv = new DataView(buf);
  view.forEach((v, i) => dv.setFloat64(i * 8, v, true));
  [width, height, x0, y0, tileW, tileH, maxIter, 0].forEach((v, i) => dv.setUint32(32 + i * 4, v, true));
  return buf;
}

/**
 * Run the benchmark on `client` (a WorkerClient) with the module `entry` ({sha256, url}).
 * Returns {score (iterations/s per core, or null), tiles, ms}, or null if `stale()` became true.
 */
export async function benchmark(client, entry, stale) {
  const { view, size, tile, maxIter } = BENCH;
  const tilesPerRow = size / tile;
  let n = 0;
  let iterations = 0;
  let computeMs = 0;
  const started = performance.now();
  let measuring = false;
  let phaseStart = started;
  for (;;) {
    const x0 = (n % tilesPerRow) * tile;
    const y0 = (Math.floor(n / tilesPerRow) % tilesPerRow) * tile;
    n++;
    const input = mandelbrotInput({ view, width: size, height: size, x0, y0, tileW: tile, tileH: tile, maxIter });
    const reply = await client.call({ op: WorkerOp.RUN, sha256: entry.sha256, url: entry.url, input }, [input]);
    if (stale()) return null;
    const now = performance.now();
    if (measuring) {
      for (const count of new Uint32Array(reply.output)) iterations += count;
      computeMs += reply.elapsedMs;
      if (now - phaseStart >= BENCH.measureMs) break;
    } else if (now - phaseStart >= BENCH.warmupMs) {
      measuring = true;
      phaseStart = now;
    }
  }
  const score = computeMs > 0 ? Math.round(iterations / (computeMs / 1000)) : null;
  return { score, tiles: n, ms: Math.round(performance.now() - started) };
}

/**
 * GET /api/modules: the benchmark module's {sha256, url}, or null if the server has none. With
 * SIMD128 it is mandelbrot_simd, the build this node is sent for Mandelbrot jobs, so the score
 * is the speed the node will have.
 */
export async function benchmarkEntry(fetch, origin, simd = false) {
  const response = await fetch(new URL("/api/modules", origin), { credentials: "same-origin" });
  if (!response.ok) throw new Error(`GET /api/modules: HTTP ${response.status}`);
  const listed = await response.json();
  return (simd && listed.mandelbrot_simd) || listed.mandelbrot || null;
}

/** The module compiled in `client`, to preload into the pool's workers; null if it cannot be shared. */
export async function exportModule(client, sha256) {
  try {
    const { module } = await client.call({ op: WorkerOp.EXPORT, sha256 });
    return module || null;
  } catch {
    return null; // sharing the compiled module is an optimisation; every worker can fetch it itself
  }
}

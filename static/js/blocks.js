// Shared input blocks (a matrix block, a batch of rows), cached by sha256.
//
// A task's input is its inline bytes followed by its blocks, in order. A block is fetched once
// per hash from `/blocks/<job>/<sha256>?token=...` and kept up to `maxBytes`, least recently
// used out first. A failed fetch is not cached: the next part that needs it tries again.

export const BLOCK_CACHE_BYTES = 256 * 1024 * 1024;

export class BlockCache {
  /**
   * @param {{url: (job: string, sha: string) => URL, fetch?: Function, maxBytes?: number}} options
   *   `url` builds a block's address (with the current session token).
   */
  constructor({ url, fetch = globalThis.fetch.bind(globalThis), maxBytes = BLOCK_CACHE_BYTES }) {
    this.url = url;
    this.fetch = fetch;
    this.maxBytes = maxBytes;
    /** @type {Map<string, {bytes: Promise<Uint8Array>, size: number}>} sha256 -> entry, oldest first */
    this.entries = new Map();
  }

  /** The task input: `inline` followed by the bytes of each block. */
  async assemble(job, inline, blocks) {
    if (!blocks.length) return inline;
    const parts = [inline];
    for (const sha of blocks) parts.push(await this.get(job, sha));
    const input = new Uint8Array(parts.reduce((n, p) => n + p.byteLength, 0));
    let offset = 0;
    for (const p of parts) {
      input.set(p, offset);
      offset += p.byteLength;
    }
    return input;
  }

  /** One block's bytes, from the cache or fetched. */
  get(job, sha) {
    let entry = this.entries.get(sha);
    if (entry) {
      this.entries.delete(sha); // re-insert: most recently used last
      this.entries.set(sha, entry);
      return entry.bytes;
    }
    const bytes = this.fetch(this.url(job, sha)).then(async (resp) => {
      if (!resp.ok) throw new Error(`block ${sha.slice(0, 12)}: HTTP ${resp.status}`);
      const data = new Uint8Array(await resp.arrayBuffer());
      entry.size = data.byteLength;
      this.#trim();
      return data;
    });
    entry = { bytes, size: 0 };
    bytes.catch(() => {
      if (this.entries.get(sha) === entry) this.entries.delete(sha);
    });
    this.entries.set(sha, entry);
    return bytes;
  }

  #trim() {
    let total = 0;
    for (const e of this.entries.values()) total += e.size;
    for (const [sha, e] of this.entries) {
      if (total <= this.maxBytes || this.entries.size <= 1) break;
      total -= e.size;
      this.entries.delete(sha);
    }
  }
}

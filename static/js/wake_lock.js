// Keeps a phone's screen on while the agent works, so the page is not frozen. Only in secure
// contexts; the browser drops the lock when the page is hidden, and `acquire` takes a new one
// when it is visible again.

export class ScreenLock {
  constructor(nav = globalThis.navigator, doc = globalThis.document) {
    this.nav = nav;
    this.doc = doc;
    this.lock = null;
    this.wanted = false;
  }

  async acquire() {
    this.wanted = true;
    if (this.lock || !this.nav || !this.nav.wakeLock || !this.doc || this.doc.visibilityState !== "visible") return;
    try {
      const lock = await this.nav.wakeLock.request("screen");
      if (!this.wanted) {
        lock.release().catch(() => {});
        return;
      }
      this.lock = lock;
      lock.addEventListener("release", () => {
        if (this.lock === lock) this.lock = null;
      });
    } catch {
      this.lock = null;
    }
  }

  release() {
    this.wanted = false;
    if (this.lock) this.lock.release().catch(() => {});
    this.lock = null;
  }
}

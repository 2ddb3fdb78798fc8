// static/js/pool.js driven through fake endpoints: the same interface a Web Worker offers
// (postMessage, addEventListener, terminate), answering like wasm_worker.js.

import assert from "node:assert/strict";
import { describe, it } from "node:test";

import { DeadlineExceeded, Pool, WorkerClient, WorkerStopped } from "../../static/js/pool.js";

/** A fake worker: replies to each request with `answer(request)` (a reply object or a promise). */
class FakeEndpoint extends EventTarget {
  constructor(name, answer) {
    super();
    this.name = name;
    this.answer = answer;
    this.received = [];
    this.terminated = false;
  }

  postMessage(message, transfer = []) {
    assert.ok(Array.isArray(transfer));
    this.received.push(message);
    Promise.resolve(this.answer(message, this)).then((reply) => {
      if (!this.terminated && reply !== undefined) this.reply({ id: message.id, ...reply });
    });
  }

  reply(data) {
    this.dispatchEvent(new MessageEvent("message", { data }));
  }

  crash(message) {
    const event = new Event("error", { cancelable: true });
    event.message = message;
    this.dispatchEvent(event);
  }

  terminate() {
    this.terminated = true;
  }
}

/** Requests park until released by hand: `gate.open(input)` answers the run of that input. */
function gated() {
  const waiters = new Map();
  const answer = (message) => {
    if (message.op !== "run") return { ok: true };
    return new Promise((resolve) => waiters.set(message.input, resolve));
  };
  const open = (input, reply = { ok: true, output: `out:${input}`, elapsedMs: 1 }) => {
    const resolve = waiters.get(input);
    assert.ok(resolve, `no run of ${input} is in a worker`);
    waiters.delete(input);
    resolve(reply);
  };
  return { answer, open, waiters };
}

/** A clock moved by hand: `advance(ms)` fires the timers that are due, in order. */
function fakeTimers() {
  let now = 0;
  let next = 1;
  const pending = new Map(); // handle -> {at, fn}
  return {
    pending,
    now: () => now,
    setTimeout(fn, ms) {
      pending.set(next, { at: now + ms, fn });
      return next++;
    },
    clearTimeout(handle) {
      pending.delete(handle);
    },
    advance(ms) {
      now += ms;
      for (const [handle, t] of [...pending].sort((a, b) => a[1].at - b[1].at)) {
        if (t.at > now) break;
        pending.delete(handle);
        t.fn();
      }
    },
  };
}

function makePool(answer, timers = undefined) {
  const endpoints = [];
  const pool = new Pool({
    spawn: (name) => {
      const ep = new FakeEndpoint(name, answer);
      endpoints.push(ep);
      return ep;
    },
    ...(timers ? { timers } : {}),
  });
  return { pool, endpoints };
}

const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
const run = (pool, key) => pool.run(key, { op: "run", sha256: "s", url: "/m", input: key });

describe("WorkerClient", () => {
  it("matches replies to requests by id and forgets them once settled", async () => {
    const ep = new FakeEndpoint("w", (m) => ({ ok: true, echo: m.input }));
    const client = new WorkerClient(ep, "w");
    const replies = await Promise.all([client.call({ op: "run", input: 1 }), client.call({ op: "run", input: 2 })]);
    assert.deepEqual(
      replies.map((r) => r.echo),
      [1, 2],
    );
    assert.deepEqual(
      ep.received.map((m) => m.id),
      [1, 2],
    );
    assert.equal(client.pending.size, 0);
  });

  it("revives errors from {name, message, stack, status}", async () => {
    const error = { name: "TaskStatusError", message: "module returned status 7", stack: "at pd_run", status: 7 };
    const client = new WorkerClient(new FakeEndpoint("w", () => ({ ok: false, error })), "w");
    await assert.rejects(client.call({ op: "run" }), (err) => {
      assert.ok(err instanceof Error);
      assert.deepEqual([err.name, err.message, err.stack, err.status], [error.name, error.message, "at pd_run", 7]);
      return true;
    });
    assert.equal(client.pending.size, 0);
  });

  it("fails every pending call when terminated or crashed, and ignores stray replies", async () => {
    const ep = new FakeEndpoint("w", () => new Promise(() => {}));
    const client = new WorkerClient(ep, "w");
    const calls = [client.call({ op: "run" }), client.call({ op: "run" })];
    ep.reply({ id: 99, ok: true });
    client.terminate("bye");
    for (const c of calls) await assert.rejects(c, (e) => e instanceof WorkerStopped && e.message === "bye");
    assert.ok(ep.terminated && client.pending.size === 0);
    await assert.rejects(client.call({ op: "run" }), WorkerStopped);

    const ep2 = new FakeEndpoint("w2", () => new Promise(() => {}));
    const crashed = new WorkerClient(ep2, "w2");
    const pending = crashed.call({ op: "run" });
    ep2.crash("out of memory");
    await assert.rejects(pending, (e) => e instanceof WorkerStopped && /out of memory/.test(e.message));
  });
});

describe("Pool", () => {
  it("runs one request per worker; the rest wait their turn in order", async () => {
    const gate = gated();
    const { pool, endpoints } = makePool(gate.answer);
    pool.resize(2);
    const done = [];
    const runs = ["a", "b", "c", "d"].map((k) => run(pool, k).then((r) => done.push(r.output)));
    await tick();
    assert.deepEqual([...gate.waiters.keys()], ["a", "b"]);
    gate.open("b");
    await tick();
    assert.deepEqual([...gate.waiters.keys()], ["a", "c"]);
    gate.open("a");
    gate.open("c");
    await tick();
    gate.open("d");
    await Promise.all(runs);
    assert.deepEqual(done, ["out:b", "out:a", "out:c", "out:d"]);
    assert.equal(endpoints.length, 2, "no worker was replaced");
    assert.ok(pool.workers.every((w) => w.busy === null && w.pending.size === 0));
  });

  it("stop ends a running request's worker, spawns a fresh one, and goes on", async () => {
    const gate = gated();
    const { pool, endpoints } = makePool(gate.answer);
    pool.resize(1);
    const first = run(pool, "loop");
    const second = run(pool, "next");
    await tick();
    pool.stop("loop", "cancelled");
    await assert.rejects(first, (e) => e instanceof WorkerStopped && e.message === "cancelled");
    assert.ok(endpoints[0].terminated);
    assert.equal(pool.workers.length, 1);
    await tick();
    assert.equal(endpoints.length, 2);
    assert.equal(endpoints[1].received.at(-1).input, "next", "the waiting run went to the fresh worker");
    gate.open("next");
    assert.equal((await second).output, "out:next");
  });

  it("stop of a waiting request drops it without touching a worker", async () => {
    const gate = gated();
    const { pool, endpoints } = makePool(gate.answer);
    pool.resize(1);
    const first = run(pool, "a");
    const waiting = run(pool, "b");
    pool.stop("b");
    await assert.rejects(waiting, WorkerStopped);
    await tick();
    gate.open("a");
    assert.equal((await first).output, "out:a");
    assert.equal(endpoints.length, 1);
    assert.ok(!endpoints[0].terminated);
  });

  it("a worker that crashes is replaced: its run fails, later runs go on", async () => {
    const gate = gated();
    const { pool, endpoints } = makePool(gate.answer);
    pool.resize(2);
    const doomed = run(pool, "a");
    await tick();
    endpoints[0].crash("boom");
    await assert.rejects(doomed, (e) => e instanceof WorkerStopped && /boom/.test(e.message));
    endpoints[1].crash("idle crash");
    assert.equal(endpoints.length, 4, "busy and idle crashed workers both replaced");
    assert.equal(pool.workers.length, 2);
    const later = [run(pool, "b"), run(pool, "c")];
    await tick();
    gate.open("b");
    gate.open("c");
    assert.deepEqual(
      (await Promise.all(later)).map((r) => r.output),
      ["out:b", "out:c"],
    );
  });

  it("shrinks after running requests end, grows back by keeping retiring workers", async () => {
    const gate = gated();
    const { pool, endpoints } = makePool(gate.answer);
    pool.resize(3);
    const runs = [run(pool, "a"), run(pool, "b")];
    await tick();
    pool.resize(1); // the idle worker 2 goes now; worker 1 runs "b": it retires after it
    assert.deepEqual(
      endpoints.map((e) => e.terminated),
      [false, false, true],
    );
    assert.deepEqual(
      pool.workers.map((w) => w.retire),
      [false, true],
    );
    pool.resize(2); // the retiring worker stays instead of a new one
    assert.equal(endpoints.length, 3);
    assert.deepEqual(
      pool.workers.map((w) => w.retire),
      [false, false],
    );
    pool.resize(1);
    const third = run(pool, "c"); // never given to the retiring worker
    gate.open("b");
    await runs[1];
    await tick();
    assert.ok(endpoints[1].terminated, "the retired worker ended after its run");
    assert.equal(pool.workers.length, 1);
    gate.open("a");
    await runs[0];
    await tick();
    gate.open("c");
    assert.equal((await third).output, "out:c");
    assert.equal(endpoints.length, 3);
  });

  it("a new worker is preloaded with the compiled modules; adopt takes a warm worker", async () => {
    const gate = gated();
    const { pool, endpoints } = makePool(gate.answer);
    const warm = new FakeEndpoint("bench", gate.answer);
    pool.adopt(new WorkerClient(warm, "pd-bench"));
    pool.modules.set("abc", { compiled: true });
    pool.resize(2);
    assert.equal(endpoints.length, 1, "the adopted worker counts towards the size");
    assert.deepEqual(endpoints[0].received[0], { op: "preload", sha256: "abc", module: { compiled: true }, id: 1 });
    const r = run(pool, "x");
    await tick();
    assert.equal(warm.received.at(-1).input, "x", "the warm worker is used first");
    gate.open("x");
    await r;
  });

  it("close fails waiting and running requests and terminates every worker", async () => {
    const gate = gated();
    const { pool, endpoints } = makePool(gate.answer);
    pool.resize(1);
    const runs = [run(pool, "a"), run(pool, "b")];
    await tick();
    pool.close("agent stopped");
    for (const r of runs) await assert.rejects(r, (e) => e instanceof WorkerStopped && e.message === "agent stopped");
    assert.ok(endpoints.every((e) => e.terminated));
    assert.equal(pool.workers.length, 0);
    pool.resize(2);
    assert.equal(pool.workers.length, 0, "a closed pool stays closed");
  });
});

describe("Pool deadlines", () => {
  const timed = (pool, key, deadlineS) =>
    pool.run(key, { op: "run", sha256: "s", url: "/m", input: key }, [], { deadlineS });

  it("a run past its deadline has its worker terminated and replaced, and fails with DeadlineExceeded", async () => {
    const gate = gated();
    const timers = fakeTimers();
    const { pool, endpoints } = makePool(gate.answer, timers);
    pool.resize(1);
    const loop = timed(pool, "loop", 2);
    const next = timed(pool, "next", 2);
    await tick();
    assert.equal(timers.pending.size, 1, "only the run on a worker is timed; the waiting one is not yet");
    timers.advance(1999);
    assert.ok(!endpoints[0].terminated, "not before its deadline");
    timers.advance(1);
    await assert.rejects(loop, (e) => {
      assert.ok(e instanceof DeadlineExceeded);
      assert.equal(e.name, "DeadlineExceeded");
      assert.match(e.message, /ran past its 2s deadline \(stopped after 2\.0s\)/);
      return true;
    });
    assert.ok(endpoints[0].terminated, "the worker running it was terminated");
    await tick();
    assert.equal(endpoints.length, 2, "and replaced");
    assert.equal(endpoints[1].received.at(-1).input, "next", "the waiting run went to the fresh worker");
    assert.equal(timers.pending.size, 1, "its own deadline starts now");
    timers.advance(1000);
    gate.open("next");
    assert.equal((await next).output, "out:next");
    await tick();
    assert.equal(timers.pending.size, 0, "a run that ends in time clears its timer");
    assert.ok(!endpoints[1].terminated);
  });

  it("without a deadline nothing is timed; stop and a module's own failure still win over the timer", async () => {
    const timers = fakeTimers();
    const error = { name: "TaskStatusError", message: "module returned status 7", stack: "", status: 7 };
    const gate = gated();
    const { pool, endpoints } = makePool((m) => (m.input === "bad" ? { ok: false, error } : gate.answer(m)), timers);
    pool.resize(1);
    const free = timed(pool, "free", null);
    await tick();
    assert.equal(timers.pending.size, 0);
    gate.open("free");
    await free;
    await assert.rejects(timed(pool, "bad", 5), (e) => e.name === "TaskStatusError" && e.status === 7);
    await tick();
    assert.equal(timers.pending.size, 0, "the failed run's timer is cleared");
    const stopped = timed(pool, "stopped", 5);
    await tick();
    pool.stop("stopped", "cancelled");
    await assert.rejects(stopped, (e) => e instanceof WorkerStopped && e.message === "cancelled");
    await tick();
    assert.equal(timers.pending.size, 0);
    timers.advance(10_000);
    assert.equal(endpoints.length, 2, "only the cancel replaced a worker");
  });
});

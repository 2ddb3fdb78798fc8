// static/js/dashboard_format.js against the table `core.status`'s formatters are held to
// (tests/dashboard_format_cases.json): the dashboard prints what `processdistro top` prints.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import {
  formatAgo, formatCount, formatEta, formatProgress, formatRate, formatScore,
} from "../../static/js/dashboard_format.js";
import { chartSpan, niceCeil } from "../../static/js/dashboard_view.js";

const cases = JSON.parse(readFileSync(new URL("../dashboard_format_cases.json", import.meta.url)));

for (const [name, fn] of [["score", formatScore], ["eta", formatEta], ["rate", formatRate]]) {
  test(`format ${name} as core.status does`, () => {
    for (const [value, text] of cases[name]) assert.equal(fn(value), text, `${name}(${value})`);
  });
}

test("counts are grouped by thin spaces", () => {
  assert.equal(formatCount(0), "0");
  assert.equal(formatCount(999), "999");
  assert.equal(formatCount(389022660), "389\u2009022\u2009660");
  assert.equal(formatCount(-1234), "-1\u2009234");
  assert.equal(formatCount(NaN), "-");
});

test("ago and progress", () => {
  assert.equal(formatAgo(100, 105.4), "5s ago");
  assert.equal(formatAgo(100, 99), "0s ago");
  assert.equal(formatAgo(0, 185), "3m ago");
  assert.equal(formatAgo(0, 7300), "2h ago");
  assert.equal(formatProgress({ done: 12, total: 64, percent: 18.75 }), "12/64 (18.8 %)");
});

test("the chart's axis tops are round", () => {
  assert.deepEqual([1, 1.5, 3, 7, 10, 11, 389, 5000].map(niceCeil), [1, 2, 5, 10, 10, 20, 500, 5000]);
});

test("the chart spans the history there is, a minute to ten", () => {
  assert.equal(chartSpan([], 1000), 60);
  assert.equal(chartSpan([[990, 1]], 1000), 60);
  assert.equal(chartSpan([[900, 1], [1000, 2]], 1000), 120);
  assert.equal(chartSpan([[0, 1], [1000, 2]], 1000), 600);
});

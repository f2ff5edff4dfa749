import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { InfillStops } from "../src/server/infill-stops.js";

describe("/infill's stop rules", () => {
  it("n_indent: ends before a later line that starts less indented, keeping its newline and indentation", () => {
    const stops = new InfillStops(0, 4);
    assert.equal(stops.cut("x = 1"), "x = 1", "the first line, after the cursor, is not checked");
    assert.equal(stops.cut("\n    y = 2\n\n\t\t\t"), "\n    y = 2\n\n\t\t\t", "empty lines and tabs count as nothing yet");
    assert.equal(stops.reached, false);
    assert.equal(stops.cut(" z\n  w = 3\n"), " z\n  ", "a line of 2 ends it before its first character");
    assert.equal(stops.reached, true);
    assert.equal(stops.cut("more"), "");
  });

  it("t_max_predict_ms: ends after the text that finds the limit passed with a newline written", () => {
    let t = 100;
    const stops = new InfillStops(8, 0, () => t);
    assert.equal(stops.cut("a"), "a");
    t = 120;
    assert.equal(stops.cut("b"), "b", "past the limit, but no newline yet");
    assert.equal(stops.reached, false);
    t = 121;
    assert.equal(stops.cut("c\nd"), "c\nd");
    assert.equal(stops.reached, true);
    assert.equal(stops.cut("e"), "");
  });

  it("without either, never ends anything", () => {
    let t = 0;
    const stops = new InfillStops(0, 0, () => (t += 1000));
    for (const text of ["a\n", "b\n", "\n", "c"]) assert.equal(stops.cut(text), text);
    assert.equal(stops.reached, false);
  });
});

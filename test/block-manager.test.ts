import assert from "node:assert/strict";
import { describe, it } from "node:test";
import { type BlockAllocation, BlockManager } from "../src/runtime/block-manager.js";

const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);

/** Admit a prompt, compute it all (growing and registering its blocks), as the scheduler would. */
function prefill(bm: BlockManager, prompt: number[], capacity = prompt.length): BlockAllocation {
  const alloc = bm.allocate(prompt, capacity, true);
  assert.ok(alloc, "allocation refused");
  bm.grow(alloc, prompt.length);
  bm.commit(alloc, prompt, prompt.length);
  return alloc;
}

describe("BlockManager accounting", () => {
  it("promises blocks at admission, hands them out as the sequence grows, takes all back", () => {
    const bm = new BlockManager(8, 4);
    const a = bm.allocate(range(1, 6), 10, true)!;
    assert.deepEqual(a.table, []);
    assert.equal(a.reserved, 3);
    assert.equal(bm.availableBlocks, 5);
    assert.equal(bm.usedBlocks, 0);

    bm.grow(a, 6);
    assert.equal(a.table.length, 2);
    assert.equal(a.reserved, 1);
    assert.equal(bm.usedBlocks, 2);
    assert.equal(bm.availableBlocks, 5);

    bm.grow(a, 10);
    assert.equal(a.table.length, 3);
    assert.equal(new Set(a.table).size, 3);
    assert.throws(() => bm.grow(a, 13), /outgrew its 3 reserved KV blocks/);

    bm.release(a);
    assert.equal(bm.usedBlocks, 0);
    assert.equal(bm.availableBlocks, 8);
  });

  it("refuses what it cannot promise, changing nothing", () => {
    const bm = new BlockManager(4, 4);
    const a = bm.allocate(range(1, 4), 12, true)!;
    assert.equal(bm.allocate(range(100, 4), 8, true), null);
    assert.equal(bm.availableBlocks, 1);
    assert.equal(bm.queries, 0);
    const b = bm.allocate(range(100, 4), 4, true)!;
    assert.equal(bm.availableBlocks, 0);
    bm.release(a);
    bm.release(b);
    assert.equal(bm.availableBlocks, 4);
  });
});

describe("prefix cache", () => {
  it("reuses the full blocks of an equal prefix and counts queries and hits", () => {
    const bm = new BlockManager(16, 4);
    const prompt = range(1, 13);
    const a = prefill(bm, prompt);
    // 13 tokens: blocks 0..2 may be reused (the last token sits in block 3); nothing cached yet.
    assert.equal(a.cachedTokens, 0);
    assert.equal(bm.queries, 3);
    assert.equal(bm.hits, 0);
    assert.equal(bm.cachedBlocks, 3);

    const b = bm.allocate([...range(1, 10), 77, 78, 79], 16, true)!;
    // The first two blocks match; the third differs at token 11, so the lookup stops there.
    assert.deepEqual(b.table, a.table.slice(0, 2));
    assert.equal(b.cachedTokens, 8);
    assert.equal(bm.queries, 6);
    assert.equal(bm.hits, 2);
    bm.release(a);
    bm.release(b);
  });

  it("never reuses the block that holds the last prompt token", () => {
    const bm = new BlockManager(16, 4);
    const prompt = range(1, 8); // exactly two full blocks, both registered once computed
    bm.release(prefill(bm, prompt));
    assert.equal(bm.cachedBlocks, 2);
    const again = bm.allocate(prompt, 9, true)!;
    // Block 1 holds token 7, which must be computed again to get the logits: start at position 4.
    assert.equal(again.cachedTokens, 4);
    assert.equal(again.table.length, 1);
    bm.release(again);
  });

  it("reference-counts shared blocks: cached blocks stay in use until the last holder leaves", () => {
    const bm = new BlockManager(8, 4);
    const prompt = range(1, 9);
    const a = prefill(bm, prompt);
    const b = bm.allocate(prompt, 9, true)!;
    bm.grow(b, 9);
    assert.deepEqual(b.table.slice(0, 2), a.table.slice(0, 2));
    assert.equal(bm.usedBlocks, 4); // a's 3 + b's own last block
    bm.release(a);
    assert.equal(bm.usedBlocks, 3);
    bm.release(b);
    assert.equal(bm.usedBlocks, 0);
    assert.equal(bm.availableBlocks, 8);
    assert.equal(bm.cachedBlocks, 2);
  });

  it("taking a cached block nobody holds counts against what can be promised", () => {
    const bm = new BlockManager(4, 4);
    bm.release(prefill(bm, range(1, 8)));
    // 4 blocks available, 2 of them cached. Reusing both and promising 2 more needs all 4.
    const b = bm.allocate(range(1, 9), 16, true)!;
    assert.equal(b.cachedTokens, 8);
    assert.equal(b.reserved, 2);
    assert.equal(bm.availableBlocks, 0);
    assert.equal(bm.allocate([500], 1, true), null);
    bm.release(b);
    assert.equal(bm.availableBlocks, 4);
  });

  it("overwrites cached blocks only when no free block is left, least recently used first", () => {
    const bm = new BlockManager(4, 2);
    const a = [1, 2, 3, 4];
    const b = [5, 6, 7, 8];
    bm.release(prefill(bm, a));
    bm.release(prefill(bm, b));
    assert.equal(bm.cachedBlocks, 4);

    // Use a's prefix again, so that b's blocks become the least recently used.
    const touch = bm.allocate([...a, 9], 5, true)!;
    assert.equal(touch.cachedTokens, 4);
    bm.release(touch);

    const c = bm.allocate([10, 11, 12], 4, true)!;
    bm.grow(c, 4);
    bm.release(c);
    assert.equal(bm.cachedBlocks, 2);
    const again = bm.allocate([...a, 9], 5, true)!;
    assert.equal(again.cachedTokens, 4, "a's blocks survived");
    bm.release(again);
    assert.equal(bm.allocate([...b, 9], 5, true)!.cachedTokens, 0, "b's blocks were overwritten");
  });

  it("keeps cached blocks while never-cached blocks are free", () => {
    const bm = new BlockManager(6, 2);
    bm.release(prefill(bm, [1, 2, 3, 4]));
    const c = bm.allocate([9, 9, 9, 9, 9], 8, true)!;
    bm.grow(c, 8);
    assert.equal(bm.cachedBlocks, 2);
    bm.release(c);
    assert.equal(bm.allocate([1, 2, 3, 4, 5], 5, true)!.cachedTokens, 4);
  });

  it("registers decode blocks as they fill, so a follow-up prompt reuses the generated part", () => {
    const bm = new BlockManager(8, 4);
    const tokens = range(1, 6);
    const a = bm.allocate(tokens, 9, true)!;
    bm.grow(a, 6);
    bm.commit(a, tokens, 6);
    assert.equal(bm.cachedBlocks, 1);
    tokens.push(50, 51, 52); // generated; K/V of positions 6 and 7 written by two decode steps
    bm.grow(a, 8);
    bm.commit(a, tokens, 8);
    assert.equal(bm.cachedBlocks, 2);
    bm.release(a);
    assert.equal(bm.allocate([...tokens, 60], 10, true)!.cachedTokens, 8);
  });

  it("registers a block computed twice only once", () => {
    const bm = new BlockManager(8, 4);
    const prompt = range(1, 5);
    const a = prefill(bm, prompt);
    const b = bm.allocate(prompt, 5, false)!; // computes block 0 again (e.g. for prompt log-probs)
    bm.grow(b, 5);
    bm.commit(b, prompt, 5);
    assert.notEqual(b.table[0], a.table[0]);
    assert.equal(bm.cachedBlocks, 1);
    bm.release(a);
    bm.release(b);
    assert.equal(bm.usedBlocks, 0);
    assert.equal(bm.availableBlocks, 8);
    assert.equal(bm.cachedBlocks, 1);
  });

  it("looks nothing up and registers nothing when prefix caching is off", () => {
    const bm = new BlockManager(8, 4, false);
    bm.release(prefill(bm, range(1, 9)));
    assert.equal(bm.cachedBlocks, 0);
    const again = bm.allocate(range(1, 9), 9, true)!;
    assert.equal(again.cachedTokens, 0);
    assert.equal(bm.queries, 0);
  });
});

import { createHash } from "node:crypto";

/** One sequence's share of the KV pool. */
export interface BlockAllocation {
  /** Its blocks in position order: block i holds positions i*blockSize .. (i+1)*blockSize - 1. */
  table: number[];
  /** Blocks promised at admission and not taken yet, so that growing can never fail. */
  reserved: number;
  /** Prompt tokens whose K/V came from the prefix cache (a whole number of blocks). */
  cachedTokens: number;
  /** The cache key of each leading full block, in order; the next block's key chains on the last one. */
  keys: string[];
}

/**
 * The pool of `numBlocks` KV blocks of `blockSize` token slots, with a prefix cache. A full block is keyed
 * by a hash of (the previous block's key, its own tokens), so equal keys mean equal whole prefixes and a
 * prompt can take over the blocks another sequence already computed. Blocks are reference-counted; one
 * whose count drops to 0 keeps its contents and stays findable, and is overwritten (least recently used
 * first) only once no never-cached block is free.
 */
export class BlockManager {
  /** Full prompt blocks looked up, and those found, since the start (for a hit-rate metric). */
  queries = 0;
  hits = 0;

  private readonly refs: Int32Array;
  private readonly keyOf: (string | null)[];
  private readonly byKey = new Map<string, number>();
  /** Blocks holding nothing worth keeping; popped from the end. */
  private readonly free: number[];
  /** Cached blocks no sequence uses, least recently used first (a Set iterates in insertion order). */
  private readonly evictable = new Set<number>();
  /** Blocks promised to admitted sequences and not taken yet. */
  private promised = 0;

  constructor(
    readonly numBlocks: number,
    readonly blockSize: number,
    /** Off: no lookups and no registration; every block is private to its sequence. */
    readonly prefixCaching = true,
  ) {
    this.refs = new Int32Array(numBlocks);
    this.keyOf = new Array<string | null>(numBlocks).fill(null);
    this.free = Array.from({ length: numBlocks }, (_, i) => numBlocks - 1 - i);
  }

  /** Blocks that sequences hold now. */
  get usedBlocks(): number {
    return this.numBlocks - this.free.length - this.evictable.size;
  }

  /** Blocks whose contents are findable in the prefix cache (held or not). */
  get cachedBlocks(): number {
    return this.byKey.size;
  }

  /** Blocks that can still be promised to a new sequence. */
  get availableBlocks(): number {
    return this.free.length + this.evictable.size - this.promised;
  }

  blocksFor(tokens: number): number {
    return Math.ceil(tokens / this.blockSize);
  }

  /**
   * Admit a sequence whose cache starts with `prompt` and will hold at most `capacity` tokens: take over the
   * cached blocks of the prompt's prefix (when `lookup`) and promise the rest. Null when the pool can't
   * promise that now; nothing changes then.
   */
  allocate(prompt: readonly number[], capacity: number, lookup: boolean): BlockAllocation | null {
    const eligible = lookup && this.prefixCaching ? this.reusableBlocks(prompt.length) : 0;
    const found = this.lookup(prompt, eligible);
    const need = this.blocksFor(capacity) - found.table.length;
    // Taking a cached block that nobody holds removes it from the pool that backs the promises.
    const revived = found.table.filter((b) => this.refs[b] === 0).length;
    if (need + revived > this.availableBlocks) return null;

    for (const b of found.table) this.hold(b);
    this.queries += eligible;
    this.hits += found.table.length;
    this.promised += need;
    return { table: found.table, reserved: need, cachedTokens: found.table.length * this.blockSize, keys: found.keys };
  }

  /** Make the table cover `tokens` positions, drawing on the sequence's promised blocks. */
  grow(alloc: BlockAllocation, tokens: number): void {
    while (alloc.table.length < this.blocksFor(tokens)) {
      if (alloc.reserved === 0) throw new Error(`a sequence outgrew its ${alloc.table.length} reserved KV blocks`);
      alloc.reserved--;
      this.promised--;
      alloc.table.push(this.take());
    }
  }

  /**
   * Register the sequence's full blocks whose slots are all written: `tokens` are its tokens in position
   * order, the first `written` of which are in the cache.
   */
  commit(alloc: BlockAllocation, tokens: readonly number[], written: number): void {
    if (!this.prefixCaching) return;
    for (let i = alloc.keys.length; (i + 1) * this.blockSize <= written && i < alloc.table.length; i++) {
      const key = blockKey(alloc.keys[i - 1], tokens.slice(i * this.blockSize, (i + 1) * this.blockSize));
      alloc.keys.push(key);
      const b = alloc.table[i];
      // Two sequences may compute the same block at once; the first to register it wins.
      if (!this.byKey.has(key)) {
        this.byKey.set(key, b);
        this.keyOf[b] = key;
      }
    }
  }

  /** Give back all of a sequence's blocks and promises (at its end, whatever the reason). */
  release(alloc: BlockAllocation): void {
    // Last block first, so that a prompt's tail is overwritten before the head other prompts share.
    for (let i = alloc.table.length - 1; i >= 0; i--) this.drop(alloc.table[i]);
    this.promised -= alloc.reserved;
    alloc.table = [];
    alloc.reserved = 0;
  }

  /**
   * How many leading blocks of a prompt may come from the cache. The block holding the last prompt token is
   * never reused: that token must still be computed to get the logits for the first sampled token.
   */
  private reusableBlocks(promptLen: number): number {
    return Math.floor((promptLen - 1) / this.blockSize);
  }

  private lookup(prompt: readonly number[], eligible: number): { table: number[]; keys: string[] } {
    const table: number[] = [];
    const keys: string[] = [];
    for (let i = 0; i < eligible; i++) {
      const key = blockKey(keys[i - 1], prompt.slice(i * this.blockSize, (i + 1) * this.blockSize));
      const b = this.byKey.get(key);
      if (b === undefined) break;
      table.push(b);
      keys.push(key);
    }
    return { table, keys };
  }

  private hold(b: number): void {
    if (this.refs[b] === 0) this.evictable.delete(b);
    this.refs[b]++;
  }

  private drop(b: number): void {
    if (--this.refs[b] > 0) return;
    if (this.keyOf[b] === null) this.free.push(b);
    else this.evictable.add(b);
  }

  /** A block for new data: a free one, else the least recently used cached one, forgotten. */
  private take(): number {
    let b = this.free.pop();
    if (b === undefined) {
      b = this.evictable.values().next().value;
      if (b === undefined) throw new Error("the KV pool ran out of blocks despite its promises");
      this.evictable.delete(b);
      this.byKey.delete(this.keyOf[b]!);
      this.keyOf[b] = null;
    }
    this.refs[b] = 1;
    return b;
  }
}

/** SHA-256 makes a collision (two different prefixes sharing a block) practically impossible. */
function blockKey(previous: string | undefined, tokens: readonly number[]): string {
  const h = createHash("sha256");
  if (previous !== undefined) h.update(previous);
  h.update(new Uint8Array(Int32Array.from(tokens).buffer));
  return h.digest("base64");
}
